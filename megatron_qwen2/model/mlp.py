"""SwiGLU feed-forward block: fused [gate | up] projection, ops.swiglu, down projection."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from megatron_qwen2 import ops
from megatron_qwen2.ops.fp8 import Fp8
from megatron_qwen2.parallel.layers import ColumnParallelLinear, RowParallelLinear


class MLP(nn.Module):
    """down(silu(gate(x)) * up(x)); gate and up live in one weight [2, ffn, hidden]."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int, tp_group=None, sequence_parallel: bool = False,
                 fp8: Optional[Fp8] = None):
        super().__init__()
        self.gate_up = ColumnParallelLinear(hidden_size, ffn_hidden_size, bias=False, group=tp_group, stack=2,
                                            sequence_parallel=sequence_parallel, fp8=fp8)
        self.down = RowParallelLinear(ffn_hidden_size, hidden_size, bias=False, group=tp_group,
                                      sequence_parallel=sequence_parallel, fp8=fp8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(ops.swiglu(self.gate_up(x)))
