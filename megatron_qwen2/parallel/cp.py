"""Context parallelism: the sequence cut across the cp group, and ring attention over it.

Chunk layout (causal load balancing, as in Megatron). A row of s tokens is cut into 2*cp
chunks of c = s / (2*cp) tokens; cp rank r holds chunk r followed by chunk 2*cp-1-r, so its
local sequence of s/cp tokens has the global positions

    [r*c, (r+1)*c)  ++  [(2*cp-1-r)*c, (2*cp-r)*c)        (`chunk_positions`)

Under a causal mask an early chunk has few keys and a late one many; pairing them gives every
rank the same amount of attention work. Every per-token tensor of a micro-batch (inputs,
labels, loss mask, RoPE positions, document ids) is cut the same way (`split_sequence`); the
local sequence is then what the model sees as "the sequence" (sequence parallelism cuts it
further across tp).

Ring attention. Each rank keeps its queries and passes its K/V block (kv heads only: with GQA
the query heads never travel) round the cp group: at step t rank r holds the block of rank
j = (r - t) mod cp, and has already started sending it on to rank r+1 (and receiving the next
one from r-1) before computing with it. Which part of a block can be visible follows from the
layout, so fully masked halves are skipped:

    j == r  both local chunks against both:  causal in local order (positions increase along it)
    j <  r  chunk j precedes both local chunks, chunk 2cp-1-j follows both:
            all queries against the first half of the block, the second half skipped
    j >  r  chunk r precedes both of the block's chunks, chunk 2cp-1-r follows both:
            the second half of the queries against the whole block, the first half skipped

so the cp-1 off-diagonal steps do half a block's work each. With packed documents a query sees
a key only when (k_pos <= q_pos) & (doc_q == doc_k); positions of a block follow from its owner's
rank, its document ids travel with it (a few bytes per token). The partial outputs of the steps
are merged by their log-sum-exp, in fp32.

Backward runs the ring again: K/V travel as in forward, each rank accumulates dQ for its own
queries, and the dK/dV accumulator (fp32) of each block travels with the block, every holder
adding its share, until a last hop brings it home to the block's owner. Only q, k, v, the output
and the log-sum-exp are saved (as for a fused attention), plus the blocks' document ids.

The attention of one query block against one K/V block is a `BlockAttention`: forward returns
(out, lse), backward takes (do, q, k, v, out, lse) with the merged out and lse. `MathBlockAttention`
is the PyTorch definition (any device, fp32 softmax and accumulation); `KernelBlockAttention`
adapts the attention door's fused pair that returns the log-sum-exp (used on CUDA); another
implementation plugs in by implementing the same two methods (`ring_attention(block=...)`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from megatron_qwen2.ops.attention import PackedDocuments
from megatron_qwen2.parallel.mappings import reduce_from_tp


# ---------------------------------------------------------------------------------------------
# Chunk layout


def _chunk(seq_length: int, cp: int) -> int:
    if seq_length % (2 * cp) != 0:
        raise ValueError(f"sequence length {seq_length} is not divisible by 2*cp = {2 * cp} "
                         "(context parallelism cuts it in 2*cp chunks)")
    return seq_length // (2 * cp)


def chunk_positions(seq_length: int, cp: int, cp_rank: int, device=None) -> torch.Tensor:
    """Global positions [seq_length / cp] of the tokens cp rank `cp_rank` holds: chunks r and 2cp-1-r."""
    c = _chunk(seq_length, cp)
    first = torch.arange(cp_rank * c, (cp_rank + 1) * c, device=device)
    return torch.cat([first, first + (2 * cp - 1 - 2 * cp_rank) * c])


def split_sequence(t: torch.Tensor, cp: int, cp_rank: int, dim: int = 1) -> torch.Tensor:
    """This cp rank's share of `t` along `dim` (the sequence): chunks r and 2cp-1-r, concatenated."""
    if cp == 1:
        return t
    c = _chunk(t.shape[dim], cp)
    return torch.cat([t.narrow(dim, cp_rank * c, c), t.narrow(dim, (2 * cp - 1 - cp_rank) * c, c)], dim=dim)


