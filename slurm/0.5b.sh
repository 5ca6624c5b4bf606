#!/bin/bash
#SBATCH --job-name=qwen2-0.5b
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --exclusive
#SBATCH --time=12:00:00
#SBATCH --signal=USR1@600
#SBATCH --requeue
#SBATCH --output=slurm-%x-%j.out
# qwen2_0.5b: the recipe conf/experiment/0.5b.yaml (layout and memory estimate there).
#   sbatch slurm/0.5b.sh [hydra overrides, e.g. train.steps=1000 data.corpus=/data/shards/*.txt]
# USR1 ten minutes before the time limit makes training save and stop; the launcher then requeues
# the job, which resumes from the run directory's `latest` checkpoint.
export NODES=${NODES:-1} TASKS_PER_NODE=${TASKS_PER_NODE:-8}  # for DRY_RUN=1 outside Slurm
exec bash "${MEGATRON_QWEN2_HOME:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "$0")/.." && pwd)}}/slurm/launch.sh" 0.5b "$@"
