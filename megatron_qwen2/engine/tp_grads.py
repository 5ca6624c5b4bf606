"""Gradient fix-ups inside the tensor-parallel group, done once per step before clipping.

Two kinds of parameters are replicated over tp yet receive only part of their gradient on
each rank (their `Shard`, parallel/shard.py, says which): those that see only this rank's tokens
under sequence parallelism (norm weights, the row-parallel bias: `grad_needs_tp_sum`), and the k/v
rows of a fused QKV weight that several tp ranks share when tp exceeds the number of kv heads
(`kv_replica`). Both are summed here.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.distributed as dist

from megatron_qwen2.engine.grad_buffer import grad_of
from megatron_qwen2.parallel.shard import KvReplica, shard_of


def sync_tp_grads(params: Iterable[torch.nn.Parameter], group: Optional[dist.ProcessGroup]) -> None:
    """Sum partial gradients of tp-replicated parameters over the tp group (coalesced)."""
    if group is None:
        return
    params = [p for p in params if grad_of(p) is not None]
    partial = [grad_of(p) for p in params if shard_of(p).grad_needs_tp_sum]
    if partial:
        flat = torch.cat([g.reshape(-1) for g in partial])
        dist.all_reduce(flat, group=group)
        for g, chunk in zip(partial, flat.split([g.numel() for g in partial])):
            g.copy_(chunk.view_as(g))
    for p in params:
        replica = shard_of(p).kv_replica
        if replica is not None:
            _sum_kv_replicas(grad_of(p), replica, group)


def _sum_kv_replicas(grad: torch.Tensor, replica: KvReplica, group) -> None:
    # Each rank writes its k/v rows into the slot of its kv head; the all-reduce sums the
    # ranks that share a slot and leaves zeros from the others.
    rows = slice(replica.rows.start, replica.rows.stop)
    buf = grad.new_zeros((replica.num_heads, len(replica.rows)) + tuple(grad.shape[1:]))
    buf[replica.head] = grad[rows]
    dist.all_reduce(buf, group=group)
    grad[rows] = buf[replica.head]
