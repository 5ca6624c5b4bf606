"""Learning-rate schedules (the optimizer itself is engine/distributed_optimizer.py)."""

from __future__ import annotations

import math

from megatron_qwen2.config import OptimConfig


def learning_rate(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """lr for 0-based `step`: linear warm-up to cfg.lr, then cosine/linear decay to min_lr_ratio*lr.

    The decay lasts cfg.decay_steps steps, by default the rest of the run, so that the last step
    (total_steps - 1) trains at exactly min_lr_ratio * lr (Qwen2: cosine to 10%; SFT 7e-6 -> 7e-7).
    A function of the step alone: a resumed run continues the same curve.
    """
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    decay_steps = cfg.decay_steps or max(total_steps - 1 - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / decay_steps, 1.0)
    min_lr = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "linear":
        return cfg.lr - (cfg.lr - min_lr) * progress
    return min_lr + (cfg.lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
