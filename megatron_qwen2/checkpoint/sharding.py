"""Where each local tensor sits in the canonical (global) checkpoint layout.

A parameter's local tensor is described by `param_shard_spec`: the global shape and a list of
rectangular regions, each mapping a box of the local tensor to a box of the global tensor, and
saying whether this rank is the one that writes it (replicated data is written once). This is
the only place that reads the sharding attributes of parameters:

- `tp_split_dim` (parallel/layers.py): the dimension cut into tp contiguous chunks;
- `tp_row_index` / `tp_global_size`: explicit global rows (kv heads replicated when tp > kv heads);
- `tp_kv_replica`: the local rows shared with other tp ranks (only the first holder writes them);
- `ep_split_dim`: the dimension cut over the expert-parallel group (expert weights, dim 0);
- `pipeline_copy`: the last stage's copy of a tied embedding (never written; read like the original).

Replication over data and context parallelism (dp, cp) is not a property of the parameter: the
ranks of its gradient bucket's group hold the same values, and the checkpoint writer picks one of
them (checkpoint/distributed.py), so the layout on disk does not depend on dp or cp.

`flat_pieces` then cuts a flat range of the local tensor (a distributed-optimizer fragment)
into boxes that are contiguous in memory and lie inside one region each, so every piece of
master weights or Adam state is a plain chunk of a global tensor with offsets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Region:
    """A box of the local tensor (local_offsets, sizes) placed at global_offsets."""

    local_offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    global_offsets: tuple[int, ...]
    writer: bool  # False when another rank of the tp/ep grid writes the same values


@dataclass(frozen=True)
class ShardSpec:
    global_shape: tuple[int, ...]
    regions: tuple[Region, ...]


@dataclass(frozen=True)
class Piece:
    """A box of a global tensor held by this rank, inside a memory-contiguous box of the local tensor.

    The enclosing box starts at flat offset `box_start` of the local tensor and has `box_sizes`
    from `box_offsets`; the piece is its part `local_offsets` + `sizes`, at `global_offsets`.
    """

    box_start: int
    box_offsets: tuple[int, ...]
    box_sizes: tuple[int, ...]
    local_offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    global_offsets: tuple[int, ...]
    writer: bool

    def view(self, flat: torch.Tensor, flat_start: int) -> torch.Tensor:
        """The piece's elements inside `flat`, a 1-D tensor holding the local tensor from `flat_start` on."""
        lo = self.box_start - flat_start
        t = flat[lo:lo + math.prod(self.box_sizes)].view(self.box_sizes)
        for d, (a, b, n) in enumerate(zip(self.local_offsets, self.box_offsets, self.sizes)):
            if a != b or n != self.box_sizes[d]:
                t = t.narrow(d, a - b, n)
        return t


def _group_rank_size(group: Optional[dist.ProcessGroup]) -> tuple[int, int]:
    return (0, 1) if group is None else (dist.get_rank(group), dist.get_world_size(group))


def _runs(index: torch.Tensor) -> list[tuple[int, int, int]]:
    """Cut an index vector into runs of consecutive values: (local start, global start, length)."""
    idx = index.tolist()
    runs, start = [], 0
    for i in range(1, len(idx) + 1):
        if i == len(idx) or idx[i] != idx[i - 1] + 1:
            runs.append((start, idx[start], i - start))
            start = i
    return runs


