"""Training with train.fp8 on the CPU (the emulated FP8 GEMMs): each recipe trains close to the
unquantised run; dp and pp (every recipe) and tp with and without sp (blockwise, whose tiles tp does
not cut) train the same model as one process; a run switches FP8 on at resume; bad values are one line."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_qwen2.config import Config, DataConfig, ModelConfig, OptimConfig, ParallelConfig, TrainConfig
from megatron_qwen2.errors import EXIT_CONFIG
from megatron_qwen2.ops.fp8 import no_fp8_gemms
from megatron_qwen2.train import train
from tests.distributed import run_distributed
from tests.parallel.runs import read_run

ROOT = Path(__file__).resolve().parents[1]
# Every projection's K and N a multiple of 128 at tp 1 and 2 (the blockwise tiles): hidden 128,
# 8 heads and 4 kv heads of 32 (QKV rows per tp rank (4 + 2 * 2) * 32, attention output 4 * 32),
# FFN 256.
MODEL = dict(hidden_size=128, num_layers=2, num_attention_heads=8, num_kv_heads=4, head_dim=32,
             ffn_hidden_size=256, vocab_size=4096, tie_word_embeddings=False)
RECIPES = ["tensorwise", "rowwise", "blockwise"]


# The same with routed experts (and a shared expert) in every layer.
MOE = dict(MODEL, num_experts=4, moe_top_k=2, moe_ffn_hidden_size=128, shared_expert_ffn_hidden_size=256,
           aux_loss_coef=0.01)


def make_config(cache_dir, steps=3, fp8="none", model=MODEL, recompute="none", **parallel) -> Config:
    return Config(model=ModelConfig(**model), parallel=ParallelConfig(bucket_size=20000, **parallel),
                  optim=OptimConfig(lr=3e-3, warmup_steps=1, clip_grad=1.0),
                  data=DataConfig(max_files=20, cache_dir=str(cache_dir)),
                  train=TrainConfig(steps=steps, micro_batch_size=1, global_batch_size=4, seq_length=32,
                                    log_interval=1, fp8=fp8, recompute=recompute))


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("fp8")


_runs: dict = {}


def single_run(root, fp8, steps=3, moe=False):
    key = (fp8, steps, moe)
    if key not in _runs:
        run_dir = root / f"single-{fp8}-{steps}{'-moe' if moe else ''}"
        train(make_config(root / "cache", steps, fp8, model=MOE if moe else MODEL).validate(1), run_dir)
        _runs[key] = read_run(run_dir)
    return _runs[key]


@pytest.mark.parametrize("fp8", RECIPES)
def test_each_recipe_trains_close_to_the_unquantised_model(root, fp8):
    rows, _ = single_run(root, fp8, steps=12)
    ref, _ = single_run(root, "none", steps=12)
    losses, ref_losses = [r["loss"] for r in rows], [r["loss"] for r in ref]
    assert sum(losses[-3:]) / 3 < losses[0] - 0.3  # it learns
    for a, b in zip(losses, ref_losses):
        assert a == pytest.approx(b, rel=0.02)


def _worker(rank, world_size, cfg, run_dir):
    train(cfg, run_dir)
    return rank


@pytest.mark.parametrize("fp8,world,parallel", [
    ("tensorwise", 2, dict(tp=1)),
    ("rowwise", 2, dict(pp=2)),
    ("blockwise", 2, dict(tp=2, sequence_parallel=True)),
    ("blockwise", 2, dict(tp=2, sequence_parallel=False)),  # the norms hand QKV and gate | up their input quantised
    ("blockwise", 4, dict(tp=2, pp=2, distributed_optimizer=True)),
], ids=["tensorwise-dp2", "rowwise-pp2", "blockwise-tp2-sp", "blockwise-tp2", "blockwise-tp2-pp2-distopt"])
def test_layouts_train_the_same_fp8_model_as_one_process(root, fp8, world, parallel):
    run_dir = root / f"{fp8}-{world}-{'-'.join(f'{k}{v}' for k, v in parallel.items())}"
    cfg = make_config(root / "cache", fp8=fp8, **parallel).validate(world)
    run_distributed(_worker, world, cfg, run_dir)
    assert_same_fp8_training(read_run(run_dir)[0], single_run(root, fp8)[0])


def assert_same_fp8_training(rows, ref_rows, first_grad_norm_rel=1e-4) -> None:
    """The first step (the same weights, so the same FP8 values in both layouts) matches as closely
    as unquantised layouts do. After an update the layouts' weights differ in their last fp32 bits
    (their gradient sums run in another order) and FP8 rounds a few of them to the neighbouring e4m3
    value: later steps match to 5e-4 (loss) and 1e-2 (grad norm)."""
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[0]["loss"] == pytest.approx(ref_rows[0]["loss"], rel=1e-5)
    assert rows[0]["grad_norm"] == pytest.approx(ref_rows[0]["grad_norm"], rel=first_grad_norm_rel)
    for r, ref in zip(rows[1:], ref_rows[1:]):
        assert r["loss"] == pytest.approx(ref["loss"], rel=5e-4), r["step"]
        assert r["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-2), r["step"]


@pytest.mark.parametrize("fp8,recompute", [("blockwise", "full"), ("tensorwise", "selective")])
def test_recomputation_trains_the_same_fp8_model(root, fp8, recompute):
    run_dir = root / f"recompute-{fp8}-{recompute}"
    train(make_config(root / "cache", fp8=fp8, recompute=recompute).validate(1), run_dir)
    assert_same_fp8_training(read_run(run_dir)[0], single_run(root, fp8)[0])


@pytest.mark.parametrize("fp8,world,parallel,moe", [
    ("rowwise", 2, dict(cp=2), False),
    ("rowwise", 2, dict(ep=2), True),
    ("blockwise", 4, dict(tp=2, ep=2, sequence_parallel=True), True),
], ids=["rowwise-cp2", "rowwise-moe-ep2", "blockwise-moe-tp2-ep2"])
def test_cp_and_ep_train_the_fp8_model_of_one_process(root, fp8, world, parallel, moe):
    """cp cuts the tokens a weight gradient reduces over, and ep gathers each expert's rows from
    several micro-batches: the forward quantises the same per-token rows and tiles as one process
    (the first loss matches), the weight gradients group their tokens otherwise (grad norms within
    FP8 rounding, 1e-2)."""
    run_dir = root / f"{fp8}-{world}-{'-'.join(f'{k}{v}' for k, v in parallel.items())}-{moe}"
    cfg = make_config(root / "cache", fp8=fp8, model=MOE if moe else MODEL, **parallel).validate(world)
    run_distributed(_worker, world, cfg, run_dir)
    assert_same_fp8_training(read_run(run_dir)[0], single_run(root, fp8, moe=moe)[0], first_grad_norm_rel=1e-2)


def test_a_run_switches_fp8_on_at_resume(root, capsys):
    run_dir = root / "switch"
    train(make_config(root / "cache", steps=2).validate(1), run_dir)
    capsys.readouterr()
    train(make_config(root / "cache", steps=4, fp8="rowwise").validate(1), run_dir)
    out = capsys.readouterr()
    assert "with changed settings: train.fp8: none -> rowwise" in out.out
    rows, _ = read_run(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]


def test_a_gpu_without_fp8_gemms_is_named():
    assert no_fp8_gemms("NVIDIA H200", (9, 0)) is None
    assert no_fp8_gemms("NVIDIA A100-SXM4-80GB", (8, 0)) == (
        "NVIDIA A100-SXM4-80GB (compute capability 8.0) has no FP8 GEMMs for these recipes: they need 9.0 or newer "
        "(Hopper)")


@pytest.mark.parametrize("override,needle", [
    ("train.fp8=fp4", "train.fp8 must be one of none, tensorwise, rowwise, blockwise, got 'fp4'"),
    ("train.fp8=blockwise model.ffn_hidden_size=100",
     "train.fp8=blockwise: model.ffn_hidden_size / parallel.tp = 100 is not a multiple of 16"),
])
def test_bad_fp8_values_are_one_line_exit_2(tmp_path, override, needle):
    run_dir = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "megatron_qwen2.train", "model=tiny", *override.split(),
                          f"hydra.run.dir={run_dir}"], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert res.returncode == EXIT_CONFIG
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and needle in lines[0], res.stderr
    assert [p.name for p in run_dir.iterdir()] == ["outcome.json"]  # how it ended; nothing trained


def test_weights_are_quantised_again_after_each_update(root):
    from megatron_qwen2.data.batch import Batch
    from megatron_qwen2.engine.step import TrainingStep
    from megatron_qwen2.ops.fp8 import quantize
    from megatron_qwen2.parallel import Topology

    cfg = make_config(root / "cache", fp8="rowwise").validate(1)
    step = TrainingStep(cfg, Topology.build(cfg.parallel, 1, 0), torch.device("cpu"))
    weight = step.chunks[0].layers["0"].mlp.down.weight
    tokens = torch.randint(0, MODEL["vocab_size"], (4, 33), generator=torch.Generator().manual_seed(0))
    step(Batch(tokens=tokens), lr=1e-2)
    used = step.fp8.weights.get(weight, step.fp8.recipe).w  # the copy the step's micro-batches used
    step.validation_loss(Batch(tokens=tokens))
    now = step.fp8.weights.get(weight, step.fp8.recipe).w
    assert not torch.equal(used.data.view(torch.uint8), now.data.view(torch.uint8))  # the update is seen
    fresh = quantize(weight.detach(), "row")
    assert torch.equal(now.data.view(torch.uint8), fresh.data.view(torch.uint8))
    assert torch.equal(now.scale_inv, fresh.scale_inv)
