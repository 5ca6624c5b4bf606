"""The shard description of parameters (megatron_qwen2/parallel/shard.py).

(a) the Shard rules on small tensors: global shape, offsets, this rank's part, ownership and the
    gradient-norm mask (every value of the model counts on exactly one tp rank);
(b) every parameter of tiny dense and MoE models at tp 2 / ep 2 (and tp 4 over 2 kv heads, and a
    last pipeline stage with a tied embedding) carries the shard it should;
(c) the planner's parameters (meta-device chunks) against the real chunks built in gloo processes.
"""

import pytest
import torch

from megatron_qwen2.config import Config, ModelConfig, ParallelConfig, TrainConfig
from megatron_qwen2.model import Qwen2Model
from megatron_qwen2.parallel.shard import REPLICATED, KvReplica, Shard, set_shard, shard_of
from megatron_qwen2.parallel.topology import Topology
from megatron_qwen2.planner import stage_parameters, stage_params
from tests.distributed import run_distributed


def tiny(**kw) -> ModelConfig:
    base = dict(hidden_size=64, num_layers=2, num_attention_heads=4, num_kv_heads=2, ffn_hidden_size=128,
                vocab_size=256)
    base.update(kw)
    return ModelConfig(**base)


MOE = dict(num_experts=4, moe_top_k=2, moe_ffn_hidden_size=32, shared_expert_ffn_hidden_size=48)


# ----------------------------------------------------------------------------- (a) the rules

def test_tp_split_global_shape_offsets_and_part():
    full = torch.arange(24.0).view(6, 4)
    shard = Shard(tp_dim=1)
    for r in range(2):
        part = shard.local_part(full, 2, r, 1, 0)
        assert torch.equal(part, full[:, 2 * r:2 * r + 2])
        assert shard.global_shape(part.shape, 2, 1) == (6, 4)
        assert shard.offsets(part.shape, r, 0) == (0, 2 * r)
        assert shard.owns(r)


def test_ep_split_global_shape_offsets_and_part():
    full = torch.arange(4 * 3 * 2.0).view(4, 3, 2)
    shard = Shard(ep_dim=0)
    assert shard.is_expert and not Shard(tp_dim=0).is_expert and not REPLICATED.is_expert
    for r in range(2):
        part = shard.local_part(full, 2, 1, 2, r)  # replicated over tp: every tp rank the same
        assert torch.equal(part, full[2 * r:2 * r + 2])
        assert shard.global_shape(part.shape, 2, 2) == (4, 3, 2)
        assert shard.offsets(part.shape, 1, r) == (2 * r, 0, 0)


def test_explicit_rows_are_placed_one_by_one():
    full = torch.arange(12.0).view(6, 2)
    shard = Shard(tp_dim=0, tp_rows=(1, 3, 4), tp_dim_size=6)
    part = shard.local_part(full, 4, 2, 1, 0)
    assert torch.equal(part, full[[1, 3, 4]])
    assert shard.global_shape(part.shape, 4, 1) == (6, 2)
    assert shard.offsets(part.shape, 2, 0) == (0, 0)


def test_replicated_and_tied_copy_ownership():
    assert [REPLICATED.owns(r) for r in range(4)] == [True, False, False, False]
    assert [Shard(grad_needs_tp_sum=True).owns(r) for r in range(2)] == [True, False]
    assert not any(Shard(tp_dim=0, tied_copy=True).owns(r) for r in range(4))
    assert not Shard(tp_dim=0, tied_copy=True).norm_mask((3, 2), 0, 2).any()
    assert REPLICATED.global_shape((5,), 8, 8) == (5,)


def _kv_rows(tp_rank: int) -> tuple[tuple[int, ...], int]:
    """QKV rows of tp rank r for 4 query heads over 2 kv heads of 16 channels at tp 4, by hand:
    the kv group of head j is rows 64j ... 64j + 63 (q, q, k, v); ranks 2j and 2j + 1 hold one q
    head each and both hold k_j, v_j."""
    head, part = divmod(tp_rank, 2)
    start = 64 * head
    return tuple(range(start + 16 * part, start + 16 * part + 16)) + tuple(range(start + 32, start + 64)), head