# ---------------------------------------------------------------------------------------------
# One query block against one K/V block


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half-precision and fp32 inputs, fp64 for fp64 (the reference's precision)."""
    return torch.promote_types(dtype, torch.float32)


@dataclass
class BlockMask:
    """Which keys of a K/V block each query sees: (k_pos <= q_pos) & (q_doc == k_doc).

    `causal` says whether the position test cuts the block at all: True only for a rank's own
    block, where it is the plain causal mask in local order (equal lengths, top-left aligned);
    False when every key precedes every query. A kernel may use `causal` and the document ids;
    the positions define the mask exactly.
    """

    q_positions: torch.Tensor  # [sq] int64, global positions in the row
    k_positions: torch.Tensor  # [sk]
    q_documents: Optional[torch.Tensor]  # [b, sq] int64 row-local document ids; None: one document per row
    k_documents: Optional[torch.Tensor]  # [b, sk]
    causal: bool

    def dense(self) -> torch.Tensor:
        """The mask as booleans [b or 1, sq, sk]."""
        mask = (self.k_positions[None, :] <= self.q_positions[:, None]).unsqueeze(0)
        if self.q_documents is not None:
            mask = mask & (self.q_documents[:, :, None] == self.k_documents[:, None, :])
        return mask


class BlockAttention:
    """Attention of queries [b, sq, hq, d] against one K/V block [b, sk, hkv, d] (hq % hkv == 0).

    forward -> (out [b, sq, hq, d], lse [b, hq, sq]) in `accumulation_dtype` (fp32, fp64 for fp64
    inputs); a query that sees no key of the block gets out 0 and lse -inf.
    backward(do, q, k, v, out, lse, ...) -> (dq, dk, dv) in the accumulation dtype,
    this block's share of the gradients, given the output and log-sum-exp merged over all blocks.
    """

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockMask,
                softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def backward(self, do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                 lse: torch.Tensor, mask: BlockMask, softmax_scale: float
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class MathBlockAttention(BlockAttention):
    """The PyTorch definition: fp32 scores, softmax and accumulation, on any device.

    Query heads are grouped per kv head ([b, s, hkv, g, d] views), so K/V are never repeated.
    It materialises the [b, hq, sq, sk] scores: the reference, and the CPU path.
    """

    @staticmethod
    def _grouped(q: torch.Tensor, hkv: int) -> torch.Tensor:
        b, s, hq, d = q.shape
        return q.to(accumulation_dtype(q.dtype)).reshape(b, s, hkv, hq // hkv, d)

    def _scores(self, qg, k, mask: BlockMask, softmax_scale: float) -> torch.Tensor:
        scores = torch.einsum("bqhgd,bkhd->bhgqk", qg, k.to(qg.dtype)) * softmax_scale
        return scores.masked_fill(~mask.dense()[:, None, None], float("-inf"))  # [b, hkv, g, sq, sk]

    def forward(self, q, k, v, mask, softmax_scale):
        b, sq, hq, d = q.shape
        hkv = k.shape[2]
        scores = self._scores(self._grouped(q, hkv), k, mask, softmax_scale)
        lse = torch.logsumexp(scores, dim=-1)  # -inf where a query sees nothing
        probs = torch.exp(scores - torch.where(torch.isinf(lse), 0.0, lse).unsqueeze(-1))
        out = torch.einsum("bhgqk,bkhd->bqhgd", probs, v.to(probs.dtype)).reshape(b, sq, hq, d)
        return out, lse.reshape(b, hq, sq)

    def backward(self, do, q, k, v, out, lse, mask, softmax_scale):
        b, sq, hq, d = q.shape
        hkv = k.shape[2]
        g = hq // hkv
        qg = self._grouped(q, hkv)
        scores = self._scores(qg, k, mask, softmax_scale)
        probs = torch.exp(scores - lse.to(scores.dtype).reshape(b, hkv, g, sq, 1))  # the merged lse is finite
        dog = self._grouped(do, hkv)
        delta = (dog * self._grouped(out, hkv)).sum(-1).permute(0, 2, 3, 1)  # [b, hkv, g, sq]
        vf, kf = v.to(qg.dtype), k.to(qg.dtype)
        dv = torch.einsum("bhgqk,bqhgd->bkhd", probs, dog)
        dprobs = torch.einsum("bqhgd,bkhd->bhgqk", dog, vf)
        dscores = probs * (dprobs - delta.unsqueeze(-1)) * softmax_scale
        dq = torch.einsum("bhgqk,bkhd->bqhgd", dscores, kf).reshape(b, sq, hq, d)
        dk = torch.einsum("bhgqk,bqhgd->bkhd", dscores, qg)
        return dq, dk, dv


class KernelBlockAttention(BlockAttention):
    """The attention door's functional pair with the log-sum-exp (`ops.flash_attention_forward` /
    `ops.flash_attention_backward`): the fused kernel on CUDA where it takes the inputs, the door's
    own reference elsewhere. Document ids become the door's per-query key ranges; its causal mask is
    bottom-right aligned, which is the plain causal mask for the only causal block (sq == sk).
    """

    @staticmethod
    def _ranges(mask: BlockMask):
        from megatron_qwen2 import ops

        return None if mask.q_documents is None else ops.document_ranges(mask.q_documents, mask.k_documents)

    def forward(self, q, k, v, mask, softmax_scale):
        from megatron_qwen2 import ops

        return ops.flash_attention_forward(q, k, v, causal=mask.causal, softmax_scale=softmax_scale,
                                           ranges=self._ranges(mask))

    def backward(self, do, q, k, v, out, lse, mask, softmax_scale):
        from megatron_qwen2 import ops

        return ops.flash_attention_backward(do, q, k, v, out, lse, causal=mask.causal, softmax_scale=softmax_scale,
                                            ranges=self._ranges(mask))


MATH_BLOCK_ATTENTION = MathBlockAttention()
KERNEL_BLOCK_ATTENTION = KernelBlockAttention()


def default_block_attention(q: torch.Tensor) -> BlockAttention:
    """The block implementation for queries q: the door's fused pair on CUDA, else the PyTorch
    definition (the math block materialises [b, hq, sq, sk] scores)."""
    if q.is_cuda:
        return KERNEL_BLOCK_ATTENTION
    return MATH_BLOCK_ATTENTION


# ---------------------------------------------------------------------------------------------
# The ring


class ContextParallelRing:
    """The cp group as a ring: this rank's place in it and its neighbours (global ranks)."""

    def __init__(self, group: dist.ProcessGroup, ranks: Sequence[int], index: int):
        self.group, self.ranks = group, list(ranks)
        self.size, self.rank = len(self.ranks), index
        self.next_rank = self.ranks[(index + 1) % self.size]
        self.prev_rank = self.ranks[(index - 1) % self.size]

    @classmethod
    def from_topology(cls, topo) -> Optional["ContextParallelRing"]:
        """The cp ring of this rank, or None when cp == 1."""
        if topo.cp == 1:
            return None
        ranks = next(r for r in topo.rank_lists("cp") if topo.rank in r)
        return cls(topo.groups.cp.pg, ranks, topo.cp_rank)

    def exchange(self, send: Sequence[torch.Tensor], recv: Sequence[torch.Tensor], tag: int = 0) -> list:
        """Start sending `send` to the next rank and receiving `recv` from the previous one; returns the works.

        The i-th tensor of each list travels with tag `tag` + i, so that messages of different kinds
        in flight at once (K/V, document ids, dK/dV) can never be matched to one another.
        """
        ops = [dist.P2POp(dist.isend, t, self.next_rank, self.group, tag=tag + i) for i, t in enumerate(send)]
        ops += [dist.P2POp(dist.irecv, t, self.prev_rank, self.group, tag=tag + i) for i, t in enumerate(recv)]
        return dist.batch_isend_irecv(ops)


_DKV_TAG = 2  # K/V travel with tag 0, their document ids with 1


def _wait(works: list) -> None:
    for w in works:
        w.wait()


def _step_plan(src: int, rank: int, half: int) -> tuple[slice, slice, bool]:
    """(query rows, key rows, causal) of the step at which `rank` holds the block of `src` (module docstring)."""
    if src == rank:
        return slice(None), slice(None), True
    if src < rank:
        return slice(None), slice(0, half), False
    return slice(half, None), slice(None), False


def _merge(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor) -> None:
    """out, lse (views, updated in place) <- the softmax-weighted union of themselves and a block's result."""
    new = torch.logaddexp(lse, block_lse)  # lse is finite: every query sees itself in the first step
    out.mul_(torch.exp(lse - new).transpose(1, 2).unsqueeze(-1))
    out.add_(block_out * torch.exp(block_lse - new).transpose(1, 2).unsqueeze(-1))
    lse.copy_(new)


class _RingAttention(torch.autograd.Function):
    """q [b, s, hq, d], k/v [b, s, hkv, d] (this rank's share of the sequence) -> out [b, s, hq, d]."""

    @staticmethod
    def forward(ctx, q, k, v, documents, ring: ContextParallelRing, softmax_scale: float, block: BlockAttention):
        b, s, hq, d = q.shape
        cp, r, half = ring.size, ring.rank, s // 2
        positions = [chunk_positions(s * cp, cp, j, device=q.device) for j in range(cp)]
        kv = torch.stack([k, v])  # [2, b, s, hkv, d]: the block that travels
        docs = None if documents is None else documents.contiguous()
        block_docs: list[Optional[torch.Tensor]] = [None] * cp
        block_docs[r] = docs
        out = lse = None
        for step in range(cp):
            src = (r - step) % cp
            works = []
            if step + 1 < cp:  # the next block is on its way while this one is computed
                next_kv = torch.empty_like(kv)
                next_docs = None if docs is None else torch.empty_like(docs)
                send, recv = [kv], [next_kv]
                if docs is not None:
                    send.append(docs)
                    recv.append(next_docs)
                works = ring.exchange(send, recv)
            rows, cols, causal = _step_plan(src, r, half)
            mask = BlockMask(positions[r][rows], positions[src][cols],
                             None if docs is None else block_docs[r][:, rows],
                             None if docs is None else docs[:, cols], causal)
            block_out, block_lse = block.forward(q[:, rows], kv[0][:, cols], kv[1][:, cols], mask, softmax_scale)
            if step == 0:  # the accumulators, in fp32 (fp64 for fp64) whatever the block returns
                acc = accumulation_dtype(q.dtype)
                out, lse = block_out.to(acc).contiguous(), block_lse.to(acc).contiguous()
            else:
                _merge(out[:, rows], lse[:, :, rows], block_out, block_lse)
            _wait(works)
            if step + 1 < cp:
                kv, docs = next_kv, next_docs
                block_docs[(src - 1) % cp] = docs
        out = out.to(q.dtype)
        doc_stack = torch.stack(block_docs) if documents is not None else None
        ctx.save_for_backward(q, k, v, out, lse, doc_stack)
        ctx.ring, ctx.softmax_scale, ctx.block = ring, softmax_scale, block
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, doc_stack = ctx.saved_tensors
        ring, scale, block = ctx.ring, ctx.softmax_scale, ctx.block
        b, s, hq, d = q.shape
        cp, r, half = ring.size, ring.rank, s // 2
        positions = [chunk_positions(s * cp, cp, j, device=q.device) for j in range(cp)]
        dout = dout.contiguous()
        dq = torch.zeros(q.shape, dtype=accumulation_dtype(q.dtype), device=q.device)
        kv = torch.stack([k, v])
        dkv_works, dkv_in = [], None
        for step in range(cp):
            src = (r - step) % cp
            kv_works = []
            if step + 1 < cp:
                next_kv = torch.empty_like(kv)
                kv_works = ring.exchange([kv], [next_kv])
            rows, cols, causal = _step_plan(src, r, half)
            mask = BlockMask(positions[r][rows], positions[src][cols],
                             None if doc_stack is None else doc_stack[r][:, rows],
                             None if doc_stack is None else doc_stack[src][:, cols], causal)
            dq_part, dk_part, dv_part = block.backward(dout[:, rows], q[:, rows], kv[0][:, cols], kv[1][:, cols],
                                                       out[:, rows], lse[:, :, rows], mask, scale)
            dq[:, rows] += dq_part
            if step == 0:
                dkv = torch.zeros(kv.shape, dtype=accumulation_dtype(kv.dtype), device=kv.device)
            else:  # the accumulator of this block, from the ranks that held it before
                _wait(dkv_works)
                dkv = dkv_in
            dkv[0][:, cols] += dk_part
            dkv[1][:, cols] += dv_part
            dkv_in = torch.empty_like(dkv)
            # On to the next holder (after the last step: home); dkv stays referenced until waited for.
            dkv_works = ring.exchange([dkv], [dkv_in], tag=_DKV_TAG)
            _wait(kv_works)
            if step + 1 < cp:
                kv = next_kv
        _wait(dkv_works)
        return dq.to(q.dtype), dkv_in[0].to(k.dtype), dkv_in[1].to(v.dtype), None, None, None, None


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ring: ContextParallelRing,
                   softmax_scale: Optional[float] = None,
                   document_ids: "torch.Tensor | PackedDocuments | None" = None,
                   block: Optional[BlockAttention] = None) -> torch.Tensor:
    """Causal GQA attention over a sequence split across `ring` in the load-balanced layout.

    q [b, s, hq, d], k/v [b, s, hkv, d]: this rank's share (s = seq_length / cp, chunks r and
    2cp-1-r); document_ids [b, s] (or PackedDocuments of them): the row-local document ids of the
    same tokens (None: one document per row). Returns this rank's share of the output [b, s, hq, d].
    """
    if isinstance(document_ids, PackedDocuments):  # each block pair derives its own ranges
        document_ids = document_ids.ids
    s = q.shape[1]
    if q.shape[2] % k.shape[2] != 0:
        raise ValueError(f"query heads {q.shape[2]} are not a multiple of kv heads {k.shape[2]}")
    if s % 2 != 0:
        raise ValueError(f"the local sequence of a cp rank holds two equal chunks; its length {s} is odd")
    if document_ids is not None and tuple(document_ids.shape) != (q.shape[0], s):
        raise ValueError(f"document_ids has shape {tuple(document_ids.shape)}, expected {(q.shape[0], s)}: "
                         "give the document ids of this rank's share of the sequence")
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    return _RingAttention.apply(q, k, v, document_ids, ring, scale, block or default_block_attention(q))


def sum_over_cp(x: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """x summed over the cp group (all-reduce forward), the gradient passed to the local term only
    (identity backward).

    Every cp rank then computes the same loss from the summed statistic and adds it to its own
    objective; summing those objectives counts the loss cp times, so each rank passes the gradient
    back only to its own contribution, and the cp ranks' gradients add up to one loss's.
    """
    return x if group is None else reduce_from_tp(x.clone(), group)  # the same pair of maps as tp's reduce
