"""The rank grid and its groups: Megatron's order, every group a partition of the world."""

import pytest

from megatron_qwen2.config import ParallelConfig
from megatron_qwen2.parallel import Topology
from megatron_qwen2.parallel.topology import GROUP_KINDS
from tests.distributed import run_distributed


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


def test_expert_grid_folds_over_the_ranks_of_a_stage():
    """etp innermost, then ep, then expert-dp over the tp x cp x dp ranks of each pipeline stage."""
    topo = grid(16, tp=2, pp=2, ep=2)  # stage ranks 0-7 and 8-15: ep over the tp pair
    assert topo.rank_lists("ep")[:2] == [[0, 1], [2, 3]]
    assert topo.rank_lists("expert_dp")[:2] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert topo.rank_lists("ep")[4] == [8, 9]
    topo = grid(16, tp=2, pp=2, ep=2, etp=2)  # etp over the tp pair, ep across dp
    assert topo.rank_lists("etp")[:2] == [[0, 1], [2, 3]]
    assert topo.rank_lists("ep")[:2] == [[0, 2], [1, 3]]
    assert topo.rank_lists("expert_dp")[:2] == [[0, 4], [1, 5]]
    topo = grid(8, cp=2, ep=4)  # dp 4: ep spans cp and dp
    assert topo.rank_lists("ep") == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert topo.rank_lists("expert_dp") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    coords = [Topology.plan(ParallelConfig(tp=2, ep=2, etp=2), 8, r) for r in (0, 3, 6)]
    assert [(t.etp_rank, t.ep_rank, t.groups.expert_dp.rank) for t in coords] == [(0, 0, 0), (1, 1, 0), (0, 1, 1)]


def test_model_parallel_and_embedding_groups():
    topo = grid(16, tp=2, pp=2)
    assert topo.rank_lists("mp")[0] == [0, 1, 8, 9]
    assert topo.rank_lists("embedding")[0] == [0, 8]
    assert grid(4, tp=2).rank_lists("embedding")[0] == [0]  # one stage: nothing to tie across


@pytest.mark.parametrize("degrees", [dict(tp=2, pp=2, ep=2), dict(tp=2, cp=2, ep=2, etp=2), dict(tp=4, cp=2),
                                     dict(pp=4), dict(tp=1)])
def test_every_group_kind_partitions_the_world(degrees):
    topo = grid(16, **degrees)
    for kind in GROUP_KINDS:
        ranks = sorted(r for group in topo.rank_lists(kind) for r in group)
        if kind == "embedding" and topo.pp > 1:
            assert set(ranks) <= set(range(16))
        else:
            assert ranks == list(range(16)), kind


def test_groups_are_typed_and_a_misspelt_kind_is_an_error():
    topo = Topology.plan(ParallelConfig(tp=2, cp=2, ep=2), 16, rank=5)  # dp 4
    for kind in GROUP_KINDS:
        group = getattr(topo.groups, kind)
        ranks = next(r for r in topo.rank_lists(kind) if 5 in r)
        assert (group.kind, group.ranks, group.rank, group.size) == (kind, tuple(ranks), ranks.index(5), len(ranks))
        assert group.pg is None  # a planned layout has no communicators
    assert (topo.groups.tp.rank, topo.groups.cp.rank, topo.groups.dp.rank) == (topo.tp_rank, topo.cp_rank, topo.dp_rank)
    with pytest.raises(AttributeError):
        topo.groups.dpcp


def test_a_middle_pipeline_stage_has_no_embedding_partner():
    for rank, stage_ranks in ((0, (0, 3)), (1, (1,)), (2, (2,)), (3, (0, 3))):
        groups = Topology.plan(ParallelConfig(pp=4), 4, rank=rank).groups
        assert (groups.embedding.ranks, groups.embedding.size, groups.pp.size) == (stage_ranks, len(stage_ranks), 4)


def _built_groups(rank, world_size):
    import torch.distributed as dist
    topo = Topology.build(ParallelConfig(tp=2, ep=2, etp=2), world_size, rank)  # dp 2, ep 2 over dp, etp 2 = tp
    out = {}
    for kind in GROUP_KINDS:
        g = getattr(topo.groups, kind)
        out[kind] = (g.size, g.rank, None if g.pg is None else (dist.get_world_size(g.pg), dist.get_rank(g.pg)))
    return out


def test_built_groups_carry_communicators_that_agree_with_their_sizes():
    for rank, groups in enumerate(run_distributed(_built_groups, 4)):
        for kind, (size, place, comm) in groups.items():
            assert comm == (None if size == 1 else (size, place)), (rank, kind)
