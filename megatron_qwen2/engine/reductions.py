"""Which process group sums which gradients and losses: the one place that says so.

A parameter is replicated over every rank that holds the same piece of it, and its gradient is
summed over exactly those ranks:

| what                                                            | summed over            |
|-----------------------------------------------------------------|------------------------|
| dense parameters (replicated over dp and cp)                    | `dense` = dp x cp      |
| expert parameters (split over etp and ep, replicated over expert_dp, folded over tp x cp x dp) | `expert` = expert_dp |
| tp-replicated parameters that see part of the tokens (sequence-parallel norms and biases) or share kv rows (tp > kv heads) | `tp` |
| the tied embedding's copies on the first and last stage         | `tied_embedding`       |
| the loss sums of the last stage                                 | `loss` = pp, then dp x cp |

The distributed optimizer shards each bucket over the group that reduces it. The gradient norm
adds squared sums over the groups holding different pieces. Dense parameters: `dense` when
sharded, then `norm` (the model-parallel group tp x cp x pp), where only cp rank 0 (`cp`) brings
its sum because the cp ranks hold the same reduced gradients. Expert parameters: `ep`, `etp` and
`expert` when sharded give every rank of the stage the stage's expert sum, which only tp rank 0
and cp rank 0 bring to `norm`.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_qwen2.parallel.topology import Group, Topology


@dataclass(frozen=True)
class GradientReductions:
    """The groups of one rank by the role they play in reducing gradients (single process: all alone)."""

    dense: Group = Group("dp_cp")
    expert: Group = Group("expert_dp")
    tp: Group = Group("tp")
    tied_embedding: Group = Group("embedding")
    loss: tuple[Group, ...] = ()
    norm: Group = Group("mp")
    ep: Group = Group("ep")
    etp: Group = Group("etp")
    cp: Group = Group("cp")

    @classmethod
    def of(cls, topo: Topology) -> "GradientReductions":
        g = topo.groups
        return cls(dense=g.dp_cp, expert=g.expert_dp, tp=g.tp, tied_embedding=g.embedding,
                   loss=(g.pp, g.dp_cp), norm=g.mp, ep=g.ep, etp=g.etp, cp=g.cp)
