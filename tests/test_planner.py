"""The planner (megatron_qwen2/planner.py) against the model it plans for.

(a) parameters per GPU against the real model chunks built in gloo processes;
(b) the activation accounting against what autograd actually saves (CPU, reference ops);
(c) the memory estimate against peaks recorded on GPUs (bench/results/);
(d) every cluster recipe fits its GPU; the CLI's exit codes.
"""

import json
import re
from pathlib import Path

import pytest
import torch

from megatron_qwen2.config import Config, ModelConfig, ParallelConfig, TrainConfig
from megatron_qwen2.planner import layer_activation_bytes, make_plan, stage_params
from tests.distributed import run_distributed

ROOT = Path(__file__).resolve().parents[1]


def tiny(**kw) -> ModelConfig:
    base = dict(hidden_size=64, num_layers=4, num_attention_heads=4, num_kv_heads=2, ffn_hidden_size=128,
                vocab_size=256)
    base.update(kw)
    return ModelConfig(**base)


MOE = dict(num_experts=8, moe_top_k=2, moe_ffn_hidden_size=32, shared_expert_ffn_hidden_size=96)

# (model, parallel) on 4 ranks: tp 4 over 2 kv heads (replicated kv), tp 2 x pp 2 with an uneven
# layout and tied embeddings, pp 2 x vpp 2, tp 2 x ep 2 (dp 2) MoE.
LAYOUTS = [
    (tiny(), ParallelConfig(tp=4)),
    (tiny(tie_word_embeddings=True), ParallelConfig(tp=2, pp=2, pp_layout=[3, 1])),
    (tiny(), ParallelConfig(pp=2, vpp=2)),
    (tiny(**MOE), ParallelConfig(tp=2, ep=2)),
]


def config(model: ModelConfig, par: ParallelConfig, world: int, **train) -> Config:
    t = dict(seq_length=32, micro_batch_size=1, global_batch_size=8)
    t.update(train)
    return Config(model=model, parallel=par, train=TrainConfig(**t)).validate(world)


def _count_params(rank, world):
    from megatron_qwen2.engine.pipeline import build_model_chunks
    from megatron_qwen2.parallel.topology import Topology

    counts = []
    for model, par in LAYOUTS:
        par.validate()
        topo = Topology.build(par, world, rank)
        chunks = build_model_chunks(model, par, topo)
        counts.append((topo.pp_rank, sum(p.numel() for c in chunks for p in c.parameters())))
    return counts


def test_parameters_per_gpu_match_the_built_chunks():
    results = run_distributed(_count_params, 4)
    for i, (model, par) in enumerate(LAYOUTS):
        planned = stage_params(config(model, par, 4))
        for rank, counts in enumerate(results):
            pp_rank, built = counts[i]
            assert planned[pp_rank]["dense"] + planned[pp_rank]["expert"] == built, (i, rank)


