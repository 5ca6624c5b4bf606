"""Context parallelism: ring attention equals full-sequence attention; cp (with tp, sp, pp, dp)
trains the same model as one process on packed documents; checkpoints cross cp degrees."""

import json
import random

import pytest
import torch
import torch.distributed as dist

from megatron_qwen2.config import Config, DataConfig, ModelConfig, OptimConfig, ParallelConfig, TrainConfig
from megatron_qwen2.ops import reference
from megatron_qwen2.parallel.cp import (BlockMask, ContextParallelRing, KernelBlockAttention, MathBlockAttention,
                                        chunk_positions, ring_attention, split_sequence)
from megatron_qwen2.train import train
from tests.distributed import run_distributed
from tests.parallel.runs import assert_same_training, read_run


# ---------------------------------------------------------------------------------------------
# Layout


def merge_sequence(shares, dim: int = 1) -> torch.Tensor:
    """The full sequence from every cp rank's share (the inverse of `split_sequence`)."""
    cp = len(shares)
    halves = [s.chunk(2, dim=dim) for s in shares]
    return torch.cat([halves[r][0] for r in range(cp)] + [halves[r][1] for r in reversed(range(cp))], dim=dim)


def test_gradient_groups_span_dp_and_cp():
    from megatron_qwen2.parallel import Topology

    topo = Topology.plan(ParallelConfig(tp=2, cp=2, pp=2), 16, rank=0)  # dp 2
    assert topo.rank_lists("cp")[0] == [0, 2]
    assert topo.rank_lists("dp_cp")[:2] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert topo.rank_lists("mp")[0] == [0, 1, 2, 3, 8, 9, 10, 11]  # tp x cp x pp
    topo = Topology.plan(ParallelConfig(cp=2, ep=2), 8, rank=0)  # dp 4: the expert grid folds over cp x dp
    assert topo.rank_lists("ep")[:2] == [[0, 1], [2, 3]]
    assert topo.rank_lists("expert_dp") == [[0, 2, 4, 6], [1, 3, 5, 7]]  # the ranks holding the same experts



def test_chunk_layout_pairs_early_and_late_chunks():
    assert chunk_positions(16, 2, 0).tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert chunk_positions(16, 2, 1).tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    x = torch.arange(24).view(1, 24)
    shares = [split_sequence(x, 3, r) for r in range(3)]
    assert [s.tolist()[0] for s in shares] == [chunk_positions(24, 3, r).tolist() for r in range(3)]
    assert torch.equal(merge_sequence(shares), x)
    with pytest.raises(ValueError, match="sequence length 20 is not divisible by 2\\*cp = 8"):
        chunk_positions(20, 4, 0)


def test_math_block_matches_reference_attention():
    """The block definition alone, on one whole causal block with documents: out, and grads via its backward."""
    torch.manual_seed(0)
    b, s, hq, hkv, d = 2, 12, 4, 2, 8
    q, k, v = (torch.randn(b, s, h, d, dtype=torch.float64, requires_grad=True) for h in (hq, hkv, hkv))
    docs = torch.tensor([[0] * 5 + [1] * 7, [0] * 12])
    ref = reference.attention(q, k, v, causal=True, softmax_scale=0.3, document_ids=docs)
    do = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, (q, k, v), do)
    pos = torch.arange(s)
    mask = BlockMask(pos, pos, docs, docs, causal=True)
    block = MathBlockAttention()
    out, lse = block.forward(q.detach(), k.detach(), v.detach(), mask, 0.3)
    torch.testing.assert_close(out.double(), ref.detach())
    grads = block.backward(do, q.detach(), k.detach(), v.detach(), out, lse, mask, 0.3)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r)


# ---------------------------------------------------------------------------------------------
# Ring attention against one process


