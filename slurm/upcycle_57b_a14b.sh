#!/bin/bash
#SBATCH --job-name=qwen2-57b-a14b-upcycle
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --signal=USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
# Dense-to-MoE continued pretraining, as the Qwen2 report built 57B-A14B from 7B: upcycle a dense
# native checkpoint once (64 experts of FFN 2560, top-8, shared expert 20480, half of each expert
# re-initialised), then train it with the 57b_a14b recipe (conf/experiment/57b_a14b.yaml).
#   DENSE_CKPT=ckpt/qwen2_7b sbatch slurm/upcycle_57b_a14b.sh [hydra overrides]
# Stop signals: --signal=USR1@600 (use this) sends USR1 to the training tasks ten minutes before the
# time limit; they save at the next step boundary and stop (exit 75), and the launcher requeues the
# job, which resumes from the run directory's `latest` checkpoint. --signal=B:USR1@600 (to the batch
# shell, which launch.sh forwards to the tasks) and `scancel -s USR1 [--batch] JOB` end the same way.
# --open-mode=append keeps the output of every start of a requeued job in one file.
# DENSE_CKPT: a native checkpoint (tools/convert_checkpoint.py hf-to-native, or a run's checkpoints/).
# UPCYCLED_CKPT (default RUN_DIR/upcycled) is written once and reused; requeued jobs resume from
# the run's own checkpoints (resume wins over train.init_from). UPCYCLE_SEED (default 0);
# UPCYCLE_ARGS replaces the expert geometry arguments of tools/upcycle.py (other shapes, tests).
# The model fields of the training run are read from the upcycled checkpoint, so the dense model's
# vocabulary and context length carry over.
export NODES=${NODES:-8} TASKS_PER_NODE=${TASKS_PER_NODE:-8}  # for DRY_RUN=1 outside Slurm
home=${MEGATRON_QWEN2_HOME:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "$0")/.." && pwd)}}
export RUN_DIR=${RUN_DIR:-${RUN_ROOT:-$HOME/runs}/upcycle_57b_a14b}
upcycled=${UPCYCLED_CKPT:-$RUN_DIR/upcycled}
python=${PYTHON:-python3}
recipe="--num-experts 64 --top-k 8 --expert-ffn-size 2560 --shared-expert-ffn-size 20480 --reinit-fraction 0.5"
model_overrides=()
if [ "${DRY_RUN:-0}" = 1 ] && [ ! -f "$upcycled/model_config.json" ]; then
  echo "# dry run: would upcycle ${DENSE_CKPT:-\$DENSE_CKPT} into $upcycled, then train from it"
else
  if [ -n "${SETUP_ENV:-}" ]; then eval "$SETUP_ENV"; fi
  cd "$home" || exit 2
  if [ ! -f "$upcycled/model_config.json" ]; then
    : "${DENSE_CKPT:?set DENSE_CKPT to the dense native checkpoint to upcycle}"
    # shellcheck disable=SC2086
    "$python" tools/upcycle.py --input "$DENSE_CKPT" --output "$upcycled" ${UPCYCLE_ARGS:-$recipe} \
      --seed "${UPCYCLE_SEED:-0}" --no-progress || exit 2
  fi
  fields=$("$python" - "$upcycled" <<'PY'
import dataclasses, json, sys
from megatron_qwen2.checkpoint import load_model_config
for key, value in dataclasses.asdict(load_model_config(sys.argv[1])).items():
    if key != "name":
        print(f"++model.{key}=" + json.dumps(value, separators=(",", ":")))
PY
) || exit 2
  mapfile -t model_overrides <<< "$fields"
fi
exec bash "$home/slurm/launch.sh" 57b_a14b "${model_overrides[@]}" "train.init_from=$upcycled" "$@"