def _saved_bytes(model_cfg: ModelConfig, recompute: str, s: int, b: int, fp8: str = "none") -> int:
    """Bytes of the distinct storages one decoder layer saves for backward (weights, cos/sin and the
    FP8 weight copies excluded)."""
    from megatron_qwen2.model import Qwen2Model
    from megatron_qwen2.ops.fp8 import Fp8, Fp8Weights, recipe

    rcp = recipe(fp8)
    model = Qwen2Model(model_cfg, fp8=None if rcp is None else Fp8(rcp, Fp8Weights()))
    layer = model.layers["0"]
    layer.recompute = None if recompute == "none" else recompute
    x = torch.randn(s, b, model_cfg.hidden_size, requires_grad=True)
    cos, sin = model.rotary(torch.arange(s).expand(b, s).t(), x.dtype)
    skip = {p.untyped_storage().data_ptr() for p in model.parameters()}
    skip |= {cos.untyped_storage().data_ptr(), sin.untyped_storage().data_ptr()}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in skip:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x, cos, sin)
    return sum(seen.values())


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
def test_activation_accounting_matches_saved_tensors(moe, recompute):
    # CPU runs the reference ops; the planner's 'reference' path lists what they save (the
    # kernel path differs only in the norm and SwiGLU, see layer_activation_tensors).
    model = tiny(num_layers=1, **(MOE if moe else {}))
    cfg = config(model, ParallelConfig(), 1, micro_batch_size=2, global_batch_size=2)
    measured = _saved_bytes(model, recompute, 32, 2)
    planned = layer_activation_bytes(cfg, moe, None if recompute == "none" else recompute, "reference")
    assert planned == pytest.approx(measured, rel=0.10)


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_fp8_activation_accounting_matches_saved_tensors(moe):
    model = tiny(num_layers=1, **(MOE if moe else {}))
    cfg = config(model, ParallelConfig(), 1, micro_batch_size=2, global_batch_size=2, fp8="rowwise")
    measured = _saved_bytes(model, "none", 32, 2, fp8="rowwise")
    planned = layer_activation_bytes(cfg, moe, None, "reference")
    assert planned == pytest.approx(measured, rel=0.10)
    unquantised = layer_activation_bytes(config(model, ParallelConfig(), 1, micro_batch_size=2,
                                                global_batch_size=2), moe, None, "reference")
    assert planned < unquantised


def test_fp8_plan_holds_the_weight_copies():
    model = tiny()
    plain = make_plan(config(model, ParallelConfig(), 1), 1, "h200-141gb").ranks[0]
    fp8 = make_plan(config(model, ParallelConfig(), 1, fp8="blockwise"), 1, "h200-141gb").ranks[0]
    h, d = model.hidden_size, model.kv_channels  # 4 query and 2 kv heads of 16
    projections = model.num_layers * ((4 + 2 * 2) * d * h + 4 * d * h + 3 * h * model.ffn_hidden_size)
    assert fp8.mem["FP8 weight copies"] == projections  # W only: W^T is made when the backward asks
    rowwise = make_plan(config(model, ParallelConfig(), 1, fp8="rowwise"), 1, "h200-141gb").ranks[0]
    assert rowwise.mem["FP8 weight copies"] == projections
    assert "FP8 weight copies" not in plain.mem


# Recorded peaks (torch.cuda.max_memory_allocated, GB = 1e9 B) of bench/train_throughput.py runs of the
# current implementation on one H200 (8 micro-batches per step; the compiled kernels, fused loss and
# optimizer step): (result file, what the README calls it, model, train).
M7 = dict(hidden_size=3584, num_layers=8, num_attention_heads=28, num_kv_heads=4, ffn_hidden_size=18944,
          vocab_size=152064)
M15 = dict(hidden_size=1536, num_layers=28, num_attention_heads=12, num_kv_heads=2, ffn_hidden_size=8960,
           vocab_size=151936, tie_word_embeddings=True)
BF16_4K = dict(dtype="bf16", seq_length=4096, micro_batch_size=1)
RUNS = [
    ("train_throughput_qwen2_1.5b_h200.json", "1.5B, micro-batch 1", M15, dict(BF16_4K, global_batch_size=8)),
    ("train_throughput_qwen2_1.5b_mbs2_h200.json", "1.5B, micro-batch 2", M15,
     dict(BF16_4K, micro_batch_size=2, global_batch_size=16)),
    ("train_throughput_qwen2_7b_h200.json", "7B width, 4 layers", dict(M7, num_layers=4),
     dict(BF16_4K, global_batch_size=8)),
]


def estimate_error(run) -> tuple[float, float, float]:
    """(planned bytes allocated, measured bytes, planned / measured - 1) of one recorded run."""
    name, _, model, train = run
    data = json.loads((ROOT / "bench" / "results" / name).read_text())
    measured = data["results"][0]["mem_peak_allocated_gib"] * 2 ** 30  # ours is the first system
    cfg = Config(model=ModelConfig(name=name, **model), parallel=ParallelConfig(),
                 train=TrainConfig(**train)).validate(1)
    planned = make_plan(cfg, 1, "h200-141gb", context_gib=0.0).ranks[0].allocated
    return planned, measured, planned / measured - 1


