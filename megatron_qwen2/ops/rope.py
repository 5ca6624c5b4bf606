"""Rotary position embedding door (custom op megatron_qwen2::rope on CUDA when built, else the reference).

cos/sin are the tables for the positions given (model/rope.py builds them from position ids, so
packed documents and context-parallel shards and YaRN scaling are all in the tables); the kernel
reads them through broadcasting strides and never expands them.
"""

import torch

from megatron_qwen2.ops import extension, library, reference


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply rotate-half RoPE to x [..., head_dim] with cos/sin broadcastable to x."""
    if (x.dim() <= 4 and cos.dim() <= 4 and sin.dim() <= 4 and x.shape[-1] % 2 == 0
            and not cos.requires_grad and not sin.requires_grad and x.numel() > 0
            and torch.broadcast_shapes(x.shape, cos.shape, sin.shape) == x.shape
            and x.stride(-1) == 1 and extension.use_kernel(x, cos, sin)):
        x4 = x
        while x4.dim() < 4:
            x4 = x4.unsqueeze(0)
        c4, s4 = cos, sin
        while c4.dim() < 4:
            c4 = c4.unsqueeze(0)
        while s4.dim() < 4:
            s4 = s4.unsqueeze(0)
        if c4.stride(-1) == 1 and s4.stride(-1) == 1:
            return library.rope(x4, c4, s4).view(x.shape)
    return reference.rope(x, cos, sin)
