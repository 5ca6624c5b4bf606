"""The rank grid and its groups: Megatron's order, every group a partition of the world."""

import pytest

from megatron_qwen2.config import ParallelConfig
from megatron_qwen2.parallel import Topology
from megatron_qwen2.parallel.topology import GROUP_KINDS


def grid(world=16, **degrees):
    return Topology.plan(ParallelConfig(**degrees), world, rank=0)


def test_rank_order_is_tp_cp_dp_pp():
    topo = grid(16, tp=2, pp=2)  # dp = 4
    assert topo.dp == 4
    assert topo.rank_lists("tp")[:2] == [[0, 1], [2, 3]]
    assert topo.rank_lists("dp")[0] == [0, 2, 4, 6]
    assert topo.rank_lists("pp")[0] == [0, 8]
    coords = [Topology.plan(ParallelConfig(tp=2, pp=2), 16, r) for r in (0, 5, 11)]
    assert [(t.tp_rank, t.dp_rank, t.pp_rank) for t in coords] == [(0, 0, 0), (1, 2, 0), (1, 1, 1)]


def test_expert_groups_split_dp_into_blocks():
    topo = grid(16, tp=2, pp=2, ep=2)
    assert topo.rank_lists("ep")[:2] == [[0, 2], [4, 6]]
    assert topo.rank_lists("expert_dp")[:2] == [[0, 4], [2, 6]]


def test_model_parallel_and_embedding_groups():
    topo = grid(16, tp=2, pp=2)
    assert topo.rank_lists("mp")[0] == [0, 1, 8, 9]
    assert topo.rank_lists("embedding")[0] == [0, 8]
    assert grid(4, tp=2).rank_lists("embedding")[0] == [0]  # one stage: nothing to tie across


@pytest.mark.parametrize("degrees", [dict(tp=2, pp=2, ep=2), dict(tp=4, cp=2), dict(pp=4), dict(tp=1)])
def test_every_group_kind_partitions_the_world(degrees):
    topo = grid(16, **degrees)
    for kind in GROUP_KINDS:
        ranks = sorted(r for group in topo.rank_lists(kind) for r in group)
        if kind == "embedding" and topo.pp > 1:
            assert set(ranks) <= set(range(16))
        else:
            assert ranks == list(range(16)), kind


@pytest.mark.parametrize("world,degrees,needle", [
    (6, dict(tp=4), "world size 6 is not divisible by tp*cp*pp"),
    (8, dict(tp=2, ep=3), "parallel.ep=3"),
    (8, dict(tp=0), "parallel.tp"),
])
def test_bad_layouts_are_rejected_with_the_numbers(world, degrees, needle):
    with pytest.raises(ValueError, match=needle.replace("*", r"\*").replace("(", r"\(")):
        grid(world, **degrees)
