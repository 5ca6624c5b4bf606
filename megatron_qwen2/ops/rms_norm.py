"""RMSNorm doors: plain, and fused with the residual add before it (custom ops megatron_qwen2::rms_norm,
megatron_qwen2::add_rms_norm on CUDA when built, else the reference); and both with the output handed to
an FP8 linear layer already quantised (megatron_qwen2::rms_norm_fp8; docs/architecture.md, "FP8")."""

from typing import Optional

import torch

from megatron_qwen2.ops import extension, library, reference
from megatron_qwen2.ops.fp8 import (Fp8Input, Fp8Recipe, operand_list, operands_of, padded, quantize_input,
                                    quantized_by_kernels, stand_in_for)


def _check(x: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor) -> None:
    if residual is not None and x.shape != residual.shape:
        raise ValueError(f"residual has shape {tuple(residual.shape)}, expected x's {tuple(x.shape)}")
    if weight.shape != x.shape[-1:]:
        raise ValueError(f"weight has shape {tuple(weight.shape)}, expected ({x.shape[-1]},)")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = weight * round(x / sqrt(mean(x^2) + eps)) over the last dimension, statistics in fp32."""
    _check(x, None, weight)
    if extension.use_kernel(x, weight):
        y, _ = library.rms_norm(x.reshape(-1, x.shape[-1]).contiguous(), weight.contiguous(), float(eps))
        return y.view(x.shape)
    return reference.rms_norm(x, weight, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual) in one pass: the pre-norm block's add and norm fused."""
    _check(x, residual, weight)
    if extension.use_kernel(x, residual, weight):
        h = x.shape[-1]
        y, _, s = library.add_rms_norm(x.reshape(-1, h).contiguous(), residual.reshape(-1, h).contiguous(),
                                       weight.contiguous(), float(eps))
        return y.view(x.shape), s.view(x.shape)
    return reference.add_rms_norm(x, residual, weight, eps)


class _RmsNormFp8(torch.autograd.Function):
    """rms_norm(x (+ residual)) [..., h] as an FP8 linear layer's operands by the compiled kernels, y
    never written (csrc/rms_norm.cu): returns y's stand-in, (x + residual,) then `operand_list`.
    Backward: the norm's, from the gradient arriving at the stand-in, as add_rms_norm's."""

    @staticmethod
    def forward(ctx, x, residual, weight, eps: float, rcp: Fp8Recipe):
        ctx.set_materialize_grads(False)
        h, tiling = x.shape[-1], rcp.activation_tiling
        x2 = x.reshape(-1, h).contiguous()
        r2 = None if residual is None else residual.reshape(-1, h).contiguous()
        out = library.rms_norm_fp8(x2, r2, weight.contiguous(), float(eps), tiling,
                                   padded(x2.shape[0], rcp.token_multiple))
        q, t, rest = operands_of(out, tiling)
        s = x2 if residual is None else rest[1]
        ctx.save_for_backward(s, weight, rest[0])
        ctx.x_shape, ctx.has_residual = x.shape, residual is not None
        operands = operand_list(q, t)
        ctx.mark_non_differentiable(*operands)
        sums = [] if residual is None else [s.view(x.shape)]
        return (stand_in_for(x.shape, x), *sums, *operands)

    @staticmethod
    def backward(ctx, dy, *grads):
        s, weight, rstd = ctx.saved_tensors
        dsum = grads[0] if ctx.has_residual else None
        h = s.shape[-1]
        dy = torch.zeros_like(s) if dy is None else dy.reshape(-1, h).contiguous()
        dsum = None if dsum is None else dsum.reshape(-1, h).contiguous()
        ds, dw = library.rms_norm_backward(dy, s, weight, rstd, dsum)
        ds = ds.view(ctx.x_shape)
        return ds, (ds if ctx.has_residual else None), dw, None, None


def rms_norm_fp8(x: torch.Tensor, weight: torch.Tensor, eps: float, rcp: Fp8Recipe) -> Fp8Input:
    """rms_norm(x) as the input of an FP8 linear layer under `rcp`: quantize_input(rms_norm(x), rcp),
    whose values the compiled kernels give without writing y where they run."""
    _check(x, None, weight)
    if not quantized_by_kernels(rcp, x, weight):
        return quantize_input(rms_norm(x, weight, eps), rcp)
    stand_in, *operands = _RmsNormFp8.apply(x, None, weight, eps, rcp)
    q, t, _ = operands_of(operands, rcp.activation_tiling)
    return Fp8Input(stand_in, q, t)


def add_rms_norm_fp8(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                     rcp: Fp8Recipe) -> tuple[Fp8Input, torch.Tensor]:
    """add_rms_norm with the norm's output as `rms_norm_fp8` gives it, and x + residual."""
    _check(x, residual, weight)
    if not quantized_by_kernels(rcp, x, residual, weight):
        y, s = add_rms_norm(x, residual, weight, eps)
        return quantize_input(y, rcp), s
    stand_in, s, *operands = _RmsNormFp8.apply(x, residual, weight, eps, rcp)
    q, t, _ = operands_of(operands, rcp.activation_tiling)
    return Fp8Input(stand_in, q, t), s
