"""RMSNorm module over the `ops.rms_norm` door."""

from typing import Optional, Union

import torch
import torch.nn as nn

from megatron_qwen2 import ops
from megatron_qwen2.ops.fp8 import Fp8Input, Fp8Recipe
from megatron_qwen2.parallel.shard import Shard, set_shard


class RMSNorm(nn.Module):
    """HF Qwen2RMSNorm. Under sequence parallelism it sees only this rank's tokens, so its
    weight gradient is partial and is summed over tp before the step.

    `fp8_out`: the recipe of the FP8 linear layer that takes this norm's output and nothing else,
    with nothing between them; the output then comes quantised for it (`Fp8Input`,
    `ops.rms_norm_fp8`)."""

    def __init__(self, hidden_size: int, eps: float, sequence_parallel: bool = False,
                 fp8_out: Optional[Fp8Recipe] = None):
        super().__init__()
        self.eps = eps
        self.fp8_out = fp8_out
        self.weight = nn.Parameter(torch.ones(hidden_size))
        set_shard(self.weight, Shard(grad_needs_tp_sum=sequence_parallel))

    def forward(self, x: torch.Tensor) -> Union[torch.Tensor, Fp8Input]:
        if self.fp8_out is not None:
            return ops.rms_norm_fp8(x, self.weight, self.eps, self.fp8_out)
        return ops.rms_norm(x, self.weight, self.eps)

    def add_forward(self, x: torch.Tensor,
                    residual: torch.Tensor) -> tuple[Union[torch.Tensor, Fp8Input], torch.Tensor]:
        """(norm(residual + x), residual + x): the residual add fused into the norm (one pass)."""
        if self.fp8_out is not None:
            return ops.add_rms_norm_fp8(x, residual, self.weight, self.eps, self.fp8_out)
        return ops.add_rms_norm(x, residual, self.weight, self.eps)
