"""Fused SwiGLU door: the csrc kernel for CUDA tensors when built, else the reference."""

import torch
from torch.autograd.function import once_differentiable

from megatron_qwen2.ops import extension, reference

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class _SwiGLUKernel(torch.autograd.Function):
    """Forward and backward in one pass over memory each; saves only the input."""

    @staticmethod
    def forward(ctx, x):
        x = x.contiguous()
        ctx.save_for_backward(x)
        return extension.load().swiglu_forward(x)

    @staticmethod
    @once_differentiable  # the kernel's backward has no graph: a second derivative must fail loudly
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        return extension.load().swiglu_backward(x, dy.contiguous())


def swiglu(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2f] laid out [gate | up] -> silu(gate) * up [..., f]."""
    if x.is_cuda and x.dtype in _KERNEL_DTYPES and extension.load() is not None:
        return _SwiGLUKernel.apply(x)
    return reference.swiglu(x)
