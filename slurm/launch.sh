#!/usr/bin/env bash
# The one launcher behind every slurm/*.sh recipe. Called inside an allocation as
#   launch.sh EXPERIMENT [hydra overrides ...]
# it starts one training process per task with srun (one task per GPU; ranks from SLURM_PROCID /
# SLURM_LOCALID / SLURM_NTASKS), rendezvous at the first node of the allocation, and requeues the
# job when training stopped early after saving a checkpoint (preemption or the time-limit signal),
# so that the next start resumes from `latest` in the same run directory.
#
# Environment (all optional):
#   MEGATRON_QWEN2_HOME  repository checkout (default: the directory sbatch was called from)
#   SETUP_ENV            shell code run first, e.g. "source ~/venvs/mq2/bin/activate" or "module load cuda/12.4"
#   PYTHON               interpreter (default: python3)
#   RUN_ROOT, RUN_DIR    run directory = RUN_DIR, default RUN_ROOT/EXPERIMENT, RUN_ROOT default HOME/runs
#                        (stable across requeues and resubmissions: that is what makes them resume)
#   LAUNCH_DEVICE        cuda (default) or cpu: the same launcher on CPUs with gloo (for tests)
#   SRUN_EXTRA_ARGS      extra srun arguments, e.g. "--container-image=… --container-mounts=…" (pyxis)
#   REQUEUE_ON_SAVE      1 (default): requeue the job after a save-and-stop; 0: just exit
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
# Exit code with which megatron_qwen2.train stops after saving on SIGTERM / SIGUSR1.
saved_exit=${SAVED_EXIT_CODE:-75}

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

if [ -n "${SETUP_ENV:-}" ]; then
  eval "$SETUP_ENV"
fi
mkdir -p "$run_dir/logs"
log="$run_dir/logs/job-$SLURM_JOB_ID.log"
echo "launch.sh: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) $experiment: $ntasks ranks," \
     "master $MASTER_ADDR:$MASTER_PORT, run dir $run_dir, log $log" | tee -a "$log"
cd "$home"
log_start=$(($(stat -c %s "$log") + 1))
# shellcheck disable=SC2086
srun --label --kill-on-bad-exit=1 ${SRUN_EXTRA_ARGS:-} bash -c "$rank_cmd" _ "${train[@]}" 2>&1 | tee -a "$log"
rc=${PIPESTATUS[0]}
# After a preemption save the ranks exit with $saved_exit one by one, and srun may kill the last
# ones first (--kill-on-bad-exit), reporting their signal instead: rank 0's line says what happened.
if [ "$rc" -ne 0 ] && tail -c +"$log_start" "$log" | grep -q "exiting with code $saved_exit"; then
  rc=$saved_exit
fi
if [ "$rc" -eq "$saved_exit" ]; then
  echo "launch.sh: training saved a checkpoint and stopped early (exit $rc)" | tee -a "$log"
  if [ "${REQUEUE_ON_SAVE:-1}" = 1 ]; then
    echo "launch.sh: requeueing job $SLURM_JOB_ID; it resumes from $run_dir/checkpoints/latest" | tee -a "$log"
    scontrol requeue "$SLURM_JOB_ID"
  fi
fi
exit "$rc"
