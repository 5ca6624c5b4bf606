"""Process-group start-up from the torchrun / Slurm environment."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist


def init_distributed(device_type: str) -> tuple[int, int]:
    """Join the default process group when launched with WORLD_SIZE > 1; returns (world size, rank).

    NCCL on CUDA (each process on its LOCAL_RANK device), gloo on the CPU.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(minutes=int(os.environ.get("DIST_TIMEOUT_MIN", "30"))))
    return world_size, rank
