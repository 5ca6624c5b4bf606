"""Attention door: GQA causal attention on [b, s, h, d] tensors (strided views allowed).

Backends (`backend()` names the one a call takes, `backend_reason()` says why):

- ``kernel_sm90``: the project's Hopper flash-attention kernels (csrc/flash_attn_sm90.cu and
  flash_attn_sm90_bwd.cu: TMA, wgmma, warp-specialised warpgroups; compute capability 9.0 only);
  everything ``kernel`` does, with the same results.
- ``kernel``: the project's flash-attention kernel (csrc/flash_attn.cu; bf16, head_dim 64 / 128):
  GQA without repeated K/V, packed documents as per-token document ranges, returns the lse.
- ``flash_attn``: `flash_attn_func` when the package is importable.
- ``sdpa``: PyTorch SDPA with the cuDNN backend first in priority (then flash, memory-efficient,
  math: SDPA falls through to the next one that accepts the inputs).
- ``sdpa_masked``: SDPA with an explicit dense block-diagonal mask (packed documents neither own
  kernel can take: another dtype or head_dim); slow and O(s^2) memory.
- ``reference``: CPU inputs or MEGATRON_QWEN2_OPS=reference.

Packed documents take the first available of `OWN_KERNELS` (fastest first); one sequence per row
takes the fastest available in the head-dim table `DENSE_PREFERENCE` (training calls: a gradient
to come) or `DENSE_FORWARD_PREFERENCE` (forward-only calls). Both orders are measured by
bench/kernels.py (bench/results/kernels_attention_*.json). MEGATRON_QWEN2_OPS=kernel sends every
call an own kernel takes to the first available of `OWN_KERNELS`.

Context parallelism uses the functional pair `flash_attention_forward` -> (out, lse) and
`flash_attention_backward` -> (dq, dk, dv), which run the faster own kernel on CUDA and the
reference elsewhere.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch

from megatron_qwen2.ops import extension, reference

# Fastest first, per head_dim, for causal attention without documents (bf16, s 4096-8192), by the
# GPU time bench/kernels.py measures. Training calls (a gradient to come), by forward + backward on
# an H100 at s 8192 (bench/results/kernels_attention_gpu-time_h100-80gb-hbm3_2026-12-07.json):
# cuDNN SDPA 527 / 509 TFLOP/s (28/4, 64/8 heads), the Hopper kernel 490 / 472, and 376 against 352
# at head_dim 64 (14/2); on an H200 the own kernel 170-204 and SDPA's flash backend
# (flash-attention 2) 221-299 against cuDNN's 423-540
# (bench/results/kernels_attention_h200_2026-12-02.json). Forward-only calls (no gradient: a DPO
# reference, evaluation): the Hopper kernel 668 / 652 against cuDNN's 607 / 633, 442 against 393
# at head_dim 64. The flash-attn package was not importable there; it is placed by its SDPA twin.
# Backends not available are skipped.
DENSE_PREFERENCE: dict[int, tuple[str, ...]] = {
    64: ("sdpa", "kernel_sm90", "flash_attn", "kernel"),
    128: ("sdpa", "kernel_sm90", "flash_attn", "kernel"),
}
DENSE_FORWARD_PREFERENCE: dict[int, tuple[str, ...]] = {
    64: ("kernel_sm90", "sdpa", "flash_attn", "kernel"),
    128: ("kernel_sm90", "sdpa", "flash_attn", "kernel"),
}

# The own kernels, fastest first: everything one takes the other takes, with the same results; the
# Hopper kernel is the faster in every measured row
# (bench/results/kernels_attention_h100-80gb-hbm3_2026-12-07.json, s 8192: packed documents fwd
# 447-518 / fwd+bwd 283-287 TFLOP/s against 201-219 / 165-176 at head_dim 128, fwd 248 / fwd+bwd
# 144 against 135 / 125 at 64). Packed documents and the context-parallel pair take the first
# available.
OWN_KERNELS = ("kernel_sm90", "kernel")


@functools.lru_cache(maxsize=None)
def _flash_attn_func():
    try:
        from flash_attn import flash_attn_func
    except Exception:  # noqa: BLE001 - absent or built for another torch: not an error, just not used
        return None
    return flash_attn_func


def document_bounds(document_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """document_ids [b, s] -> (start, end) int32 [b, s]: token i's document is [start[i], end[i]).

    A document is a run of equal ids in its row (rows are non-decreasing in the model's packing).
    Computed on the device without a host synchronisation.
    """
    if document_ids.dim() != 2:
        raise ValueError(f"document_ids must be [batch, seq], got shape {tuple(document_ids.shape)}")
    b, s = document_ids.shape
    pos = torch.arange(s, device=document_ids.device).expand(b, s)
    first = torch.ones(b, s, dtype=torch.bool, device=document_ids.device)
    first[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    last = torch.ones_like(first)
    last[:, :-1] = first[:, 1:]
    start = torch.where(first, pos, 0).cummax(dim=1).values
    end = torch.where(last, pos + 1, s).flip(1).cummin(dim=1).values.flip(1)
    return start.to(torch.int32), end.to(torch.int32)


class DocumentRanges(NamedTuple):
    """Packed documents as index ranges, the form the kernel reads (int32, non-decreasing per row).

    key_lo / key_hi [b, sq]: query i may see keys key_lo[i] <= j < key_hi[i] (the forward);
    query_lo / query_hi [b, sk]: key j may be seen by queries query_lo[j] <= i < query_hi[j] (the backward).
    """

    key_lo: torch.Tensor
    key_hi: torch.Tensor
    query_lo: torch.Tensor
    query_hi: torch.Tensor


def document_ranges(q_documents: torch.Tensor, k_documents: Optional[torch.Tensor] = None) -> DocumentRanges:
    """Ranges of a query block with document ids q_documents [b, sq] against a key block with
    k_documents [b, sk] (both non-decreasing along the row, e.g. two chunks of one packed row under
    context parallelism); k_documents None: self-attention, the document bounds of each token."""
    if k_documents is None:
        start, end = document_bounds(q_documents)
        return DocumentRanges(start, end, start, end)
    if q_documents.dim() != 2 or k_documents.dim() != 2 or q_documents.shape[0] != k_documents.shape[0]:
        raise ValueError(f"document ids must be [batch, seq] with one batch size, got {tuple(q_documents.shape)} "
                         f"and {tuple(k_documents.shape)}")
    qd, kd = q_documents.contiguous(), k_documents.contiguous()
    return DocumentRanges(torch.searchsorted(kd, qd).to(torch.int32),
                          torch.searchsorted(kd, qd, right=True).to(torch.int32),
                          torch.searchsorted(qd, kd).to(torch.int32),
                          torch.searchsorted(qd, kd, right=True).to(torch.int32))


class PackedDocuments:
    """The document ids [b, s] of packed rows, with the kernel's `DocumentRanges` derived on first
    use and kept. Made once per micro-batch and handed to every layer (and its recomputation), it
    derives the ranges, a dozen small kernels that cost the host ~0.4 ms (measured on H200,
    eager), once per micro-batch instead of once per layer; given plain ids, `attention` derives
    them per call."""

    def __init__(self, ids: torch.Tensor):
        self.ids = ids

    @functools.cached_property
    def ranges(self) -> DocumentRanges:
        return document_ranges(self.ids)


def packed_documents(document_ids: "torch.Tensor | PackedDocuments | None") -> Optional[PackedDocuments]:
    """document_ids [b, s] as PackedDocuments; a PackedDocuments (or None) is returned as it is."""
    if document_ids is None or isinstance(document_ids, PackedDocuments):
        return document_ids
    return PackedDocuments(document_ids)


def _kernel_built() -> bool:
    # the constant-result forms: under torch.compile the choice is fixed at trace time
    return extension._mode_now() != "reference" and extension._built()


def _kernel_supports(q, k, v) -> bool:
    return (all(t.is_cuda and t.dtype == torch.bfloat16 for t in (q, k, v)) and q.shape[-1] in (64, 128)
            and k.shape[-1] == q.shape[-1])


@extension._constant
def _hopper(device_index: int) -> bool:
    """The extension holds the Hopper kernels (an sm_90a build) and the device is compute capability 9.0."""
    return (getattr(extension.load(), "hopper_kernels", False)
            and torch.cuda.get_device_capability(device_index) == (9, 0))


def hopper_kernel_available(device: torch.device | None = None) -> bool:
    """The extension is built with the Hopper kernels and `device` (default: the current CUDA device)
    has compute capability 9.0."""
    index = device.index if device is not None and device.index is not None else torch.cuda.current_device()
    return _kernel_built() and _hopper(index)


def _available(q, k, v, causal: bool) -> dict[str, bool]:
    """Which CUDA backends take these inputs (sdpa takes all)."""
    own = _kernel_built() and _kernel_supports(q, k, v) and (not causal or q.shape[1] == k.shape[1])
    return {"kernel_sm90": own and hopper_kernel_available(q.device), "kernel": own,
            "flash_attn": (_flash_attn_func() is not None and q.dtype in (torch.bfloat16, torch.float16)
                           and q.shape[-1] <= 256),
            "sdpa": True}


def _first(order: tuple[str, ...], available: dict[str, bool]) -> Optional[str]:
    return next((name for name in order if available.get(name)), None)


def _choose(q, k, v, causal: bool, document_ids: Optional[torch.Tensor]) -> tuple[str, str]:
    """(backend, reason) for these inputs."""
    mode = extension._mode_now()
    if mode == "reference":
        return "reference", "MEGATRON_QWEN2_OPS=reference"
    if not q.is_cuda:
        return "reference", "inputs on the CPU"
    built = _kernel_built()
    if mode == "kernel" and not built:
        raise RuntimeError("MEGATRON_QWEN2_OPS=kernel but megatron_qwen2._C is not built "
                           "(pip install --no-build-isolation -e . on a CUDA machine)")
    available = _available(q, k, v, causal)
    own = _first(OWN_KERNELS, available)
    if document_ids is not None:
        if own is not None:
            return own, f"packed documents: the fastest available own kernel of {OWN_KERNELS} (tiles outside the " \
                        "documents skipped)"
        return "sdpa_masked", ("packed documents but the own kernels are " + ("not built" if not built else
                               "not for these inputs (bf16, head_dim 64/128, sq == sk)") + ": dense masked SDPA")
    if mode == "kernel" and own is not None:
        return own, "MEGATRON_QWEN2_OPS=kernel"
    training = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    order = (DENSE_PREFERENCE if training else DENSE_FORWARD_PREFERENCE).get(q.shape[-1], ("sdpa",))
    name = _first(order, available)
    if name is not None:
        return name, (f"fastest available for head_dim {q.shape[-1]} in the measured order {order} of "
                      + ("forward + backward" if training else "forward-only calls"))
    return "sdpa", "nothing else accepts these inputs"


def backend(q: Optional[torch.Tensor] = None, k: Optional[torch.Tensor] = None, v: Optional[torch.Tensor] = None,
            causal: bool = True, document_ids: "torch.Tensor | PackedDocuments | None" = None) -> str:
    """The backend `attention(q, k, v, causal, document_ids=...)` takes (here, with gradients enabled or
    not); without tensors, the one of a CUDA bf16 causal training call at Qwen2-7B shape (28 / 4 heads,
    head_dim 128) without documents."""
    if q is None:
        if not torch.cuda.is_available():
            return "reference"
        q = torch.empty(1, 1, 28, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = v = torch.empty(1, 1, 4, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    docs = packed_documents(document_ids)
    return _choose(q, k, v, causal, None if docs is None else docs.ids)[0]


def backend_reason(q, k, v, causal: bool = True, document_ids: "torch.Tensor | PackedDocuments | None" = None) -> str:
    """Why `attention` takes `backend(...)` on these inputs, in words."""
    docs = packed_documents(document_ids)
    name, why = _choose(q, k, v, causal, None if docs is None else docs.ids)
    return f"{name}: {why}"


def _forward_op(own: str):
    """The custom op of an own kernel's forward (autograd runs its backward)."""
    from megatron_qwen2.ops import library

    return library.flash_attention_sm90 if own == "kernel_sm90" else library.flash_attention


def _backward_op(own: str):
    from megatron_qwen2.ops import library

    return library.flash_attention_backward_sm90 if own == "kernel_sm90" else library.flash_attention_backward


def _sdpa_cuda(q, k, v, causal, softmax_scale):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    with sdpa_kernel(order, set_priority=True):
        return reference.attention(q, k, v, causal=causal, softmax_scale=softmax_scale)


def _check_shapes(q, k, v) -> None:
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"q must be [b, s, hq, d] and k, v [b, s, hkv, d]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[2] % k.shape[2] != 0:
        raise ValueError(f"query heads {q.shape[2]} are not a multiple of kv heads {k.shape[2]}")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
              softmax_scale: float | None = None,
              document_ids: torch.Tensor | PackedDocuments | None = None) -> torch.Tensor:
    """q [b, s, hq, d], k/v [b, s, hkv, d] with hq % hkv == 0 -> [b, s, hq, d].

    document_ids [b, s] (or PackedDocuments of them): several documents packed in a row; a token
    attends only to tokens of its own document (block-diagonal causal mask). None: one sequence per row.
    """
    _check_shapes(q, k, v)
    docs = packed_documents(document_ids)
    document_ids = None if docs is None else docs.ids
    name, _ = _choose(q, k, v, causal, document_ids)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    if name in OWN_KERNELS:
        ranges = docs.ranges if docs is not None else (None,) * 4
        return _forward_op(name)(q, k, v, causal, scale, *ranges)[0]
    if name == "flash_attn":
        return _flash_attn_func()(q, k, v, causal=causal, softmax_scale=softmax_scale)
    if name == "sdpa":
        return _sdpa_cuda(q, k, v, causal, softmax_scale)
    return reference.attention(q, k, v, causal=causal, softmax_scale=softmax_scale, document_ids=document_ids)