def _packed_documents(b: int, s: int, gen: random.Random) -> torch.Tensor:
    """Row-local document ids [b, s], non-decreasing, several short documents per row (some rows one)."""
    rows = []
    for i in range(b):
        if i == 0:
            rows.append([0] * s)
            continue
        ids, doc = [], 0
        while len(ids) < s:
            ids += [doc] * gen.randint(1, s // 3)
            doc += 1
        rows.append(ids[:s])
    return torch.tensor(rows)


def _ring_case(cp: int, ranks: list[int], group, dtype, block=None):
    """Ring attention over `ranks` vs full-sequence attention: max output and q/k/v gradient errors."""
    torch.manual_seed(1234)  # the same full tensors on every rank
    b, s, hq, hkv, d = 3, 8 * cp, 6, 2, 8
    q, k, v = (torch.randn(b, s, h, d, dtype=dtype) for h in (hq, hkv, hkv))
    docs = _packed_documents(b, s, random.Random(7))
    do = torch.randn(b, s, hq, d, dtype=dtype)
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = reference.attention(*full, causal=True, softmax_scale=0.25, document_ids=docs)
    ref.backward(do)

    index = ranks.index(dist.get_rank())
    ring = ContextParallelRing(group, ranks, index)
    local = [split_sequence(t, cp, index).requires_grad_() for t in (q, k, v)]
    out = ring_attention(*local, ring, softmax_scale=0.25, document_ids=split_sequence(docs, cp, index), block=block)
    out.backward(split_sequence(do, cp, index))
    errors = {"out": (out - split_sequence(ref, cp, index)).abs().max().item()}
    for name, t, f in zip("qkv", local, full):
        errors["d" + name] = (t.grad - split_sequence(f.grad, cp, index)).abs().max().item()
    return errors


def _ring_worker(rank, world_size):
    # cp 4 over the whole world, then cp 2 over two rings of two ranks.
    results = {"cp4": _ring_case(4, [0, 1, 2, 3], None, torch.float64)}
    pairs = [[0, 1], [2, 3]]
    groups = [dist.new_group(p) for p in pairs]
    mine = next(i for i, p in enumerate(pairs) if rank in p)
    results["cp2"] = _ring_case(2, pairs[mine], groups[mine], torch.float64)
    results["cp2-fp32"] = _ring_case(2, pairs[mine], groups[mine], torch.float32)
    # the door's functional pair (its reference path on the CPU)
    results["cp4-door-fp32"] = _ring_case(4, [0, 1, 2, 3], None, torch.float32, KernelBlockAttention())
    return results


def test_ring_attention_matches_full_attention_with_documents_and_gqa():
    results = run_distributed(_ring_worker, 4)
    assert "cp4-door-fp32" in results[0]
    for rank, errors in enumerate(results):
        for case, errs in errors.items():
            tol = 1e-5 if "fp32" in case else 1e-10
            for name, err in errs.items():
                assert err < tol, (rank, case, name, err)


# ---------------------------------------------------------------------------------------------
# Training: cp (with tp + sp, pp, dp, the distributed optimizer, MoE) equals one process

STEPS = 3
SEQ = 32
ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]
MOE = dict(num_experts=4, moe_top_k=2, moe_ffn_hidden_size=32, shared_expert_ffn_hidden_size=64,
           aux_loss_coef=0.01, moe_z_loss_coef=0.001, tie_word_embeddings=False)


