"""Attention door: GQA causal attention on [b, s, h, d] tensors (strided views allowed).

No attention kernel of the project's own yet: on CUDA the door takes the fastest installed one,
flash-attn (`flash_attn_func`, GQA without repeating K/V) when importable and the inputs suit it,
else PyTorch SDPA with the cuDNN backend first in priority (then flash, memory-efficient, math:
SDPA falls through to the next one that accepts the inputs). bench/kernels.py measures each.
"""

from __future__ import annotations

import functools

import torch

from megatron_qwen2.ops import extension, reference


@functools.lru_cache(maxsize=None)
def _flash_attn_func():
    try:
        from flash_attn import flash_attn_func
    except Exception:  # noqa: BLE001 - absent or built for another torch: not an error, just not used
        return None
    return flash_attn_func


def backend() -> str:
    """'flash_attn' or 'sdpa': which implementation CUDA inputs get."""
    return "flash_attn" if extension.mode() != "reference" and _flash_attn_func() is not None else "sdpa"


def _sdpa_cuda(q, k, v, causal, softmax_scale):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    with sdpa_kernel(order, set_priority=True):
        return reference.attention(q, k, v, causal=causal, softmax_scale=softmax_scale)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
              softmax_scale: float | None = None, document_ids: torch.Tensor | None = None) -> torch.Tensor:
    """q [b, s, hq, d], k/v [b, s, hkv, d] with hq % hkv == 0 -> [b, s, hq, d].

    document_ids [b, s]: several documents packed in a row; a token attends only to tokens of its
    own document (block-diagonal causal mask). None: one sequence per row.
    """
    if q.shape[2] % k.shape[2] != 0:
        raise ValueError(f"query heads {q.shape[2]} are not a multiple of kv heads {k.shape[2]}")
    if document_ids is not None:  # SDPA with an explicit block-diagonal mask on every device (no varlen kernel yet)
        return reference.attention(q, k, v, causal=causal, softmax_scale=softmax_scale, document_ids=document_ids)
    if q.is_cuda and extension.mode() != "reference":
        fa = _flash_attn_func()
        if fa is not None and q.dtype in (torch.bfloat16, torch.float16) and q.shape[-1] <= 256:
            return fa(q, k, v, causal=causal, softmax_scale=softmax_scale)
        return _sdpa_cuda(q, k, v, causal, softmax_scale)
    return reference.attention(q, k, v, causal=causal, softmax_scale=softmax_scale)