@pytest.mark.parametrize("run", RUNS, ids=lambda r: r[0].removeprefix("train_throughput_").removesuffix(".json"))
def test_memory_estimate_against_recorded_gpu_peaks(run):
    planned, measured, err = estimate_error(run)
    print(f"{run[0]}: planned {planned / 1e9:.2f} GB, measured {measured / 1e9:.2f} GB, error {err:+.1%}")
    assert abs(err) < 0.10


@pytest.mark.parametrize("fp8", ["tensorwise", "rowwise", "blockwise"])
def test_fp8_plan_against_the_recorded_fp8_runs(fp8):
    """Memory and step speed-up of train.fp8 against
    bench/results/train_throughput_qwen2_7b_8layers_fp8_h100-80gb-hbm3_2026-12-07.json (the 7B-width
    8-layer slice, micro-batch 2, bf16 and each recipe in one run)."""
    from megatron_qwen2.model.flops import fp8_flop_share
    from megatron_qwen2.planner import FP8_SLICE_SHARE, FP8_STEP_SPEEDUP, fp8_step_speedup

    name = "train_throughput_qwen2_7b_8layers_fp8_h100-80gb-hbm3_2026-12-07.json"
    data = json.loads((ROOT / "bench" / "results" / name).read_text())
    rows = {r["system"]: r for r in data["results"]}
    bf16, row = rows["megatron_qwen2"], rows[f"megatron_qwen2_fp8_{fp8}"]
    assert FP8_STEP_SPEEDUP[fp8] == pytest.approx(row["tokens_per_s"] / bf16["tokens_per_s"], abs=1e-3)
    cfg = Config(model=ModelConfig(name="qwen2_7b", **dict(M7, num_layers=8)), parallel=ParallelConfig(),
                 train=TrainConfig(**dict(BF16_4K, micro_batch_size=2, global_batch_size=16, fp8=fp8))).validate(1)
    assert FP8_SLICE_SHARE == pytest.approx(fp8_flop_share(cfg.model, cfg.train.seq_length), abs=1e-4)
    assert fp8_step_speedup(cfg) == pytest.approx(FP8_STEP_SPEEDUP[fp8], rel=1e-4)  # the slice gets its own
    deeper = Config(model=ModelConfig(name="qwen2_7b", **dict(M7, num_layers=28)), parallel=ParallelConfig(),
                    train=cfg.train).validate(1)
    assert fp8_step_speedup(deeper) > FP8_STEP_SPEEDUP[fp8]  # a larger FP8 share gains more
    planned = make_plan(cfg, 1, "h200-141gb", context_gib=0.0).ranks[0].allocated
    measured = row["mem_peak_allocated_gib"] * 2 ** 30
    assert planned / measured - 1 == pytest.approx(0, abs=0.05)


def test_fp8_speeds_up_a_dense_step_and_takes_a_moe_step_as_bf16s():
    """train.fp8 divides a dense model's step by its FP8 speed-up; a model with routed experts
    (an MoE layer's step measured x0.99 in FP8) keeps its bf16 step time, and the plan says so."""
    from megatron_qwen2.planner import fp8_step_speedup, format_plan

    dense = config(tiny(), ParallelConfig(), 1, fp8="tensorwise")
    for model, factor in ((tiny(), fp8_step_speedup(dense)), (tiny(**MOE), 1.0)):
        steps = [make_plan(config(model, ParallelConfig(), 1, fp8=fp8), 1).step_time_s
                 for fp8 in ("none", "tensorwise")]
        assert steps[0] / steps[1] == pytest.approx(factor)
    assert fp8_step_speedup(dense) > 1
    text = format_plan(make_plan(config(tiny(**MOE), ParallelConfig(), 1, fp8="tensorwise"), 1))
    assert "FP8 step taken as bf16's" in text


