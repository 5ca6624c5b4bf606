"""Tensor-parallel layers. Each says in its type how it splits and what it communicates.

Every sharded parameter carries `tp_split_dim` (the dimension cut across tp ranks), so
checkpointing can name the global tensor and this rank's offset in it (DESIGN principle 4).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from megatron_qwen2.parallel.mappings import copy_to_tp, reduce_from_tp


def _divide(n: int, d: int, what: str) -> int:
    if n % d != 0:
        raise ValueError(f"{what}={n} is not divisible by tp={d}")
    return n // d


def _group_size(group: Optional[dist.ProcessGroup]) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _sharded_param(shape: tuple[int, ...], split_dim: Optional[int]) -> nn.Parameter:
    p = nn.Parameter(torch.empty(shape))
    p.tp_split_dim = split_dim
    return p


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W split along its output rows; the input is shared by all tp ranks.

    `stack` > 1 keeps several projections fused in one weight of shape
    [stack, out/tp, in] (e.g. SwiGLU's [gate | up]); each rank holds its slice of every
    one of them, and the output is laid out [..., stack * out/tp].
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, group=None, stack: int = 1):
        super().__init__()
        tp = _group_size(group)
        self.group = group
        self.stack = stack
        out_local = _divide(out_features, tp, "output features")
        shape = (out_local, in_features) if stack == 1 else (stack, out_local, in_features)
        self.weight = _sharded_param(shape, split_dim=0 if stack == 1 else 1)
        if bias:
            bshape = (out_local,) if stack == 1 else (stack, out_local)
            self.bias = _sharded_param(bshape, split_dim=0 if stack == 1 else 1)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = copy_to_tp(x, self.group)
        w = self.weight.reshape(-1, self.weight.shape[-1])
        b = None if self.bias is None else self.bias.reshape(-1)
        return F.linear(x, w, b)


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W split along its input columns; partial sums all-reduced over tp."""

    def __init__(self, in_features: int, out_features: int, bias: bool, group=None):
        super().__init__()
        tp = _group_size(group)
        self.group = group
        self.weight = _sharded_param((out_features, _divide(in_features, tp, "input features")), split_dim=1)
        if bias:
            self.bias = _sharded_param((out_features,), split_dim=None)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = reduce_from_tp(F.linear(x, self.weight), self.group)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Embedding table split by vocabulary rows; each rank looks up its rows, then all-reduce."""

    def __init__(self, num_embeddings: int, embedding_dim: int, group=None):
        super().__init__()
        tp = _group_size(group)
        self.group = group
        self.rows_per_rank = _divide(num_embeddings, tp, "vocab size")
        self.vocab_start = (0 if group is None else dist.get_rank(group)) * self.rows_per_rank
        self.weight = _sharded_param((self.rows_per_rank, embedding_dim), split_dim=0)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.group is None:
            return F.embedding(ids, self.weight)
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.rows_per_rank)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tp(out, self.group)