def tiny_model(**overrides) -> ModelConfig:
    """conf/model/tiny.yaml (4 layers, 4 query / 2 kv heads), with overrides."""
    from omegaconf import OmegaConf

    fields = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "model" / "tiny.yaml"))
    return ModelConfig(**dict(fields, **overrides))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Many short documents, so every 32-token row packs several (and documents cross chunk borders)."""
    root = tmp_path_factory.mktemp("short_documents")
    words = "alpha beta gamma delta import def return class self value list print range None True".split()
    gen = random.Random(0)
    for i in range(300):
        text = " ".join(gen.choice(words) for _ in range(gen.randint(2, 14)))
        (root / f"doc_{i:04d}.txt").write_text(text + "\n")
    return root


def make_config(corpus, cache_dir, model=None, steps=STEPS, recompute="none", **parallel) -> Config:
    return Config(
        model=model or tiny_model(),
        parallel=ParallelConfig(bucket_size=20000, **parallel),
        # Clipping makes the norm matter. Adam's eps is raised from 1e-8 so that gradient elements near
        # zero, whose update direction rounding can flip, do not amplify rounding differences.
        optim=OptimConfig(lr=1e-3, warmup_steps=1, clip_grad=0.5, decay_steps=3, eps=1e-6),
        data=DataConfig(corpus=str(corpus), cache_dir=str(cache_dir), reset_attention_mask=True,
                        reset_position_ids=True),
        train=TrainConfig(steps=steps, micro_batch_size=1, global_batch_size=4, seq_length=SEQ, log_interval=1,
                          recompute=recompute),
    )


def _train_worker(rank, world_size, cfg, run_dir):
    return train(cfg.validate(world_size), run_dir)


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory):
    return tmp_path_factory.mktemp("cp")


_reference: dict = {}


def reference_run(kind: str, corpus, tmp_root) -> tuple:
    if kind not in _reference:
        run_dir = tmp_root / f"ref-{kind}"
        cfg = make_config(corpus, tmp_root / "cache", model=tiny_model(**MOE) if kind == "moe" else None)
        train(cfg.validate(1), run_dir)
        _reference[kind] = read_run(run_dir)
    return _reference[kind]


def test_the_data_packs_documents_across_chunk_borders(corpus, tmp_root):
    from megatron_qwen2.data import build_datasets

    dataset, _ = build_datasets(make_config(corpus, tmp_root / "cache").data, SEQ, 1234)
    batch = dataset.global_batch(0, 4)
    docs = batch.document_ids
    assert docs is not None and batch.position_ids is not None
    assert all(len(row.unique()) >= 3 for row in docs)  # several documents per row
    # A document spans the border between chunk 0 and 1 of a cp-4 layout (chunks of 4 tokens).
    assert bool((docs[:, 3] == docs[:, 4]).any())


CASES = [
    # (model, world size, parallel config)
    ("dense", 2, dict(cp=2)),
    ("dense", 4, dict(cp=2, tp=2)),  # sequence parallelism cuts each cp share over tp
    ("dense", 4, dict(cp=4)),  # chunks of 4 tokens: documents cross every chunk border
    ("dense", 4, dict(cp=2, pp=2, recompute="selective")),  # the ring runs again in the recomputation
    ("dense", 4, dict(cp=2, distributed_optimizer=True)),  # dp 2: masters and Adam state sharded over dp x cp
    ("moe", 4, dict(cp=2, ep=2, distributed_optimizer=True)),  # experts: ep inside dp, reduced over expert_dp x cp
]


def _case_id(case):
    model, world, par = case
    return f"{model}-w{world}-" + "-".join(f"{k}={v}" for k, v in par.items())


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_context_parallel_training_matches_single_process(case, corpus, tmp_root):
    model, world, parallel = case
    ref_rows, ref_state = reference_run(model, corpus, tmp_root)
    run_dir = tmp_root / _case_id(case)
    cfg = make_config(corpus, tmp_root / "cache", model=tiny_model(**MOE) if model == "moe" else None, **parallel)
    run_distributed(_train_worker, world, cfg, run_dir)
    rows, state = read_run(run_dir)
    assert_same_training(rows, state, ref_rows, ref_state, STEPS, moe_load=True)


# ---------------------------------------------------------------------------------------------
# Checkpoints cross cp degrees


@pytest.mark.parametrize("first, second", [
    (dict(cp=2, distributed_optimizer=True), dict()),  # saved at cp 2 (sharded over cp), resumed at cp 1
    (dict(), dict(cp=2)),  # and the reverse
])
def test_checkpoint_resumes_under_another_cp(tmp_path, corpus, tmp_root, first, second):
    ref_rows, _ = reference_run("dense", corpus, tmp_root)
    run_dir = tmp_path / "run"
    for par, steps in ((first, STEPS - 1), (second, STEPS)):
        cfg = make_config(corpus, tmp_root / "cache", steps=steps, **par)
        if par:
            run_distributed(_train_worker, 2, cfg, run_dir)
        else:
            train(cfg.validate(1), run_dir)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for r, ref in zip(rows, ref_rows):
        assert r["loss"] == pytest.approx(ref["loss"], rel=1e-5), r["step"]
    saved = json.loads((run_dir / "checkpoints" / f"step_{STEPS - 1:06d}" / "train_state.json").read_text())
    assert saved["layout"]["cp"] == first.get("cp", 1)


# ---------------------------------------------------------------------------------------------
# Bad configurations


@pytest.mark.parametrize("seq_length, parallel, world, needle", [
    (36, dict(cp=4), 4, r"train.seq_length=36 is not divisible by 2\*parallel.cp = 8"),
    (20, dict(cp=2, tp=4), 8, r"train.seq_length=20 / parallel.cp=2 = 10 tokens per cp rank is not divisible "
                              r"by parallel.tp=4"),
])
def test_bad_context_parallel_configs_are_rejected(seq_length, parallel, world, needle):
    cfg = Config(parallel=ParallelConfig(**parallel),
                 train=TrainConfig(seq_length=seq_length, micro_batch_size=1, global_batch_size=1))
    with pytest.raises(ValueError, match=needle):
        cfg.validate(world)
