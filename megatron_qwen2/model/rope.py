"""Rotary position embedding frequencies (HF conventions: default, linear and YaRN)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from megatron_qwen2.config import ModelConfig


def inverse_frequencies(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Per-pair inverse frequencies [head_dim/2] and the cos/sin scale (YaRN's attention factor)."""
    dim, base = cfg.kv_channels, cfg.rope_theta
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    if cfg.rope_scaling_type is None:
        return 1.0 / pos_freqs, 1.0
    factor = cfg.rope_scaling_factor
    if cfg.rope_scaling_type == "linear":
        return 1.0 / (pos_freqs * factor), 1.0
    # YaRN: interpolate the low frequencies, keep the high ones, ramp between.
    original = cfg.rope_original_max_position_embeddings or cfg.max_position_embeddings
    attention_factor = 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(32)), 0)
    high = min(math.ceil(correction_dim(1)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (original frequency), 0: interpolate (divided by factor)
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep
    return inv_freq, attention_factor


class RotaryEmbedding(nn.Module):
    """cos/sin tables for given positions, computed in fp32 then cast to the compute dtype."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        inv_freq, self.scale = inverse_frequencies(cfg)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [s, b] -> cos, sin [s, b, 1, head_dim] (broadcast over heads)."""
        freqs = position_ids[..., None].float() * self.inv_freq.to(position_ids.device)
        emb = torch.cat((freqs, freqs), dim=-1).unsqueeze(2)
        return (emb.cos() * self.scale).to(dtype), (emb.sin() * self.scale).to(dtype)
