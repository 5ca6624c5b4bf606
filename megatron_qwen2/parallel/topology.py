"""The one source of truth for the parallel layout (docs/architecture.md, "How the parallel config flows").

Rank grid order, innermost first: tp, cp, dp, pp (rank = tp_rank + tp * (cp_rank + cp *
(dp_rank + dp * pp_rank))). Tensor parallelism is innermost because its collectives run
every layer on activations and must stay on the fastest links (NVLink inside a node);
context parallelism next, since its ring exchanges K/V every layer too; data parallelism
reduces gradients once per step and tolerates slower links; pipeline is outermost because it
only sends activations between neighbouring stages.

The expert grid is folded over the same ranks (MoE parallel folding): the tp x cp x dp ranks of
one pipeline stage, numbered by their stage rank s = tp_rank + tp * (cp_rank + cp * dp_rank), are
cut again, innermost first, into etp (expert-tensor parallel: the ranks that split each expert's
FFN), ep (the ranks that hold different experts) and expert_dp (the ranks that hold the same
expert shard): etp_rank = s % etp, ep_rank = (s // etp) % ep, expert_dp_rank = s // (etp * ep).
The ranks of an ep group are etp apart, so with etp = 1 and ep <= tp an ep group lies inside a tp
group (the all-to-all stays on the fastest links). The attention layout (tp, cp, dp) and the expert
layout share no constraint but ep * etp dividing tp * cp * dp; with tp = cp = 1 the expert grid is
ep carved out of dp.

Groups (`topo.groups`, one `Group` per kind: its ranks, this rank's place, the communicator):
tp, cp, dp, pp (one per grid axis), etp, ep and expert_dp (the expert grid), mp (model parallel:
every rank of one model replica, tp x cp x pp) and embedding (first and last pipeline stage, which
share the tied embedding). Context parallelism splits the sequence, not the parameters: every cp
rank holds the same parameters and sees other tokens, so dense gradients are summed (and the
distributed optimizer shards) over dp_cp (dp x cp, Megatron's data-parallel group with context
parallelism); with cp = 1 it is the dp group itself (the same communicator). Expert gradients are
summed over expert_dp, which already spans whatever tp, cp and dp ranks hold the same expert shard.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch.distributed as dist

from megatron_qwen2.config import ParallelConfig


GROUP_KINDS = ("tp", "cp", "dp", "pp", "etp", "ep", "expert_dp", "dp_cp", "mp", "embedding")


@dataclass(frozen=True)
class Group:
    """The process group of one kind that holds this rank.

    `ranks` are its global ranks (sorted), `rank` is this rank's place among them, `pg` the
    communicator: None when the group is this rank alone, and in a planned layout (Topology.plan),
    which creates no communicators.
    """

    kind: str
    ranks: tuple[int, ...] = (0,)
    rank: int = 0
    pg: Optional[dist.ProcessGroup] = None

    @property
    def size(self) -> int:
        return len(self.ranks)


@dataclass(frozen=True)
class Groups:
    """One `Group` per kind (GROUP_KINDS), as attributes: a misspelt kind is an AttributeError."""

    tp: Group = Group("tp")
    cp: Group = Group("cp")
    dp: Group = Group("dp")
    pp: Group = Group("pp")
    etp: Group = Group("etp")
    ep: Group = Group("ep")
    expert_dp: Group = Group("expert_dp")
    dp_cp: Group = Group("dp_cp")
    mp: Group = Group("mp")
    embedding: Group = Group("embedding")


@dataclass
class Topology:
    """Degrees, this rank's coordinates, and the process groups that connect it."""

    tp: int = 1
    pp: int = 1
    cp: int = 1
    dp: int = 1
    ep: int = 1
    etp: int = 1
    vpp: int = 1
    rank: int = 0
    sequence_parallel: bool = False
    tp_rank: int = 0
    cp_rank: int = 0
    dp_rank: int = 0
    pp_rank: int = 0
    groups: Groups = field(default_factory=Groups)
    # One communicator per directed edge (src, dst) between neighbouring pipeline ranks of this rank.
    p2p: dict[tuple[int, int], dist.ProcessGroup] = field(default_factory=dict)

    @property
    def stage_rank(self) -> int:
        """This rank's place among the tp x cp x dp ranks of its pipeline stage."""
        return self.tp_rank + self.tp * (self.cp_rank + self.cp * self.dp_rank)

    @property
    def etp_rank(self) -> int:
        """This rank's place in its etp group (which slice of each local expert's FFN it holds)."""
        return self.stage_rank % self.etp

    @property
    def ep_rank(self) -> int:
        """This rank's place in its ep group (which chunk of the experts it holds)."""
        return self.stage_rank // self.etp % self.ep

    @property
    def world_size(self) -> int:
        return self.tp * self.cp * self.dp * self.pp

    @classmethod
    def single(cls) -> "Topology":
        """Trivial layout of one process."""
        return cls()

    @classmethod
    def plan(cls, cfg: ParallelConfig, world_size: int, rank: int) -> "Topology":
        """Place `rank` in the grid of degrees `cfg` (validated by Config.validate) over `world_size`
        ranks; the groups carry no communicators."""
        dp = world_size // (cfg.tp * cfg.cp * cfg.pp)
        sp = cfg.sequence_parallel_on
        tp_rank = rank % cfg.tp
        cp_rank = (rank // cfg.tp) % cfg.cp
        dp_rank = (rank // (cfg.tp * cfg.cp)) % dp
        pp_rank = rank // (cfg.tp * cfg.cp * dp)
        topo = cls(tp=cfg.tp, pp=cfg.pp, cp=cfg.cp, dp=dp, ep=cfg.ep, etp=cfg.etp, vpp=cfg.vpp, rank=rank,
                   sequence_parallel=sp, tp_rank=tp_rank, cp_rank=cp_rank, dp_rank=dp_rank, pp_rank=pp_rank)
        topo.groups = Groups(**{kind: topo._group(kind, None) for kind in GROUP_KINDS})
        return topo

    @classmethod
    def build(cls, cfg: ParallelConfig, world_size: int, rank: int) -> "Topology":
        """The planned layout with every process group created (collective over all ranks)."""
        topo = cls.plan(cfg, world_size, rank)
        if world_size > 1:
            topo.groups = topo._make_communicators()
            topo.p2p = topo._make_p2p_groups()
        return topo

    def _ranks_along(self, *dims: str) -> list[list[int]]:
        """All rank lists that vary only along `dims` of the (pp, dp, cp, tp) grid (sorted ranks)."""
        sizes = {"tp": self.tp, "cp": self.cp, "dp": self.dp, "pp": self.pp}
        strides = {"tp": 1, "cp": self.tp, "dp": self.tp * self.cp, "pp": self.tp * self.cp * self.dp}
        others = [d for d in ("tp", "cp", "dp", "pp") if d not in dims]
        inside = [0]  # offsets of the ranks of one list from its first rank
        for d in dims:
            inside = sorted(o + i * strides[d] for o in inside for i in range(sizes[d]))
        lists = []
        for idx in range(self.world_size // len(inside)):
            base, rem = 0, idx
            for d in others:
                base += (rem % sizes[d]) * strides[d]
                rem //= sizes[d]
            lists.append([base + o for o in inside])
        return lists

    def _expert_ranks_along(self, dim: str) -> list[list[int]]:
        """All rank lists that vary only along `dim` of the expert grid (etp, ep, expert_dp) of each stage."""
        stage = self.tp * self.cp * self.dp
        sizes = {"etp": self.etp, "ep": self.ep, "expert_dp": stage // (self.etp * self.ep)}
        strides = {"etp": 1, "ep": self.etp, "expert_dp": self.etp * self.ep}
        firsts = [s for s in range(stage) if (s // strides[dim]) % sizes[dim] == 0]
        return [[pp_rank * stage + s + i * strides[dim] for i in range(sizes[dim])]
                for pp_rank in range(self.pp) for s in firsts]

    def rank_lists(self, name: str) -> list[list[int]]:
        """Every group of kind `name` as lists of global ranks (the partition of the world)."""
        if name in ("tp", "cp", "dp", "pp"):
            return self._ranks_along(name)
        if name in ("etp", "ep", "expert_dp"):
            return self._expert_ranks_along(name)
        if name == "dp_cp":
            return self._ranks_along("cp", "dp")
        if name == "mp":
            replicas: dict[int, list[int]] = {}
            for r in range(self.world_size):
                replicas.setdefault((r // (self.tp * self.cp)) % self.dp, []).append(r)
            return list(replicas.values())
        if name == "embedding":
            return [sorted({ranks[0], ranks[-1]}) for ranks in self._ranks_along("pp")]
        raise ValueError(f"unknown process group kind {name!r}")

    def _make_p2p_groups(self) -> dict[tuple[int, int], dist.ProcessGroup]:
        # A communicator per direction: NCCL runs the operations of one communicator in order,
        # so activations going down and gradients coming up must not queue behind each other.
        edges: list[tuple[int, int]] = []
        for ranks in self._ranks_along("pp"):
            for i in range(len(ranks) if len(ranks) > 1 else 0):
                a, b = ranks[i], ranks[(i + 1) % len(ranks)]
                for edge in ((a, b), (b, a)):
                    if edge not in edges:
                        edges.append(edge)
        mine = {}
        for edge in edges:
            g = dist.new_group(sorted(edge))
            if self.rank in edge:
                mine[edge] = g
        return mine

    def _group(self, kind: str, pg: Optional[dist.ProcessGroup]) -> Group:
        """This rank's group of `kind`, with the communicator `pg`. A stage between the first and the
        last holds no embedding: its embedding group is the rank alone."""
        ranks = next((r for r in self.rank_lists(kind) if self.rank in r), [self.rank])
        return Group(kind, tuple(ranks), ranks.index(self.rank), pg if len(ranks) > 1 else None)

    def _make_communicators(self) -> Groups:
        # new_group must be called by every rank for every group, in the same order. With cp = 1,
        # dp_cp is the dp group: the same communicator.
        made: dict[str, Optional[dist.ProcessGroup]] = {}
        for kind in GROUP_KINDS:
            if self.cp == 1 and kind == "dp_cp":
                made[kind] = made["dp"]
                continue
            for ranks in self.rank_lists(kind):
                pg = dist.new_group(ranks) if len(ranks) > 1 else None
                if self.rank in ranks:
                    made[kind] = pg
        return Groups(**{kind: self._group(kind, made.get(kind)) for kind in GROUP_KINDS})
