#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for testing the launchers:
#   slurm/testing/cluster.sh start DIR   # writes DIR/slurm.conf, starts munged, slurmctld, slurmd
#   slurm/testing/cluster.sh stop DIR    # stops them
# Afterwards `export SLURM_CONF=DIR/slurm.conf` points sbatch/squeue/scancel at it.
# Needs root (the daemons run as root here) and Debian's slurm-wlm and munge packages.
# SLURMCTLD_PORT / SLURMD_PORT (default 6817 / 6818) pick the ports; a port already in use is
# reported and nothing is started. Exit codes: 0 up (or stopped), 1 a daemon did not start or the
# node did not come up (logs in DIR/log; what this start began is stopped again, munged included),
# 2 bad usage or a port in use.
set -euo pipefail
action=${1:?usage: cluster.sh start|stop DIR}
dir=$(mkdir -p "${2:?usage: cluster.sh start|stop DIR}" && cd "$2" && pwd)
host=$(hostname -s)

stop() {
  for pidfile in "$dir/slurmd.pid" "$dir/slurmctld.pid" "$dir/munged.pid"; do
    if [ -f "$pidfile" ]; then
      kill "$(cat "$pidfile")" 2>/dev/null || true
      rm -f "$pidfile"
    fi
  done
}

if [ "$action" = stop ]; then
  stop
  exit 0
fi
[ "$action" = start ] || { echo "cluster.sh: unknown action '$action' (start|stop)" >&2; exit 2; }

ctld_port=${SLURMCTLD_PORT:-6817}
slurmd_port=${SLURMD_PORT:-6818}
port_in_use() {  # something listens on TCP port $1 of this machine
  if command -v ss >/dev/null; then
    ss -Hltn "sport = :$1" 2>/dev/null | grep -q .
  else
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
  fi
}
for spec in "SLURMCTLD_PORT=$ctld_port" "SLURMD_PORT=$slurmd_port"; do
  if port_in_use "${spec#*=}"; then
    echo "cluster.sh: port ${spec#*=} ($spec) is already in use (another slurmctld/slurmd, or a cluster.sh" \
         "that was not stopped: cluster.sh stop ITS_DIR); pick free ports, e.g. SLURMCTLD_PORT=7817 SLURMD_PORT=7818" >&2
    exit 2
  fi
done

# From here on a failure stops whatever this start began (munged first of all).
up=0
trap '[ "$up" = 1 ] || stop' EXIT

cpus=$(nproc)
mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
mkdir -p "$dir/state" "$dir/spool" "$dir/log" "$dir/munge"
cat > "$dir/slurm.conf" <<CONF
ClusterName=local
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.socket
CryptoType=crypto/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
KillWait=30
InactiveLimit=0
MinJobAge=300
NodeName=$host CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF

# A key of its own, so nothing outside DIR is needed or changed.
[ -f "$dir/munge/munge.key" ] || { dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none; chmod 400 "$dir/munge/munge.key"; }
chmod 700 "$dir/munge"
failed() {  # $1: what failed; the daemons' logs follow, then the EXIT trap stops what was started
  echo "cluster.sh: $1; logs in $dir/log (stopping what this start began)" >&2
  tail -n 20 "$dir"/log/*.log >&2 2>/dev/null || true
  exit 1
}
munged --force --socket="$dir/munge/munge.socket" --pid-file="$dir/munged.pid" \
  --log-file="$dir/log/munged.log" --seed-file="$dir/munge/munge.seed" --key-file="$dir/munge/munge.key" \
  || failed "munged did not start"
export SLURM_CONF="$dir/slurm.conf"
slurmctld -f "$SLURM_CONF" || failed "slurmctld did not start"
slurmd -f "$SLURM_CONF" || failed "slurmd did not start"
for _ in $(seq 60); do
  if sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
    echo "slurm cluster up: SLURM_CONF=$SLURM_CONF"
    up=1
    exit 0
  fi
  sleep 1
done
sinfo >&2 || true
failed "the node did not come up within 60 s"
