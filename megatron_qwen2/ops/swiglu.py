"""Fused SwiGLU door: the csrc kernel (custom op megatron_qwen2::swiglu) for CUDA tensors when built, else the reference."""

import torch

from megatron_qwen2.ops import extension, library, reference


def swiglu(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2f] laid out [gate | up] -> silu(gate) * up [..., f]."""
    if extension.use_kernel(x):
        return library.swiglu(x.contiguous())
    return reference.swiglu(x)
