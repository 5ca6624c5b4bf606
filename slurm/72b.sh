#!/bin/bash
#SBATCH --job-name=qwen2-72b
#SBATCH --nodes=16
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --signal=USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
# qwen2_72b: the recipe conf/experiment/72b.yaml (layout and memory estimate there).
#   sbatch slurm/72b.sh [hydra overrides, e.g. train.steps=1000 data.corpus=/data/shards/*.txt]
# Stop signals: --signal=USR1@600 (use this) sends USR1 to the training tasks ten minutes before the
# time limit; they save at the next step boundary and stop (exit 75), and the launcher requeues the
# job, which resumes from the run directory's `latest` checkpoint. --signal=B:USR1@600 (to the batch
# shell, which launch.sh forwards to the tasks) and `scancel -s USR1 [--batch] JOB` end the same way.
# --open-mode=append keeps the output of every start of a requeued job in one file.
export NODES=${NODES:-16} TASKS_PER_NODE=${TASKS_PER_NODE:-8}  # for DRY_RUN=1 outside Slurm
exec bash "${MEGATRON_QWEN2_HOME:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "$0")/.." && pwd)}}/slurm/launch.sh" 72b "$@"
