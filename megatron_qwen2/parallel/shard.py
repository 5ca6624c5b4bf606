"""How a parameter is laid out over the parallel groups: one frozen `Shard` per parameter.

The layer that makes a parameter attaches its Shard (`set_shard`); everything that needs the
layout reads it through `shard_of`, which gives the replicated default for a parameter without
one: checkpoint sharding (global shape, offsets, which rank writes), initialisation (this rank's
part of the full tensor), the gradient-norm mask (which rank counts a value), the tp gradient
sums, the gradient buffer's expert buckets and the planner.

A parameter is cut over tp along `tp_dim` into equal contiguous chunks (tp rank r holds chunk r),
or, when `tp_rows` is given, holds those global rows along `tp_dim` (of `tp_dim_size`), which may
overlap other ranks' rows: the fused QKV weight when tp exceeds the number of kv heads. Expert
weights are cut over ep along `ep_dim` into equal contiguous chunks (ep rank r holds chunk r), and
their `tp_dim` / `tp_rows` are cut over the expert-tensor-parallel group etp instead of tp
(`Shard.tensor_group`): the expert grid is folded over the attention ranks (parallel/topology.py),
so an expert is never replicated over tp.
Every value of the model has one owner rank, which writes it to checkpoints and counts it in the
gradient norm; the other ranks that hold it are copies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

_ATTRIBUTE = "parallel_shard"


@dataclass(frozen=True)
class KvReplica:
    """The k/v rows of one kv head, held alike by the tp / num_heads consecutive tp ranks of that head.

    Each holder receives only part of their gradient; the tp gradient sum adds the holders of
    each head (`head` is this rank's slot among `num_heads`). The first holder owns the rows.
    """

    head: int
    num_heads: int
    rows: range  # local rows along dimension 0

    def is_first_holder(self, tp_rank: int, tp: int) -> bool:
        return tp_rank % (tp // self.num_heads) == 0


@dataclass(frozen=True)
class Shard:
    """The layout of one parameter over tp, ep and pipeline stages (the default: replicated).

    tp_dim: the dimension cut over the parameter's tensor group (`tensor_group`: tp, or etp for an
        expert weight; None: replicated over it).
    tp_rows / tp_dim_size: the global indices along tp_dim that this rank holds, and the global
        size of tp_dim, when they are not this rank's contiguous chunk.
    grad_needs_tp_sum: replicated over tp, but each tp rank sees only its own tokens (sequence
        parallelism), so its gradient is summed over tp before the step.
    kv_replica: the local rows this rank shares with other tp ranks (see KvReplica).
    ep_dim: the dimension cut over ep (expert weights); None for everything else.
    tied_copy: this stage's copy of a parameter that another pipeline stage owns (the tied
        embedding on the last stage): never written, never counted in the gradient norm here.
    """

    tp_dim: Optional[int] = None
    tp_rows: Optional[tuple[int, ...]] = None
    tp_dim_size: Optional[int] = None
    grad_needs_tp_sum: bool = False
    kv_replica: Optional[KvReplica] = None
    ep_dim: Optional[int] = None
    tied_copy: bool = False

    def __post_init__(self):
        if (self.tp_rows is None) != (self.tp_dim_size is None):
            raise ValueError("tp_rows and tp_dim_size come together")
        if self.tp_rows is not None and self.tp_dim is None:
            raise ValueError("tp_rows need a tp_dim")
        if self.kv_replica is not None and (self.tp_rows is None or self.tp_dim != 0):
            raise ValueError("a kv replica is rows of dimension 0 given by tp_rows")
        if self.grad_needs_tp_sum and self.tp_dim is not None:
            raise ValueError("only a parameter replicated over tp has a partial tp gradient")

    @property
    def is_expert(self) -> bool:
        """Cut over ep, hence replicated over expert-dp rather than dp."""
        return self.ep_dim is not None

    def tensor_group(self, tp, etp):
        """Which of the two groups cuts tp_dim: etp for an expert weight, tp for every other parameter.
        The Shard methods' `tp` / `tp_rank` arguments are its size and this rank's place in it."""
        return etp if self.is_expert else tp

    def global_shape(self, local_shape: Sequence[int], tp: int, ep: int) -> tuple[int, ...]:
        """The shape of the full tensor of which a local tensor of `local_shape` is this rank's part."""
        shape = list(local_shape)
        if self.tp_rows is not None:
            shape[self.tp_dim] = self.tp_dim_size
        elif self.tp_dim is not None:
            shape[self.tp_dim] *= tp
        if self.ep_dim is not None:
            shape[self.ep_dim] *= ep
        return tuple(shape)

    def offsets(self, local_shape: Sequence[int], tp_rank: int, ep_rank: int) -> tuple[int, ...]:
        """Where this rank's local tensor starts in the full tensor (0 along tp_dim when tp_rows
        place its rows one by one)."""
        off = [0] * len(local_shape)
        if self.tp_dim is not None and self.tp_rows is None:
            off[self.tp_dim] = tp_rank * local_shape[self.tp_dim]
        if self.ep_dim is not None:
            off[self.ep_dim] += ep_rank * local_shape[self.ep_dim]
        return tuple(off)

    def local_part(self, full: torch.Tensor, tp: int, tp_rank: int, ep: int, ep_rank: int) -> torch.Tensor:
        """This rank's part of the full tensor `full`."""
        if self.ep_dim is not None:
            full = full.chunk(ep, dim=self.ep_dim)[ep_rank]
        if self.tp_rows is not None:
            return full.index_select(self.tp_dim, torch.tensor(self.tp_rows, device=full.device))
        if self.tp_dim is not None:
            return full.chunk(tp, dim=self.tp_dim)[tp_rank]
        return full

    def owns(self, tp_rank: int) -> bool:
        """Whether this rank owns the values it holds (but see `rows_owned_elsewhere`): not a tied
        copy, and for a parameter replicated over tp only on tp rank 0."""
        return not self.tied_copy and (self.tp_dim is not None or tp_rank == 0)

    def rows_owned_elsewhere(self, tp_rank: int, tp: int) -> range:
        """Local rows along tp_dim that another tp rank owns: shared kv rows on all but their first holder."""
        if self.kv_replica is None or self.kv_replica.is_first_holder(tp_rank, tp):
            return range(0)
        return self.kv_replica.rows

    def norm_mask(self, shape: Sequence[int], tp_rank: int, tp: int,
                  device: Optional[torch.device] = None) -> torch.Tensor:
        """Flat bool mask over a local tensor of `shape`: the elements this rank counts in the
        gradient norm (those it owns), so that every value of the model counts once over tp."""
        mask = torch.ones(tuple(shape), dtype=torch.bool, device=device)
        if not self.owns(tp_rank):
            mask.fill_(False)
        else:
            rows = self.rows_owned_elsewhere(tp_rank, tp)
            if len(rows):
                mask.narrow(self.tp_dim, rows.start, len(rows)).fill_(False)
        return mask.view(-1)


REPLICATED = Shard()


def set_shard(p: torch.Tensor, shard: Shard) -> torch.Tensor:
    """Attach `shard` to parameter `p` (where it is made); returns `p`."""
    setattr(p, _ATTRIBUTE, shard)
    return p


def shard_of(p: torch.Tensor) -> Shard:
    """The Shard attached to parameter `p`, or the replicated default."""
    return getattr(p, _ATTRIBUTE, REPLICATED)
