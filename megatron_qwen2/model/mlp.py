"""SwiGLU feed-forward block: fused [gate | up] projection, ops.swiglu, down projection."""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn as nn

from megatron_qwen2 import ops
from megatron_qwen2.ops.fp8 import Fp8, Fp8Input, fused_recipe
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
        # SwiGLU hands its output quantised to the FP8 down projection, which takes it as it is under
        # any layout (docs/architecture.md, "FP8").
        self.fp8_out = fused_recipe(fp8)

    def forward(self, x: Union[torch.Tensor, Fp8Input]) -> torch.Tensor:
        h = self.gate_up(x)
        return self.down(ops.swiglu(h) if self.fp8_out is None else ops.swiglu_fp8(h, self.fp8_out))