def param_shard_spec(p: torch.Tensor, topo) -> ShardSpec:
    """The global shape of parameter `p` and the regions of it that this rank holds."""
    shape = tuple(p.shape)
    gshape, goff = list(shape), [0] * len(shape)
    tp_rank, tp = _group_rank_size(topo.group("tp"))
    writer = not getattr(p, "pipeline_copy", False)
    dim = getattr(p, "tp_split_dim", None)
    rows = getattr(p, "tp_row_index", None)
    if dim is None:
        writer = writer and tp_rank == 0  # replicated over tp
    elif rows is None:
        gshape[dim] = shape[dim] * tp
        goff[dim] = tp_rank * shape[dim]
    ep_dim = getattr(p, "ep_split_dim", None)
    if ep_dim is not None:
        ep_rank, ep = _group_rank_size(topo.group("ep"))
        gshape[ep_dim] = shape[ep_dim] * ep
        goff[ep_dim] += ep_rank * shape[ep_dim]
    if rows is None:
        return ShardSpec(tuple(gshape), (Region((0,) * len(shape), shape, tuple(goff), writer),))

    # Explicit rows along `dim`: one region per run of consecutive global rows.
    gshape[dim] = p.tp_global_size
    shared = set()
    replica = getattr(p, "tp_kv_replica", None)
    if replica is not None:
        _, nkv, kv_local = replica
        if tp_rank % (tp // nkv) != 0:  # another rank holding this kv head writes its rows
            shared = set(kv_local.tolist())
    regions = []
    for lstart, gstart, n in _runs(rows):
        for sub_start, sub_n, sub_writer in _split_by(lstart, n, shared):
            loff, off, size = [0] * len(shape), list(goff), list(shape)
            loff[dim], off[dim], size[dim] = sub_start, gstart + (sub_start - lstart), sub_n
            regions.append(Region(tuple(loff), tuple(size), tuple(off), writer and sub_writer))
    return ShardSpec(tuple(gshape), tuple(regions))


def _split_by(start: int, n: int, shared: set) -> list[tuple[int, int, bool]]:
    """Split local rows [start, start+n) into runs that are all shared or all not: (start, n, writes)."""
    out: list[tuple[int, int, bool]] = []
    for r in range(start, start + n):
        w = r not in shared
        if out and out[-1][2] == w:
            out[-1] = (out[-1][0], out[-1][1] + 1, w)
        else:
            out.append((r, 1, w))
    return out


def _flat_boxes(start: int, end: int, shape: tuple[int, ...]) -> list[tuple[int, int, tuple, tuple]]:
    """Cut the flat range [start, end) of a row-major `shape` into memory-contiguous boxes.

    Each box is (flat start, flat end, offsets, sizes) with sizes (1, ..., 1, k, full, ..., full).
    """
    if start >= end:
        return []
    if len(shape) == 0:
        return [(start, end, (), ())]
    inner = math.prod(shape[1:])
    if start % inner == 0 and end % inner == 0:
        return [(start, end, (start // inner,) + (0,) * (len(shape) - 1), (end // inner - start // inner,) + shape[1:])]
    boxes = []
    first, last = start // inner, (end - 1) // inner
    if start % inner:  # a partial leading row
        stop = min(end, (first + 1) * inner)
        for s, e, off, size in _flat_boxes(start - first * inner, stop - first * inner, shape[1:]):
            boxes.append((s + first * inner, e + first * inner, (first,) + off, (1,) + size))
        start = stop
    full_end = end - end % inner if end % inner else end
    if start < full_end:
        boxes.extend(_flat_boxes(start, full_end, shape))
        start = full_end
    if start < end:  # a partial trailing row
        for s, e, off, size in _flat_boxes(start - last * inner, end - last * inner, shape[1:]):
            boxes.append((s + last * inner, e + last * inner, (last,) + off, (1,) + size))
    return boxes


def flat_pieces(spec: ShardSpec, shape: tuple[int, ...], start: int, end: int) -> list[Piece]:
    """The boxes of the flat range [start, end) of a local tensor of `shape`, placed globally."""
    pieces = []
    for s, _, off, size in _flat_boxes(start, end, tuple(shape)):
        for reg in spec.regions:
            lo = [max(a, b) for a, b in zip(off, reg.local_offsets)]
            hi = [min(a + n, b + m) for a, n, b, m in zip(off, size, reg.local_offsets, reg.sizes)]
            if any(h <= l for l, h in zip(lo, hi)):
                continue
            sizes = tuple(h - l for l, h in zip(lo, hi))
            goff = tuple(g + (l - r) for g, l, r in zip(reg.global_offsets, lo, reg.local_offsets))
            pieces.append(Piece(s, off, size, tuple(lo), sizes, goff, reg.writer))
    return pieces
