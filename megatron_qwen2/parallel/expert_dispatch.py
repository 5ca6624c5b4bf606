"""Token dispatch for the routed experts, with or without expert (and expert-tensor) parallelism.

    route -> permute (token copies grouped by expert) -> [capacity: drop the overflow]
          -> all-to-all over ep (row counts per rank) -> regroup by local expert
          -> [etp > 1: all-gather the rows over etp, regroup by local expert]
          -> grouped expert GEMM (the caller) -> the way back -> unpermute weighted by the router.

Counts may be uneven and zero anywhere: an expert with no tokens is a zero-length group, a rank
that sends nothing to a peer sends zero rows. The exchange of counts is a small all-to-all of
integers before the tokens go out; the tokens' split sizes need them on the host (one sync).

Expert parameters are sharded over the ep group along their expert dimension (their `Shard`'s
`ep_dim`, parallel/shard.py): on ep rank r (its rank in the ep group, `topo.groups.ep`) they hold
the r-th of ep equal contiguous chunks of the global tensor along it (local experts r*E/ep ...
(r+1)*E/ep - 1); `gather_ep_full` reassembles the global tensor. With expert-tensor parallelism
(etp > 1) each expert's FFN is split over the etp group (model/moe.py `Experts`): the rows that
reach any rank of an etp group are all-gathered over it (every etp rank runs its slice of the FFN
on all of them), and the partial outputs come back summed over etp, each rank receiving those of
its own rows (a reduce-scatter). Both are all-to-alls with uneven row counts, so that neither
pads: the gather sends a rank's rows to every etp peer, the reduce-scatter sends each peer its
rows' partial outputs and adds what arrives.

Permutation goes through the door: `ops.permute(x, expert_ids, E)` -> (rows sorted by expert, stable
in token order; row_map [T, k], the sorted row of token t's j-th copy; counts [E]) and
`ops.unpermute(rows, row_map, probs)` (out[t] = sum_j probs[t, j] rows[row_map[t, j]], fp32 sums).
With a capacity limit (`keep`, from `capacity_mask`) the dropped copies sort into an extra bin past
the last expert, are cut off before the exchange, and come back as zero rows before unpermute.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from megatron_qwen2 import ops
from megatron_qwen2.parallel.mappings import _all_gather_single, all_to_all
from megatron_qwen2.parallel.shard import shard_of


# --- the ep layout of expert parameters ---

def gather_ep_full(p: torch.Tensor, local: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """Reassemble the global tensor from every ep rank's shard `local` of parameter `p`."""
    dim = shard_of(p).ep_dim
    if dim is None or group is None:
        return local
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


# --- row gathers by a permutation (the ep regrouping) ---

def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return inv


