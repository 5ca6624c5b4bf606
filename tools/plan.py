"""Memory and step-time plan of a training layout (megatron_qwen2/planner.py).

    python tools/plan.py model=qwen2_72b parallel.tp=8 parallel.pp=4 parallel.vpp=5 \
        train.micro_batch_size=1 train.global_batch_size=512 train.seq_length=4096 train.dtype=bf16 \
        parallel.distributed_optimizer=true train.recompute=selective --gpus 256 --gpu h100-80gb

Exit status: 0 fits, 1 does not fit the GPU's memory, 2 invalid layout (the validation error printed).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def compose(overrides: list[str], world_size: int):
    """The training config exactly as `python -m megatron_qwen2.train` would resolve it."""
    from hydra import compose as hydra_compose, initialize_config_dir

    from megatron_qwen2.config import resolve_config

    with initialize_config_dir(config_dir=CONF, version_base=None):
        return resolve_config(hydra_compose(config_name="config", overrides=overrides), world_size)


def main(argv: list[str] | None = None) -> int:
    from megatron_qwen2.planner import DEFAULT_EFFICIENCY, GPUS, format_plan, make_plan

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the training config")
    parser.add_argument("--gpus", type=int, required=True, help="world size")
    parser.add_argument("--gpu", default="h100-80gb", choices=sorted(GPUS))
    parser.add_argument("--efficiency", type=float, default=DEFAULT_EFFICIENCY,
                        help="achieved share of the bf16 peak for the step-time estimate (default: measured "
                             "in bench/results/tp_step_tp2_micro16_h200_2026-11-23.json)")
    args = parser.parse_intermixed_args(argv)
    try:
        cfg = compose(args.overrides, args.gpus)
        plan = make_plan(cfg, args.gpus, args.gpu, args.efficiency)
    except Exception as err:  # noqa: BLE001 - a validation error (ValueError or OmegaConf's) is the answer
        print(f"INVALID LAYOUT: {err}")
        return 2
    print(format_plan(plan))
    if not plan.fits:
        print(f"\nDOES NOT FIT: rank {plan.worst.pp_rank} needs {plan.worst.total / 2**30:.1f} GiB, "
              f"{plan.gpu} has {plan.capacity_bytes / 2**30:.1f} GiB usable")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
