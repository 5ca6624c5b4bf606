#!/usr/bin/env bash
# The one launcher behind every slurm/*.sh recipe. Called inside an allocation as
#   launch.sh EXPERIMENT [hydra overrides ...]      (EXPERIMENT: conf/experiment/<name>.yaml)
# it starts one training process per task with srun (one task per GPU; ranks from SLURM_PROCID /
# SLURM_LOCALID / SLURM_NTASKS), rendezvous at the first node of the allocation, waits for the
# job step, and requeues the job when training recorded a stop that a restart continues.
#
# Signals: the batch shell traps TERM and USR1 (`scancel -s USR1 --batch JOB`, `#SBATCH
# --signal=B:USR1@600`, `scancel -s TERM --batch JOB`) and forwards them to srun as USR1, which srun
# passes to every task (srun itself ends the step on TERM; training treats TERM and USR1 alike):
# training saves at the next step boundary and stops. `#SBATCH --signal=USR1@600` (no B:) signals
# the tasks directly; both forms end the same way.
#
# The decision: RUN_DIR/outcome.json (megatron_qwen2/outcome.py) is removed before the step starts;
# rank 0 writes it when training ends. After the step the job is requeued iff its exit_code is one of
# megatron_qwen2.errors.REQUEUE_CODES (75 saved and stopped on a signal, 76 hang watchdog); a line
# "launch.sh: decision: ..." in the log says which and why. The launcher exits with that exit_code
# (with srun's when there is no outcome.json). Without a job-step outcome nothing is requeued.
# After the first task of the step ends, the others get STEP_EXIT_WAIT_S seconds to end on their own
# (their checkpoint, stacks and outcome written) before srun kills them.
#
# Environment (all optional):
#   MEGATRON_QWEN2_HOME  repository checkout (default: the directory sbatch was called from)
#   SETUP_ENV            shell code run first, e.g. "source ~/venvs/mq2/bin/activate" or "module load cuda/12.4"
#   PYTHON               interpreter (default: python3); it also reads outcome.json on the batch node
#   RUN_ROOT, RUN_DIR    run directory = RUN_DIR, default RUN_ROOT/EXPERIMENT, RUN_ROOT default HOME/runs
#                        (stable across requeues and resubmissions: that is what makes them resume)
#   LAUNCH_DEVICE        cuda (default) or cpu: the same launcher on CPUs with gloo (for tests)
#   SRUN_EXTRA_ARGS      extra srun arguments, e.g. "--container-image=… --container-mounts=…" (pyxis)
#   REQUEUE_ON_SAVE      1 (default): requeue on a REQUEUE_CODES outcome; 0: just exit with its code
#   STEP_EXIT_WAIT_S     see above (default 60)
#   DRY_RUN              1: print the command of every rank and exit; works outside Slurm too,
#                        with NODES / TASKS_PER_NODE (defaults 1 / 8) standing in for the allocation
set -uo pipefail

experiment=${1:?usage: launch.sh EXPERIMENT [hydra overrides ...]}
shift
home=${MEGATRON_QWEN2_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}
if [ ! -f "$home/megatron_qwen2/train.py" ]; then
  echo "launch.sh: MEGATRON_QWEN2_HOME=$home is not a megatron_qwen2 checkout (no megatron_qwen2/train.py);" \
       "submit from the repository root or set MEGATRON_QWEN2_HOME" >&2
  exit 2
fi
device=${LAUNCH_DEVICE:-cuda}
case "$device" in cuda|cpu) ;; *) echo "launch.sh: LAUNCH_DEVICE=$device must be cuda or cpu" >&2; exit 2 ;; esac
python=${PYTHON:-python3}
run_dir=${RUN_DIR:-${RUN_ROOT:-$HOME/runs}/$experiment}

if [ -n "${SLURM_JOB_ID:-}" ] && [ "${DRY_RUN:-0}" != 1 ]; then
  nodes=$(scontrol show hostnames "$SLURM_JOB_NODELIST")
  ntasks=$SLURM_NTASKS
  job=$SLURM_JOB_ID
