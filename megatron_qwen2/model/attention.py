"""Grouped-query self-attention with a fused QKV projection laid out by kv group."""

from __future__ import annotations

import torch
import torch.nn as nn

from megatron_qwen2 import ops
from megatron_qwen2.config import ModelConfig
from megatron_qwen2.parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron_qwen2.parallel.topology import Topology


class SelfAttention(nn.Module):
    """QKV (column-parallel) -> RoPE -> causal GQA -> output projection (row-parallel).

    The fused QKV weight has rows ordered by kv group: for each kv head j, its q_per_kv query
    heads, then k_j, then v_j. Splitting the rows across tp ranks therefore hands each rank
    whole groups, and the query heads of a rank only read the kv heads it holds.
    """

    def __init__(self, cfg: ModelConfig, topo: Topology):
        super().__init__()
        tp_group = topo.group("tp")
        if cfg.num_kv_heads % topo.tp != 0:
            raise ValueError(f"model.num_kv_heads={cfg.num_kv_heads} is not divisible by parallel.tp={topo.tp}")
        self.head_dim = cfg.kv_channels
        self.q_per_kv = cfg.num_attention_heads // cfg.num_kv_heads
        self.kv_heads_local = cfg.num_kv_heads // topo.tp
        self.softmax_scale = self.head_dim ** -0.5
        qkv_out = (cfg.num_attention_heads + 2 * cfg.num_kv_heads) * self.head_dim
        self.qkv = ColumnParallelLinear(cfg.hidden_size, qkv_out, bias=cfg.qkv_bias, group=tp_group)
        self.out = RowParallelLinear(cfg.num_attention_heads * self.head_dim, cfg.hidden_size,
                                     bias=False, group=tp_group)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [s, b, h] -> [s, b, h]."""
        s, b, _ = x.shape
        g = self.q_per_kv
        qkv = self.qkv(x).view(s, b, self.kv_heads_local, g + 2, self.head_dim)
        q = qkv[:, :, :, :g].reshape(s, b, self.kv_heads_local * g, self.head_dim)
        k, v = qkv[:, :, :, g], qkv[:, :, :, g + 1]
        q, k = ops.rope(q, cos, sin), ops.rope(k, cos, sin)
        # The door takes [b, s, heads, d]; transposed views, no copies.
        o = ops.attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                          causal=True, softmax_scale=self.softmax_scale)
        return self.out(o.transpose(0, 1).reshape(s, b, -1))
