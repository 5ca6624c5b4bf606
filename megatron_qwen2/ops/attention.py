"""Attention door: GQA causal attention on [b, s, h, d] tensors (strided views allowed)."""

import torch

from megatron_qwen2.ops import reference


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
              softmax_scale: float | None = None) -> torch.Tensor:
    """q [b, s, hq, d], k/v [b, s, hkv, d] with hq % hkv == 0 -> [b, s, hq, d]."""
    return reference.attention(q, k, v, causal=causal, softmax_scale=softmax_scale)