def test_readme_states_the_validation_figures():
    # README.md's planner paragraph names each validation run with the error this test computes.
    readme = (ROOT / "README.md").read_text()
    for run in RUNS:
        figure = f"{run[1]}: {100 * estimate_error(run)[2]:+.1f} %"
        assert figure in readme, f"README.md should state {figure!r} (tests/test_planner.py)"


SLURM = sorted(p for p in (ROOT / "slurm").glob("*.sh") if p.name != "launch.sh")


def _header(script: Path, option: str) -> int:
    return int(re.search(rf"^#SBATCH --{option}=(\d+)", script.read_text(), re.M).group(1))


@pytest.mark.parametrize("script", SLURM, ids=lambda p: p.stem)
def test_every_recipe_fits_its_gpu(script):
    from tools.plan import compose

    world = _header(script, "nodes") * _header(script, "ntasks-per-node")
    experiment = re.search(r"launch\.sh\" (\S+)", script.read_text()).group(1)  # as tests/slurm/test_recipes.py
    recipe = (ROOT / "conf" / "experiment" / f"{experiment}.yaml").read_text()
    gpu = "h200-141gb" if "H200" in recipe.split("defaults:")[0] else "h100-80gb"
    plan = make_plan(compose([f"+experiment={experiment}"], world), world, gpu)
    assert plan.fits, f"{experiment}: {plan.worst.total / 2**30:.1f} GiB on {gpu}"


def test_cli_exit_codes(capsys):
    from tools.plan import main

    assert main(["+experiment=72b", "--gpus", "128"]) == 0
    out = capsys.readouterr().out
    assert "FITS" in out and "pipeline bubble" in out and "per stage" in out
    assert main(["model=qwen2_72b", "train.dtype=bf16", "train.seq_length=4096", "train.micro_batch_size=1",
                 "train.global_batch_size=8", "--gpus", "8", "parallel.tp=8"]) == 1
    assert "DOES NOT FIT" in capsys.readouterr().out
    assert main(["+experiment=72b", "--gpus", "100"]) == 2
    assert "world size 100 is not divisible by tp*pp*cp = 8*4*1 = 32" in capsys.readouterr().out


def test_folded_expert_layout_in_the_plan():
    """Experts per GPU follow ep x etp, their optimizer state expert-dp, and the token exchanges cross
    nodes only when the ep x etp block is larger than a node."""
    from tools.plan import compose

    from megatron_qwen2.planner import EXCHANGE_GBPS, moe_exchange_seconds

    def plan(**par):
        overrides = ["+experiment=57b_a14b", "train.recompute=none"] + [f"parallel.{k}={v}" for k, v in par.items()]
        return make_plan(compose(overrides, 64), 64)

    ep4, ep8, etp2 = plan(pp=4, ep=4), plan(pp=4, ep=8), plan(pp=4, ep=4, etp=2)
    assert ep4.ranks[0].params_expert == 2 * ep8.ranks[0].params_expert == 2 * etp2.ranks[0].params_expert
    for p, expert_dp in ((ep4, 4), (ep8, 2), (etp2, 2)):  # dense over dp 8; experts: tp 2 x dp 8 over ep x etp
        r = p.ranks[0]
        assert r.mem["optimizer (masters + Adam m, v)"] == pytest.approx(
            12 * (r.params_dense / 8 + r.params_expert / expert_dp))
    cfg = ep8.cfg
    layers = list(range(cfg.model.num_layers))
    assert moe_exchange_seconds(plan(pp=4, ep=1).cfg, layers, 8) == 0.0  # ep 1: nothing leaves the GPU
    inside, across = moe_exchange_seconds(cfg, layers, 8), moe_exchange_seconds(plan(pp=2, ep=16).cfg, layers, 8)
    ratio = EXCHANGE_GBPS["nvlink"] / EXCHANGE_GBPS["infiniband"] * (15 / 16) / (7 / 8)
    assert across / inside == pytest.approx(ratio)
    assert ep8.step_time_s > ep8.exchange_s > 0
