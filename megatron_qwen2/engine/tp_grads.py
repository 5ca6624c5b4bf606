"""Gradient fix-ups inside the tensor-parallel group, done once per step before clipping.

Two kinds of parameters are replicated over tp yet receive only part of their gradient on
each rank: those that see only this rank's tokens under sequence parallelism (norm weights,
marked `tp_partial_grad`), and the k/v rows of a fused QKV weight that several tp ranks
share when tp exceeds the number of kv heads (marked `tp_kv_replica`). Both are summed here.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.distributed as dist


def grad_of(p: torch.nn.Parameter) -> Optional[torch.Tensor]:
    """The gradient the optimizer will use: the fp32 main grad when there is one."""
    g = getattr(p, "main_grad", None)
    return p.grad if g is None else g


def sync_tp_grads(params: Iterable[torch.nn.Parameter], group: Optional[dist.ProcessGroup]) -> None:
    """Sum partial gradients of tp-replicated parameters over the tp group (coalesced)."""
    if group is None:
        return
    params = [p for p in params if grad_of(p) is not None]
    partial = [grad_of(p) for p in params if getattr(p, "tp_partial_grad", False)]
    if partial:
        flat = torch.cat([g.reshape(-1) for g in partial])
        dist.all_reduce(flat, group=group)
        for g, chunk in zip(partial, flat.split([g.numel() for g in partial])):
            g.copy_(chunk.view_as(g))
    for p in params:
        replica = getattr(p, "tp_kv_replica", None)
        if replica is not None:
            _sum_kv_replicas(grad_of(p), replica, group)


def _sum_kv_replicas(grad: torch.Tensor, replica, group) -> None:
    # Each rank writes its k/v rows into the slot of its kv head; the all-reduce sums the
    # ranks that share a slot and leaves zeros from the others.
    slot, num_slots, rows = replica
    buf = grad.new_zeros((num_slots, len(rows)) + tuple(grad.shape[1:]))
    buf[slot] = grad[rows]
    dist.all_reduce(buf, group=group)
    grad[rows] = buf[slot]