def _qkv_shard(tp_rank: int) -> Shard:
    rows, head = _kv_rows(tp_rank)
    return Shard(tp_dim=0, tp_rows=rows, tp_dim_size=128, kv_replica=KvReplica(head, 2, range(16, 48)))


def test_every_value_counts_once_in_the_norm_over_tp():
    tp = 4
    counts = torch.zeros(128, 3)  # the global qkv weight, 3 input columns
    for r in range(tp):
        shard = _qkv_shard(r)
        assert shard.kv_replica.is_first_holder(r, tp) == (r % 2 == 0)
        assert shard.rows_owned_elsewhere(r, tp) == (range(0) if r % 2 == 0 else range(16, 48))
        mask = shard.norm_mask((48, 3), r, tp).view(48, 3)
        counts.index_add_(0, torch.tensor(shard.tp_rows), mask.float())
    assert torch.equal(counts, torch.ones(128, 3))
    for shard in (REPLICATED, Shard(grad_needs_tp_sum=True)):  # the same values on both tp ranks
        total = sum(shard.norm_mask((4, 2), r, 2).float() for r in range(2))
        assert torch.equal(total, torch.ones(8))
    assert all(Shard(tp_dim=1).norm_mask((4, 2), r, 2).all() for r in range(2))  # distinct values


@pytest.mark.parametrize("kw", [dict(tp_rows=(0, 1)), dict(tp_dim_size=4), dict(tp_dim=None, tp_rows=(0,), tp_dim_size=2),
                                dict(tp_dim=0, kv_replica=KvReplica(0, 1, range(0, 1))),
                                dict(tp_dim=0, grad_needs_tp_sum=True)])
def test_inconsistent_shards_are_rejected(kw):
    with pytest.raises(ValueError):
        Shard(**kw)


def test_attached_once_and_kept_through_module_casts():
    lin = torch.nn.Linear(4, 4)
    assert shard_of(lin.weight) is REPLICATED
    assert set_shard(lin.weight, Shard(tp_dim=0)) is lin.weight
    lin.to(torch.float64)
    assert shard_of(lin.weight) == Shard(tp_dim=0)


# ----------------------------------------------------------------------------- (b) the model's shards

def expected_shard(name: str, cfg: ModelConfig, topo: Topology, first_stage: bool) -> Shard:
    """The shard each parameter of the model should carry, by its role (what this test states)."""
    sp = topo.sequence_parallel
    if name == "embedding.weight":
        return Shard(tp_dim=0, tied_copy=not first_stage)
    if name.endswith("norm.weight"):
        return Shard(grad_needs_tp_sum=sp)
    if ".attention.qkv." in name:
        return _qkv_shard(topo.tp_rank) if topo.tp > cfg.num_kv_heads else Shard(tp_dim=0)
    if name.endswith("router.weight") or name.endswith("shared_expert_gate.weight"):
        return REPLICATED
    if ".experts." in name:
        if topo.etp == 1:
            return Shard(ep_dim=0)
        if name.endswith("down_weight"):  # row-split over etp
            return Shard(ep_dim=0, tp_dim=2)
        f, r = cfg.moe_ffn_hidden_size, topo.etp_rank  # gate rows r*f/etp.. and the same up rows
        n = f // topo.etp
        rows = tuple(range(r * n, (r + 1) * n)) + tuple(range(f + r * n, f + (r + 1) * n))
        return Shard(ep_dim=0, tp_dim=1, tp_rows=rows, tp_dim_size=2 * f)
    if name.endswith("gate_up.weight") or name.endswith("down.weight") or name.endswith("attention.out.weight"):
        return Shard(tp_dim=1)
    if name == "output.weight":
        return Shard(tp_dim=0)
    raise AssertionError(f"unexpected parameter {name}")


