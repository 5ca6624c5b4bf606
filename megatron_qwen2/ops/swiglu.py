"""Fused SwiGLU door: the csrc kernel (custom op megatron_qwen2::swiglu) for CUDA tensors when built, else the
reference; and with the output handed to an FP8 linear layer already quantised (megatron_qwen2::swiglu_fp8;
docs/architecture.md, "FP8")."""

import functools

import torch

from megatron_qwen2.ops import extension, library, reference
from megatron_qwen2.ops.fp8 import (Fp8Input, Fp8Recipe, Fp8Tensor, operand_list, operands_of, padded,
                                    quantize_input, quantized_by_kernels, stand_in_for)


def swiglu(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2f] laid out [gate | up] -> silu(gate) * up [..., f]."""
    if extension.use_kernel(x):
        return library.swiglu(x.contiguous())
    return reference.swiglu(x)


class _SwigluFp8(torch.autograd.Function):
    """swiglu(x) [..., f] as an FP8 linear layer's operands by the compiled kernels, y never written
    (csrc/swiglu.cu): returns y's stand-in then `operand_list`. Backward: swiglu's."""

    @staticmethod
    def forward(ctx, x, rcp: Fp8Recipe):
        f, tiling = x.shape[-1] // 2, rcp.activation_tiling
        x2 = x.reshape(-1, 2 * f).contiguous()
        q, t, _ = operands_of(library.swiglu_fp8(x2, tiling, padded(x2.shape[0], rcp.token_multiple)), tiling)
        ctx.save_for_backward(x2)
        ctx.x_shape = x.shape
        operands = operand_list(q, t)
        ctx.mark_non_differentiable(*operands)
        return (stand_in_for(x.shape[:-1] + (f,), x), *operands)

    @staticmethod
    def backward(ctx, dy, *_):
        (x,) = ctx.saved_tensors
        return library.swiglu_backward(x, dy.reshape(x.shape[0], -1).contiguous()).view(ctx.x_shape), None


def _remade_t(x: torch.Tensor, rcp: Fp8Recipe) -> Fp8Tensor:
    """The x^T operand of swiglu_fp8(x, rcp), made again from x (bit for bit: the same op on the same x)."""
    return swiglu_fp8(x, rcp).t


def swiglu_fp8(x: torch.Tensor, rcp: Fp8Recipe) -> Fp8Input:
    """swiglu(x) as the input of an FP8 linear layer under `rcp`: quantize_input(swiglu(x), rcp), whose
    values the compiled kernels give without writing y where they run. The layer remakes the x^T
    operand from x in its backward (`Fp8Input.remake_t`): x is kept for SwiGLU's own backward, and
    the 1 byte per element of x^T is not held between the passes."""
    if x.shape[-1] % 2:
        raise ValueError(f"swiglu takes [..., 2f], got last dimension {x.shape[-1]}")
    remake = (x, functools.partial(_remade_t, rcp=rcp))
    if not quantized_by_kernels(rcp, x):
        xin = quantize_input(swiglu(x), rcp)
        return Fp8Input(xin.stand_in, xin.q, xin.t, remake_t=remake)
    stand_in, *operands = _SwigluFp8.apply(x, rcp)
    q, t, _ = operands_of(operands, rcp.activation_tiling)
    return Fp8Input(stand_in, q, t, remake_t=remake)
