"""Grouped-query self-attention with a fused QKV projection laid out by kv group."""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn as nn

from megatron_qwen2 import ops
from megatron_qwen2.config import ModelConfig
from megatron_qwen2.ops.fp8 import Fp8, Fp8Input
from megatron_qwen2.parallel.cp import ContextParallelRing, ring_attention
from megatron_qwen2.parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron_qwen2.parallel.shard import KvReplica
from megatron_qwen2.parallel.topology import Topology


def replicated_kv_rows(cfg: ModelConfig, tp: int, tp_rank: int) -> tuple[tuple[int, ...], int]:
    """Global QKV rows held by `tp_rank` when tp > kv heads, and the kv head it shares.

    Each kv head is replicated on tp / num_kv_heads consecutive ranks; each of those ranks
    holds a distinct slice of that head's query heads plus the whole k and v of the head.
    """
    d, nkv = cfg.kv_channels, cfg.num_kv_heads
    g = cfg.num_attention_heads // nkv
    replicas = tp // nkv
    kv_head, part = divmod(tp_rank, replicas)
    q_local = g // replicas
    group_start = kv_head * (g + 2) * d
    q_rows = range(group_start + part * q_local * d, group_start + (part + 1) * q_local * d)
    kv_rows = range(group_start + g * d, group_start + (g + 2) * d)
    return tuple(q_rows) + tuple(kv_rows), kv_head


class SelfAttention(nn.Module):
    """QKV (column-parallel) -> RoPE -> causal GQA -> output projection (row-parallel).

    The fused QKV weight has rows ordered by kv group: for each kv head j, its q_per_kv query
    heads, then k_j, then v_j. Splitting the rows across tp ranks therefore hands each rank
    whole groups, and the query heads of a rank only read the kv heads it holds. With more
    tp ranks than kv heads, each rank holds one kv head (shared with tp / kv_heads - 1 other
    ranks, whose k/v gradients are summed by `sync_tp_grads`) and a slice of its query heads.

    With context parallelism (cp > 1) the sequence is this cp rank's share (chunks r and 2cp-1-r
    of the row, parallel/cp.py) and attention is ring attention over the cp group: this rank's
    K/V (its kv heads) travel round the ring; the queries stay.
    """

    def __init__(self, cfg: ModelConfig, topo: Topology, fp8: Optional[Fp8] = None):
        super().__init__()
        tp, tp_group, sp = topo.tp, topo.groups.tp, topo.sequence_parallel
        nq, nkv = cfg.num_attention_heads, cfg.num_kv_heads
        self.head_dim = d = cfg.kv_channels
        self.kv_heads_local = max(nkv // tp, 1)
        self.q_per_kv = (nq // tp) // self.kv_heads_local  # query heads per local kv head
        self.softmax_scale = d ** -0.5
        qkv_out = (nq + 2 * nkv) * d
        rows: Optional[tuple[int, ...]] = None
        replica: Optional[KvReplica] = None
        if tp > nkv:  # the last 2 * d local rows are the k and v of the shared kv head
            rows, kv_head = replicated_kv_rows(cfg, tp, topo.tp_rank)
            replica = KvReplica(kv_head, nkv, range(len(rows) - 2 * d, len(rows)))
        self.qkv = ColumnParallelLinear(cfg.hidden_size, qkv_out, bias=cfg.qkv_bias, group=tp_group,
                                        sequence_parallel=sp, local_rows=rows, kv_replica=replica, fp8=fp8)
        self.out = RowParallelLinear(nq * d, cfg.hidden_size, bias=False, group=tp_group, sequence_parallel=sp,
                                     fp8=fp8)
        self.cp_ring = ContextParallelRing.from_topology(topo)  # None when cp == 1

    def forward(self, x: Union[torch.Tensor, Fp8Input], cos: torch.Tensor, sin: torch.Tensor,
                document_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [s, b, h] (or its `Fp8Input` for the FP8 QKV projection) -> [s, b, h] (both [s/tp, b, h] with
        sequence parallelism).

        document_ids [b, s] (the full sequence, gathered over sp): attention stays inside each
        packed document. With cp > 1, s is this cp rank's share of the row and document_ids are
        the ids of those tokens; cos/sin belong to the same tokens.
        """
        qkv = self.qkv(x)  # [s, b, local heads * d]: the full sequence either way
        s, b = qkv.shape[:2]
        g = self.q_per_kv
        qkv = qkv.view(s, b, self.kv_heads_local, g + 2, self.head_dim)
        q = qkv[:, :, :, :g].reshape(s, b, self.kv_heads_local * g, self.head_dim)
        k, v = qkv[:, :, :, g], qkv[:, :, :, g + 1]
        q, k = ops.rope(q, cos, sin), ops.rope(k, cos, sin)
        # The door and the ring take [b, s, heads, d]; transposed views, no copies.
        if self.cp_ring is not None:
            o = ring_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), self.cp_ring,
                               softmax_scale=self.softmax_scale, document_ids=document_ids)
        else:
            o = ops.attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                              causal=True, softmax_scale=self.softmax_scale, document_ids=document_ids)
        return self.out(o.transpose(0, 1).reshape(s, b, -1))