# ---- Functional pair with the log-sum-exp (context parallelism merges partial outputs with it).

def flash_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                            softmax_scale: float | None = None,
                            ranges: DocumentRanges | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [b, sq, hq, d], lse fp32 [b, hq, sq]) without autograd.

    ranges: packed documents (`document_ranges`). Causal masks are bottom-right aligned: query i
    sees key j <= i + sk - sq (the usual mask when sq == sk). A query that sees nothing gets out 0,
    lse -inf. The kernel on CUDA when it supports the inputs, else the fp32 reference.
    """
    _check_shapes(q, k, v)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    own = _first(OWN_KERNELS, _available(q, k, v, causal=False))
    if own is not None:
        with torch.no_grad():
            return _forward_op(own)(q, k, v, causal, scale, *(ranges or (None,) * 4))
    with torch.no_grad():
        out, lse = reference.attention_with_lse(q.float(), k.float(), v.float(), causal, scale,
                                                key_ranges=None if ranges is None else ranges[:2])
    return out.to(q.dtype), lse


def flash_attention_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             out: torch.Tensor, lse: torch.Tensor, causal: bool = True,
                             softmax_scale: float | None = None, ranges: DocumentRanges | None = None,
                             dlse: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of `flash_attention_forward` given the gradients of out (and optionally lse).

    dk / dv of a kv head are summed over its query heads. out and lse are those of the forward or,
    in context parallelism, the merged ones (the formula only needs them consistent).
    """
    _check_shapes(q, k, v)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    own = _first(OWN_KERNELS, _available(q, k, v, causal=False))
    if own is not None:
        qr = (None, None) if ranges is None else (ranges.query_lo, ranges.query_hi)
        with torch.no_grad():
            return _backward_op(own)(dout, q, k, v, out, lse, dlse, causal, scale, *qr)
    f32 = [t.float() for t in (dout, q, k, v, out)]
    dq, dk, dv = reference.attention_backward_with_lse(*f32, lse.float(), causal, scale,
                                                       key_ranges=None if ranges is None else ranges[:2],
                                                       dlse=None if dlse is None else dlse.float())
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
