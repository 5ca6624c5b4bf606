"""Rotary position embedding door."""

import torch

from megatron_qwen2.ops import reference


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply rotate-half RoPE to x [..., head_dim] with cos/sin broadcastable to x."""
    return reference.rope(x, cos, sin)
