"""Process-group start-up from the torchrun / Slurm environment."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist


DEFAULT_TIMEOUT_MIN = 30.0  # a collective waiting longer than this fails (DIST_TIMEOUT_MIN overrides)


def init_distributed(device_type: str, min_timeout_min: float = 0.0) -> tuple[int, int]:
    """Join the default process group when launched with WORLD_SIZE > 1; returns (world size, rank).

    NCCL on CUDA (each process on its LOCAL_RANK device), gloo on the CPU. A collective fails
    after DIST_TIMEOUT_MIN minutes (default DEFAULT_TIMEOUT_MIN), or `min_timeout_min` if longer.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        timeout_min = max(float(os.environ.get("DIST_TIMEOUT_MIN", DEFAULT_TIMEOUT_MIN)), min_timeout_min)
        dist.init_process_group(backend, timeout=timedelta(minutes=timeout_min))
    return world_size, rank
