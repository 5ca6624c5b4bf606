"""Where each local tensor sits in the canonical (global) checkpoint layout.

A parameter's local tensor is described by `param_shard_spec`: the global shape and a list of
rectangular regions, each mapping a box of the local tensor to a box of the global tensor, and
saying whether this rank is the one that writes it (replicated data is written once). It reads the
parameter's `Shard` (parallel/shard.py): the global shape, this rank's offsets, explicit tp rows
(kv heads replicated when tp > kv heads, an expert's gate and up rows under etp; the rows another
tp rank owns are not written here), and
whether this rank owns the values at all (not for a replicated parameter on tp ranks but the first,
nor for the last stage's copy of a tied embedding, which is read like the original).

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

import torch

from megatron_qwen2.parallel.shard import shard_of


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


def _runs(index) -> list[tuple[int, int, int]]:
    """Cut a sequence of indices into runs of consecutive values: (local start, global start, length)."""
    idx = list(index)
    runs, start = [], 0
    for i in range(1, len(idx) + 1):
        if i == len(idx) or idx[i] != idx[i - 1] + 1:
            runs.append((start, idx[start], i - start))
            start = i
    return runs


def param_shard_spec(p: torch.Tensor, topo) -> ShardSpec:
    """The global shape of parameter `p` and the regions of it that this rank holds."""
    shard = shard_of(p)
    shape = tuple(p.shape)
    tensor = shard.tensor_group(topo.groups.tp, topo.groups.etp)  # etp for experts (parallel/shard.py)
    tp_rank, tp = tensor.rank, tensor.size
    gshape = shard.global_shape(shape, tp, topo.groups.ep.size)
    goff = shard.offsets(shape, tp_rank, topo.groups.ep.rank)
    writer = shard.owns(tp_rank)
    if shard.tp_rows is None:
        return ShardSpec(gshape, (Region((0,) * len(shape), shape, goff, writer),))

    # Explicit rows along tp_dim: one region per run of consecutive global rows.
    dim = shard.tp_dim
    shared = set(shard.rows_owned_elsewhere(tp_rank, tp))
    regions = []
    for lstart, gstart, n in _runs(shard.tp_rows):
        for sub_start, sub_n, sub_writer in _split_by(lstart, n, shared):
            loff, off, size = [0] * len(shape), list(goff), list(shape)
            loff[dim], off[dim], size[dim] = sub_start, gstart + (sub_start - lstart), sub_n
            regions.append(Region(tuple(loff), tuple(size), tuple(off), writer and sub_writer))
    return ShardSpec(gshape, tuple(regions))


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