@pytest.mark.parametrize("model, par, world", [
    (tiny(qkv_bias=False), ParallelConfig(tp=2), 2),
    (tiny(**MOE), ParallelConfig(tp=2, ep=2), 4),
    (tiny(), ParallelConfig(tp=4), 4),
    (tiny(tie_word_embeddings=True, **MOE), ParallelConfig(pp=2, ep=2), 4),
    (tiny(**MOE), ParallelConfig(tp=2, ep=2, etp=2), 4),
], ids=["dense-tp2", "moe-tp2-ep2", "dense-tp4-kv-replica", "moe-pp2-ep2-tied", "moe-tp2-ep2-etp2"])
def test_every_parameter_has_its_shard(model, par, world):
    par.validate()
    full = dict(Qwen2Model(model).named_parameters())  # one process: the global tensors
    for rank in range(world):
        topo = Topology.plan(par, world, rank)
        first, last = topo.pp_rank == 0, topo.pp_rank == par.pp - 1
        layers = range(model.num_layers) if par.pp == 1 else [topo.pp_rank]
        chunk = Qwen2Model(model, topo, layer_ids=layers, pre_process=first, post_process=last)
        names = [n for n, _ in chunk.named_parameters()]
        assert any(".attention.qkv.bias" in n for n in names) == model.qkv_bias
        assert ("embedding.weight" in names) == (first or model.tie_word_embeddings)
        for name, p in chunk.named_parameters():
            shard = shard_of(p)
            assert shard == expected_shard(name, model, topo, first), (rank, name)
            # Initialised as this rank's part of the one-process model, which the shard locates.
            tensor = shard.tensor_group(topo.groups.tp, topo.groups.etp)
            assert shard.global_shape(p.shape, tensor.size, topo.ep) == full[name].shape, (rank, name)
            assert torch.equal(p, shard.local_part(full[name], tensor.size, tensor.rank, topo.ep, topo.ep_rank)), \
                (rank, name)


# ----------------------------------------------------------------------------- (c) planner vs real chunks

# (model, parallel) on 4 ranks: kv heads replicated over tp 4 with a qkv bias and a tied head,
# MoE at tp 2 x ep 2, MoE over pp 2 x ep 2 with a tied embedding, MoE at cp 2 x ep 2, MoE at etp 2 x ep 2.
LAYOUTS = [
    (tiny(tie_word_embeddings=True), ParallelConfig(tp=4)),
    (tiny(**MOE), ParallelConfig(tp=2, ep=2)),
    (tiny(tie_word_embeddings=True, **MOE), ParallelConfig(pp=2, ep=2)),
    (tiny(**MOE), ParallelConfig(cp=2, ep=2)),
    (tiny(**MOE), ParallelConfig(tp=2, ep=2, etp=2)),
]


def _built_params(rank, world):
    from megatron_qwen2.engine.pipeline import build_model_chunks

    out = []
    for model, par in LAYOUTS:
        par.validate()
        topo = Topology.build(par, world, rank)
        chunks = build_model_chunks(model, par, topo)
        params = [(tuple(p.shape), shard_of(p)) for c in chunks for p in c.parameters()]
        out.append((topo.pp_rank, topo.rank == topo.pp_rank * (world // par.pp), params))
    return out


def test_planner_parameters_match_the_built_chunks():
    results = run_distributed(_built_params, 4)
    for i, (model, par) in enumerate(LAYOUTS):
        cfg = Config(model=model, parallel=par, train=TrainConfig(seq_length=32, micro_batch_size=1,
                                                                  global_batch_size=8)).validate(4)
        planned = [[(tuple(p.shape), shard_of(p)) for p in ps] for ps in stage_parameters(cfg)]
        counts = stage_params(cfg)
        assert all(p.is_meta for ps in stage_parameters(cfg) for p in ps)
        for rank, built in enumerate(results):
            pp_rank, planned_rank, params = built[i]
            assert [s for s, _ in params] == [s for s, _ in planned[pp_rank]], (i, rank)
            expert = sum(torch.Size(s).numel() for s, sh in params if sh.is_expert)
            dense = sum(torch.Size(s).numel() for s, sh in params if not sh.is_expert)
            assert counts[pp_rank] == {"dense": dense, "expert": expert}, (i, rank)
            if planned_rank:  # the rank the planner builds: tp, cp and dp rank 0 of its stage
                assert params == planned[pp_rank], (i, rank)
