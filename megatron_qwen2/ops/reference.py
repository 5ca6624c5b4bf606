"""Plain-PyTorch definitions of the fused ops: the ground truth for every kernel."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF Qwen2RMSNorm: normalise in fp32, cast back to the input dtype, then scale."""
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def swiglu(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up on a fused projection output laid out as [..., gate | up]."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (HF convention); cos/sin broadcast against x's [..., head_dim]."""
    return x * cos + rotate_half(x) * sin


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
              softmax_scale: float | None = None, document_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Grouped-query attention. q: [b, s, hq, d]; k, v: [b, s, hkv, d] -> [b, s, hq, d].

    K/V heads are shared by hq // hkv query heads each and are never materialised repeated.
    document_ids [b, s]: query i sees key j only when both lie in the same document (and j <= i
    when causal), an explicit [b, 1, s, s] mask.
    """
    mask = None
    if document_ids is not None:
        s = q.shape[1]
        mask = (document_ids[:, :, None] == document_ids[:, None, :]).unsqueeze(1)  # [b, 1, s, s]
        if causal:
            mask = mask & torch.ones(s, s, dtype=torch.bool, device=q.device).tril()
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
        is_causal=causal and mask is None, scale=softmax_scale, enable_gqa=q.shape[2] != k.shape[2],
    )
    return out.transpose(1, 2)


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                       softmax_scale: float | None = None, document_ids: torch.Tensor | None = None,
                       key_ranges: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Explicit GQA attention in q's dtype: (out [b, sq, hq, d], lse [b, hq, sq]).

    The definition the flash-attention kernel is tested against. Causal masks are aligned to the
    bottom right (query i sees key j <= i + sk - sq), which is the usual top-left mask when
    sq == sk; document_ids [b, s] (sq == sk) keep each query inside its document; key_ranges
    (lo, hi) [b, sq] let query i see only keys lo[i] <= j < hi[i]. A query that sees no key gets
    out 0 and lse -inf.
    """
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    scale = d ** -0.5 if softmax_scale is None else softmax_scale
    g = hq // hkv
    qh = q.permute(0, 2, 1, 3).reshape(b, hkv, g, sq, d)
    scores = torch.einsum("bhgid,bjhd->bhgij", qh, k) * scale  # [b, hkv, g, sq, sk]
    visible = _visible(b, sq, sk, causal, document_ids, key_ranges, q.device)
    scores = scores.masked_fill(~visible[:, None, None], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [b, hkv, g, sq]
    p = torch.exp(scores - lse.unsqueeze(-1).masked_fill(torch.isinf(lse).unsqueeze(-1), 0.0))
    p = p.masked_fill(~visible[:, None, None], 0.0)
    out = torch.einsum("bhgij,bjhd->bhgid", p, v)  # [b, hkv, g, sq, d]
    out = out.reshape(b, hq, sq, d).permute(0, 2, 1, 3)
    return out, lse.reshape(b, hq, sq)


def _visible(b, sq, sk, causal, document_ids, key_ranges, device) -> torch.Tensor:
    visible = torch.ones(sq, sk, dtype=torch.bool, device=device)
    if causal:
        visible = visible.tril(sk - sq)
    visible = visible.expand(b, sq, sk)
    if document_ids is not None:
        visible = visible & (document_ids[:, :, None] == document_ids[:, None, :])
    if key_ranges is not None:
        j = torch.arange(sk, device=device)
        visible = visible & (j >= key_ranges[0][:, :, None]) & (j < key_ranges[1][:, :, None])
    return visible


def attention_backward_with_lse(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                out: torch.Tensor, lse: torch.Tensor, causal: bool = True,
                                softmax_scale: float | None = None, document_ids: torch.Tensor | None = None,
                                key_ranges: tuple[torch.Tensor, torch.Tensor] | None = None,
                                dlse: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) by the flash-attention formula from a given out and lse (e.g. merged over K/V
    blocks by context parallelism): P = exp(S - lse), dS = P * (dO V^T - rowsum(dO * out) + dlse)."""
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    scale = d ** -0.5 if softmax_scale is None else softmax_scale
    g = hq // hkv
    qh = q.permute(0, 2, 1, 3).reshape(b, hkv, g, sq, d)
    doh = dout.to(q.dtype).permute(0, 2, 1, 3).reshape(b, hkv, g, sq, d)
    scores = torch.einsum("bhgid,bjhd->bhgij", qh, k) * scale
    finite = torch.where(torch.isinf(lse), torch.full_like(lse, float("inf")), lse).to(q.dtype)
    p = torch.exp(scores - finite.reshape(b, hkv, g, sq, 1))
    p = p.masked_fill(~_visible(b, sq, sk, causal, document_ids, key_ranges, q.device)[:, None, None], 0.0)
    delta = (dout.to(q.dtype) * out.to(q.dtype)).sum(-1).transpose(1, 2)  # [b, hq, sq]
    if dlse is not None:
        delta = delta - dlse.to(q.dtype)
    dp = torch.einsum("bhgid,bjhd->bhgij", doh, v)
    ds = p * (dp - delta.reshape(b, hkv, g, sq, 1))
    dv = torch.einsum("bhgij,bhgid->bjhd", p, doh)
    dk = torch.einsum("bhgij,bhgid->bjhd", ds, qh) * scale
    dq = torch.einsum("bhgij,bjhd->bhgid", ds, k).reshape(b, hq, sq, d).permute(0, 2, 1, 3) * scale
    return dq, dk, dv


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual): the residual add of a pre-norm block fused with the norm."""
    s = x + residual
    return rms_norm(s, weight, eps), s


def permute_indices(routing_map: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Expert-sorted order of the routed copies of the tokens.

    routing_map [T, k] holds expert ids in [0, num_experts). Copy (t, j) is flat slot t * k + j.
    Returns order [T*k] (int64: order[i] is the slot in sorted row i; a stable sort, so rows are
    grouped by expert and, within an expert, by token then j), row_map [T, k] (int32: the sorted
    row of slot (t, j), the inverse of order) and tokens_per_expert [E] (int64).
    """
    if routing_map.dim() != 2:
        raise ValueError(f"routing_map must be [tokens, k], got shape {tuple(routing_map.shape)}")
    if num_experts <= 0:
        raise ValueError(f"num_experts must be > 0, got {num_experts}")
    flat = routing_map.reshape(-1).long()
    if flat.numel() and bool(((flat < 0) | (flat >= num_experts)).any()):  # one host sync
        raise ValueError(f"routing_map holds expert ids outside [0, {num_experts}): "
                         f"min {int(flat.min())}, max {int(flat.max())}")
    order = torch.argsort(flat, stable=True)
    row_map = torch.empty_like(order, dtype=torch.int32)
    row_map[order] = torch.arange(order.numel(), device=order.device, dtype=torch.int32)
    counts = torch.bincount(flat, minlength=num_experts)
    return order, row_map.view(routing_map.shape), counts


def permute(x: torch.Tensor, routing_map: torch.Tensor,
            num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [T, h] -> (permuted [T*k, h] grouped by expert, row_map [T, k] int32, tokens_per_expert [E])."""
    order, row_map, counts = permute_indices(routing_map, num_experts)
    return x[order // routing_map.shape[1]], row_map, counts


def unpermute(expert_out: torch.Tensor, row_map: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """out[t] = sum_j probs[t, j] * expert_out[row_map[t, j]], summed in fp32, in expert_out's dtype."""
    acc = torch.promote_types(expert_out.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs
    gathered = expert_out[row_map.long()]  # [T, k, h]
    out = (gathered.to(acc) * probs.to(acc).unsqueeze(-1)).sum(1)
    return out.to(expert_out.dtype)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token loss [...] in fp32 (fp64 for fp64 logits) from logits [..., V] over the whole vocabulary."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits.flatten(0, -2), labels.flatten(), reduction="none").view(labels.shape)