class _GatherRows(torch.autograd.Function):
    """x[index] for a permutation `index`; the backward is the gather by its inverse (no atomics)."""

    @staticmethod
    def forward(ctx, x, index, inverse):
        ctx.save_for_backward(inverse)
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def gather_rows(x: torch.Tensor, index: torch.Tensor, inverse: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Rows of x in the order of the permutation `index` (differentiable, deterministic)."""
    return _GatherRows.apply(x, index, inverse_permutation(index) if inverse is None else inverse)


def capacity_mask(expert_ids: torch.Tensor, probs: torch.Tensor, num_experts: int, capacity: int) -> torch.Tensor:
    """Bool [T, k]: assignments kept when each expert takes at most `capacity` of them, the highest
    router probabilities first (ties: earlier token first)."""
    flat, p = expert_ids.reshape(-1), probs.reshape(-1)
    by_prob = torch.argsort(-p.float(), stable=True)
    order = by_prob[torch.argsort(flat[by_prob], stable=True)]  # by expert, then by falling probability
    counts = torch.bincount(flat, minlength=num_experts)
    starts = torch.cumsum(counts, 0) - counts
    rank_in_expert = torch.empty_like(order)
    rank_in_expert[order] = torch.arange(order.numel(), device=order.device) - starts[flat[order]]
    return (rank_in_expert < capacity).view_as(expert_ids)


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """Megatron's per-rank capacity: ceil(tokens * k / E * factor)."""
    return math.ceil(num_tokens * top_k / num_experts * capacity_factor)


# --- the dispatcher ---

@dataclass
class DispatchState:
    """What the way back needs: permutation, exchange sizes and the regrouping indices."""

    row_map: torch.Tensor
    probs: torch.Tensor
    num_tokens: int
    dropped: int = 0  # rows past the experts' at the end of the sorted buffer: the dropped copies (padded)
    input_splits: Optional[list[int]] = None
    output_splits: Optional[list[int]] = None
    regroup: Optional[torch.Tensor] = None  # rows in [source rank][expert] order -> [expert][source rank]
    regroup_inverse: Optional[torch.Tensor] = None
    etp_splits: Optional[list[int]] = None  # rows of each etp rank (all-gathered over etp)
    etp_regroup: Optional[torch.Tensor] = None  # gathered rows [etp rank][expert] -> [expert][etp rank]
    etp_regroup_inverse: Optional[torch.Tensor] = None


class TokenDispatcher:
    """Moves token copies to the ranks of their experts and the expert outputs back.

    `dispatch` returns the rows for this rank's local experts, grouped by local expert, with the
    row count of each and the state of the way back (`state.dropped`: the copies the capacity limit
    dropped); `combine` takes the expert outputs (partial sums over etp) in that same order.
    """

    def __init__(self, num_experts: int, ep_group: Optional[dist.ProcessGroup],
                 etp_group: Optional[dist.ProcessGroup] = None):
        self.num_experts = num_experts
        self.group = ep_group
        self.ep = 1 if ep_group is None else dist.get_world_size(ep_group)
        self.etp_group = etp_group
        self.etp = 1 if etp_group is None else dist.get_world_size(etp_group)
        self.num_local = num_experts // self.ep

    def dispatch(self, x: torch.Tensor, probs: torch.Tensor, expert_ids: torch.Tensor,
                 keep: Optional[torch.Tensor] = None, multiple: int = 1):
        """x [T, h], probs/expert_ids [T, k], keep [T, k] bool or None (dropless)
        -> (rows [M, h], counts per local expert, state). With multiple > 1 the rows of each expert
        from each source rank come padded with zero rows to a multiple of `multiple` (the layout of
        FP8 grouped GEMMs, `ops.permute`): every count is a multiple of it, and the padding travels
        with the rows."""
        e = self.num_experts
        ids, drop = expert_ids, keep is not None
        if drop:
            ids = expert_ids.masked_fill(~keep, e)  # the dropped sort into a bin past the last expert
        rows, row_map, counts = ops.permute(x, ids, e + drop, multiple)  # row_map [T, k]: sorted row of copy (t, j)
        state = DispatchState(row_map=row_map, probs=probs, num_tokens=x.shape[0])
        if drop:
            state.dropped = int(counts[e])
            counts = counts[:e]
            rows = rows[:rows.shape[0] - state.dropped]
        if self.group is not None:
            # Counts per (destination rank, its local expert) out; per (source rank, my expert) in.
            send = counts.view(self.ep, self.num_local)
            recv = torch.empty_like(send)
            dist.all_to_all_single(recv, send.contiguous(), group=self.group)
            state.input_splits = send.sum(1).tolist()
            state.output_splits = recv.sum(1).tolist()
            rows = all_to_all(rows, self.group, state.output_splits, state.input_splits)
            state.regroup = _regroup_index(recv)
            state.regroup_inverse = inverse_permutation(state.regroup)
            rows, counts = gather_rows(rows, state.regroup, state.regroup_inverse), recv.sum(0)
        if self.etp_group is not None:
            # Every etp rank runs its slice of the FFN on the rows of the whole etp group.
            per_rank = counts.new_empty(self.etp * counts.numel())
            _all_gather_single(per_rank, counts.contiguous(), group=self.etp_group)
            per_rank = per_rank.view(self.etp, -1)  # [etp rank, local expert]
            state.etp_splits = per_rank.sum(1).tolist()
            mine = [rows.shape[0]] * self.etp
            rows = all_to_all(torch.cat([rows] * self.etp), self.etp_group, state.etp_splits, mine)
            state.etp_regroup = _regroup_index(per_rank)
            state.etp_regroup_inverse = inverse_permutation(state.etp_regroup)
            rows, counts = gather_rows(rows, state.etp_regroup, state.etp_regroup_inverse), per_rank.sum(0)
        return rows, counts.tolist(), state

    def combine(self, out: torch.Tensor, state: DispatchState) -> torch.Tensor:
        """Expert outputs [M, h] in dispatch order -> [T, h], weighted by the router probabilities."""
        if self.etp_group is not None:  # each etp rank gets its rows' partial outputs, summed over etp
            out = gather_rows(out, state.etp_regroup_inverse, state.etp_regroup)
            mine = state.etp_splits[dist.get_rank(self.etp_group)]
            out = all_to_all(out, self.etp_group, [mine] * self.etp, state.etp_splits)
            out = out.view(self.etp, mine, out.shape[-1]).sum(0)
        if self.group is not None:
            out = gather_rows(out, state.regroup_inverse, state.regroup)
            out = all_to_all(out, self.group, state.input_splits, state.output_splits)
        if state.dropped:  # dropped copies contribute nothing
            out = torch.cat([out, out.new_zeros((state.dropped, out.shape[-1]))])
        return ops.unpermute(out, state.row_map, state.probs)


def _regroup_index(recv: torch.Tensor) -> torch.Tensor:
    """Row index that reorders chunks [source s][expert l] (sizes recv[s, l]) into [l][s]."""
    sizes = recv.reshape(-1)
    src_start = (torch.cumsum(sizes, 0) - sizes).view_as(recv)
    lens, starts = recv.t().reshape(-1), src_start.t().reshape(-1)  # chunks in the new order
    new_start = torch.cumsum(lens, 0) - lens
    total = int(sizes.sum())
    shift = torch.repeat_interleave(starts - new_start, lens, output_size=total)
    return torch.arange(total, device=recv.device) + shift
