#!/bin/bash
#SBATCH --job-name=qwen2-tiny-cpu
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=2
#SBATCH --cpus-per-task=1
#SBATCH --time=01:00:00
#SBATCH --signal=USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
# The recipe conf/experiment/cpu_tiny.yaml: the tiny model on CPUs with gloo, two ranks (data parallel), no GPU and no
# gres: the recipe that runs anywhere Slurm does, e.g. on the one-node test cluster of
# slurm/testing/cluster.sh (README, "Slurm").
#   sbatch slurm/cpu_tiny.sh [hydra overrides, e.g. train.steps=50 train.save_interval=10]
# Stop signals: --signal=USR1@120 (use this) sends USR1 to the training tasks two minutes before the
# time limit; they save at the next step boundary and stop (exit 75), and the launcher requeues the
# job, which resumes from the run directory's `latest` checkpoint. --signal=B:USR1@120 (to the batch
# shell, which launch.sh forwards to the tasks) and `scancel -s USR1 [--batch] JOB` end the same way.
# --open-mode=append keeps the output of every start of a requeued job in one file.
export NODES=${NODES:-1} TASKS_PER_NODE=${TASKS_PER_NODE:-2}  # for DRY_RUN=1 outside Slurm
export LAUNCH_DEVICE=${LAUNCH_DEVICE:-cpu}
home=${MEGATRON_QWEN2_HOME:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "$0")/.." && pwd)}}
export RUN_DIR=${RUN_DIR:-${RUN_ROOT:-$HOME/runs}/cpu_tiny}
exec bash "$home/slurm/launch.sh" cpu_tiny "$@"
