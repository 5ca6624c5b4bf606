"""RMSNorm module over the `ops.rms_norm` door."""

import torch
import torch.nn as nn

from megatron_qwen2 import ops
from megatron_qwen2.parallel.shard import Shard, set_shard


class RMSNorm(nn.Module):
    """HF Qwen2RMSNorm. Under sequence parallelism it sees only this rank's tokens, so its
    weight gradient is partial and is summed over tp before the step."""

    def __init__(self, hidden_size: int, eps: float, sequence_parallel: bool = False):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))
        set_shard(self.weight, Shard(grad_needs_tp_sum=sequence_parallel))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(residual + x), residual + x): the residual add fused into the norm (one pass)."""
        return ops.add_rms_norm(x, residual, self.weight, self.eps)