else  # dry run outside an allocation: a stand-in allocation
  nnodes=${NODES:-${SLURM_JOB_NUM_NODES:-1}}
  nodes=$(for i in $(seq 0 $((nnodes - 1))); do echo "node$i"; done)
  ntasks=$((nnodes * ${TASKS_PER_NODE:-8}))
  job=${SLURM_JOB_ID:-DRYRUN}
fi
master_addr=$(echo "$nodes" | head -n 1)
master_port=$((20000 + ${job//[!0-9]/0} % 20000))

# What large jobs need from NCCL and CUDA (each can be overridden from the environment):
export MASTER_ADDR=${MASTER_ADDR:-$master_addr} MASTER_PORT=${MASTER_PORT:-$master_port}
export PYTHONUNBUFFERED=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
# The flight recorder: the last collectives of every process group, dumped by the hang watchdog
# into RUN_DIR/hang/ (megatron_qwen2/watchdog.py).
export TORCH_FR_BUFFER_SIZE=${TORCH_FR_BUFFER_SIZE:-2000}
if [ "$device" = cuda ]; then
  # One hardware queue per device: communication kernels launch in issue order, which tensor- and
  # sequence-parallel overlap relies on.
  export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
  # A failed or timed-out collective aborts the process instead of hanging the whole job.
  export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
  # Free NCCL's buffers as soon as their stream is done with them (lower peak memory).
  export TORCH_NCCL_AVOID_RECORD_STREAMS=${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}
  # Longer InfiniBand retry timeout: congested fabrics otherwise turn into spurious failures.
  export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}
  export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
  # NCCL's own recorder, and its dump when a collective times out, in the same place.
  export TORCH_NCCL_TRACE_BUFFER_SIZE=${TORCH_NCCL_TRACE_BUFFER_SIZE:-$TORCH_FR_BUFFER_SIZE}
  export TORCH_NCCL_DUMP_ON_TIMEOUT=${TORCH_NCCL_DUMP_ON_TIMEOUT:-1}
  export TORCH_NCCL_DEBUG_INFO_TEMP_FILE=${TORCH_NCCL_DEBUG_INFO_TEMP_FILE:-$run_dir/hang/nccl_trace_rank_}
fi

overrides=("device=$device" "+experiment=$experiment" "hydra.run.dir=$run_dir" "$@")
# Each task turns Slurm's ids into the torch.distributed environment, then becomes the trainer.
rank_cmd='export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS; exec "$@"'
train=("$python" -m megatron_qwen2.train "${overrides[@]}")

if [ "${DRY_RUN:-0}" = 1 ]; then
  echo "# job $job: $ntasks ranks on $(echo "$nodes" | wc -l) node(s), run dir $run_dir"
  echo "# environment: MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT OMP_NUM_THREADS=$OMP_NUM_THREADS" \
       "${CUDA_DEVICE_MAX_CONNECTIONS:+CUDA_DEVICE_MAX_CONNECTIONS=$CUDA_DEVICE_MAX_CONNECTIONS}"
  per_node=$((ntasks / $(echo "$nodes" | wc -l)))
  for r in $(seq 0 $((ntasks - 1))); do
    node=$(echo "$nodes" | sed -n "$((r / per_node + 1))p")
    printf '%s: cd %q && RANK=%d LOCAL_RANK=%d WORLD_SIZE=%d' "$node" "$home" "$r" $((r % per_node)) "$ntasks"
    printf ' %q' "${train[@]}"
    echo
  done
  exit 0
fi

# A stop signal to the batch shell goes to the job step as USR1 (srun forwards USR1 to the tasks, but
# answers TERM by killing them); one that comes before the step starts is kept for it.
srun_pid=
pending_signal=
forward() {
  if [ -z "$srun_pid" ]; then
    pending_signal=$1
    echo "launch.sh: SIG$1 before the job step started; forwarding it once srun runs"
  else
    echo "launch.sh: the batch shell got SIG$1; forwarding it to the job step as SIGUSR1 (srun pid $srun_pid)"
    kill -s USR1 "$srun_pid" 2>/dev/null || true
  fi
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM
trap '' PIPE  # a vanished log reader must not end the launcher before its decision

if [ -n "${SETUP_ENV:-}" ]; then
  eval "$SETUP_ENV"
fi
cd "$home" || exit 2

outcome_file=$("$python" -c 'import sys, pathlib; from megatron_qwen2.outcome import OUTCOME_FILE
print(pathlib.Path(sys.argv[1]) / OUTCOME_FILE)' "$run_dir") || {
  echo "launch.sh: PYTHON=$python cannot import megatron_qwen2 on $(hostname) (needed to read the run's" \
       "outcome); set PYTHON or SETUP_ENV so that it can" >&2
  exit 2
}
mkdir -p "$run_dir/logs" || exit 74
[ "$device" = cuda ] && mkdir -p "$run_dir/hang"
log="$run_dir/logs/job-$SLURM_JOB_ID.log"
# Until the decision everything goes to the job's output and to the run dir's log (appended across
# requeues) through one tee, which ignores the stop signals so that it outlives the step.
exec {job_output}>&1
exec > >(trap '' INT TERM USR1; exec tee -a "$log") 2>&1
tee_pid=$!
say() { echo "$*" | tee -a "$log"; }
echo "launch.sh: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) $experiment: $ntasks ranks," \
     "master $MASTER_ADDR:$MASTER_PORT, run dir $run_dir, log $log"
rm -f "$outcome_file"
# shellcheck disable=SC2086
srun --label --kill-on-bad-exit=0 --wait="${STEP_EXIT_WAIT_S:-60}" ${SRUN_EXTRA_ARGS:-} \
  bash -c "$rank_cmd" _ "${train[@]}" &
srun_pid=$!
[ -n "$pending_signal" ] && forward "$pending_signal"
while :; do
  wait "$srun_pid"
  rc=$?
  # A trapped signal interrupts `wait` (status > 128) while srun still runs: wait again.
  if [ "$rc" -gt 128 ] && kill -0 "$srun_pid" 2>/dev/null; then continue; fi
  break
done

decision=$("$python" - "$run_dir" <<'PY'
import sys
from megatron_qwen2.errors import REQUEUE_CODES
from megatron_qwen2.outcome import read_outcome
outcome = read_outcome(sys.argv[1])
if outcome is None:
    print("none")
else:
    verdict = "requeue" if outcome.get("exit_code") in REQUEUE_CODES else "stop"
    print(verdict, outcome.get("exit_code"), outcome.get("reason"), outcome.get("step"))
PY
)
read -r verdict code reason step <<< "${decision:-none}"
# The step's output is complete in the log before the decision is written (a requeue ends this shell).
exec >&"$job_output" 2>&1
wait "$tee_pid" 2>/dev/null
case "$verdict" in
  requeue)
    why="$outcome_file says exit $code ($reason) at step $step, which is one of the requeue codes"
    if [ "${REQUEUE_ON_SAVE:-1}" = 1 ]; then
      say "launch.sh: decision: requeue job $SLURM_JOB_ID: $why; it resumes from $run_dir/checkpoints/latest"
      scontrol requeue "$SLURM_JOB_ID" || say "launch.sh: scontrol requeue $SLURM_JOB_ID failed; resubmit to resume"
    else
      say "launch.sh: decision: no requeue (REQUEUE_ON_SAVE=0): $why"
    fi
    rc=$code ;;
  stop)
    say "launch.sh: decision: no requeue: $outcome_file says exit $code ($reason) at step $step"
    rc=$code ;;
  *)
    say "launch.sh: decision: no requeue: the job step ended (srun exit $rc) without writing $outcome_file," \
         "so training did not record how it ended (killed, or it failed before starting); see the lines above"
    [ "$rc" -ne 0 ] || rc=1 ;;
esac
exit "$rc"
