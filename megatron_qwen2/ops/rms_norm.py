"""RMSNorm doors: plain, and fused with the residual add before it (custom ops megatron_qwen2::rms_norm,
megatron_qwen2::add_rms_norm on CUDA when built, else the reference)."""

import torch

from megatron_qwen2.ops import extension, library, reference


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = weight * round(x / sqrt(mean(x^2) + eps)) over the last dimension, statistics in fp32."""
    if weight.shape != x.shape[-1:]:
        raise ValueError(f"weight has shape {tuple(weight.shape)}, expected ({x.shape[-1]},)")
    if extension.use_kernel(x, weight):
        y, _ = library.rms_norm(x.reshape(-1, x.shape[-1]).contiguous(), weight.contiguous(), float(eps))
        return y.view(x.shape)
    return reference.rms_norm(x, weight, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual) in one pass: the pre-norm block's add and norm fused."""
    if x.shape != residual.shape:
        raise ValueError(f"residual has shape {tuple(residual.shape)}, expected x's {tuple(x.shape)}")
    if weight.shape != x.shape[-1:]:
        raise ValueError(f"weight has shape {tuple(weight.shape)}, expected ({x.shape[-1]},)")
    if extension.use_kernel(x, residual, weight):
        h = x.shape[-1]
        y, _, s = library.add_rms_norm(x.reshape(-1, h).contiguous(), residual.reshape(-1, h).contiguous(),
                                       weight.contiguous(), float(eps))
        return y.view(x.shape), s.view(x.shape)
    return reference.add_rms_norm(x, residual, weight, eps)
