"""Tensor- and expert-parallel communication as small autograd functions (docs/architecture.md, "Rooms").

Each function names the collective it does in forward; its backward is the conjugate one.
With a group of None (degree 1) every function is the identity.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


class _CopyToTP(torch.autograd.Function):
    """Forward: identity. Backward: all-reduce over tp (the input was used by every rank)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTP(torch.autograd.Function):
    """Forward: all-reduce partial sums over tp. Backward: identity."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def copy_to_tp(x: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    return x if group is None else _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    return x if group is None else _ReduceFromTP.apply(x, group)


class _GatherFromTP(torch.autograd.Function):
    """Forward: all-gather along the last dim over tp. Backward: keep this rank's slice."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        n, r = dist.get_world_size(ctx.group), dist.get_rank(ctx.group)
        return grad.chunk(n, dim=-1)[r].contiguous(), None


def gather_from_tp(x: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    return x if group is None else _GatherFromTP.apply(x, group)


# --- Sequence parallelism: activations outside the tp regions are cut along dim 0 (s/tp). ---

# The single-tensor collectives: all_gather_single / reduce_scatter_single where torch has them, else
# all_gather_into_tensor / reduce_scatter_tensor (the same signatures).
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _all_gather_dim0(x: torch.Tensor, group) -> torch.Tensor:
    n = dist.get_world_size(group)
    out = torch.empty((n * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    _all_gather_single(out, x.contiguous(), group=group)
    return out


def _reduce_scatter_dim0(x: torch.Tensor, group) -> torch.Tensor:
    n = dist.get_world_size(group)
    if x.shape[0] % n != 0:
        raise ValueError(f"sequence length {x.shape[0]} is not divisible by tp={n} (sequence parallelism)")
    out = torch.empty((x.shape[0] // n,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    _reduce_scatter_single(out, x.contiguous(), group=group)
    return out


def _split_dim0(x: torch.Tensor, group) -> torch.Tensor:
    n, r = dist.get_world_size(group), dist.get_rank(group)
    if x.shape[0] % n != 0:
        raise ValueError(f"sequence length {x.shape[0]} is not divisible by tp={n} (sequence parallelism)")
    return x.chunk(n, dim=0)[r].contiguous()


class _GatherFromSP(torch.autograd.Function):
    """Forward: all-gather the sequence shards. Backward: reduce-scatter (partial grads) or split.

    Before a column-parallel layer every rank's gradient is a partial sum, so the backward
    reduce-scatters; before work that every rank repeats identically it only splits.
    """

    @staticmethod
    def forward(ctx, x, group, grad_is_partial):
        ctx.group, ctx.grad_is_partial = group, grad_is_partial
        return _all_gather_dim0(x, group)

    @staticmethod
    def backward(ctx, grad):
        if ctx.grad_is_partial:
            return _reduce_scatter_dim0(grad, ctx.group), None, None
        return _split_dim0(grad, ctx.group), None, None


class _ReduceScatterToSP(torch.autograd.Function):
    """Forward: reduce-scatter partial sums into sequence shards. Backward: all-gather."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter_dim0(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_dim0(grad, ctx.group), None


class _ScatterToSP(torch.autograd.Function):
    """Forward: keep this rank's sequence shard of a replicated tensor. Backward: all-gather."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split_dim0(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_dim0(grad, ctx.group), None


def gather_from_sp(x: torch.Tensor, group: Optional[dist.ProcessGroup], grad_is_partial: bool = True) -> torch.Tensor:
    return x if group is None else _GatherFromSP.apply(x, group, grad_is_partial)


def reduce_scatter_to_sp(x: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    return x if group is None else _ReduceScatterToSP.apply(x, group)


def scatter_to_sp(x: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    return x if group is None else _ScatterToSP.apply(x, group)


# --- Expert parallelism: tokens travel to the ranks that hold their experts and back. ---

class _AllToAll(torch.autograd.Function):
    """Forward: all-to-all with per-rank row counts. Backward: the same exchange reversed."""

    @staticmethod
    def forward(ctx, x, group, output_splits, input_splits):
        ctx.group, ctx.output_splits, ctx.input_splits = group, output_splits, input_splits
        return _all_to_all_rows(x, group, output_splits, input_splits)

    @staticmethod
    def backward(ctx, grad):
        return _all_to_all_rows(grad, ctx.group, ctx.input_splits, ctx.output_splits), None, None, None


def _all_to_all_rows(x: torch.Tensor, group, output_splits: list[int], input_splits: list[int]) -> torch.Tensor:
    out = x.new_empty((sum(output_splits),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), output_split_sizes=output_splits,
                           input_split_sizes=input_splits, group=group)
    return out


def all_to_all(x: torch.Tensor, group: Optional[dist.ProcessGroup], output_splits: list[int],
               input_splits: list[int]) -> torch.Tensor:
    """Rows x[sum(input_splits[:j]) : ...] go to rank j of `group`; rank j's rows for us arrive in
    order, output_splits[j] of them. Uneven and zero counts are allowed; differentiable."""
    return x if group is None else _AllToAll.apply(x, group, list(output_splits), list(input_splits))
