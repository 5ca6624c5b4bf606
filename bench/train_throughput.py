"""End-to-end training throughput of one GPU: our training step against Hugging Face (and Megatron-Core).

    python bench/train_throughput.py --model qwen2_1.5b [--layers N] [--seq 4096] [--mbs 1] [--gbs 8]
        [--steps 10] [--warmup 3] [--recompute none|selective|full] [--ops auto|kernel|reference]
        [--profile] [--hf] [--mcore] [--fp8 RECIPE ...] [--documents MEAN] [--out FILE]

Our step is megatron_qwen2.engine.step.TrainingStep, the step megatron_qwen2/train.py loops over (model
chunks, GradBuffer, MixedPrecisionOptimizer, PipelineRunner, recomputation), fed random tokens: bf16
compute with fp32 main grads, fp32 masters and AdamW, gradient clipping, one optimizer step per
global batch of gbs / mbs micro-batches. Warm-up steps run first, then the timed ones (each
ends with a device synchronisation). Printed: tokens/s, TFLOP/s per GPU, MFU, peak memory
(allocated and reserved), and the bf16 matmul rate measured in the same run.

MFU = training_flops_per_token (megatron_qwen2/model/flops.py, the formula of the training
logs) x tokens/s / 989 TFLOP/s (H100 / H200 dense bf16). The FLOPs are 6 x (matmul parameters
a token passes through: QKV, output projection, MLP or its top-k experts plus the shared expert
and router, and the vocabulary head) per token, plus causal attention, 6 x n_heads x head_dim x
seq per layer and token (half of the full 12 n d s); no recomputation counted. The baselines
(Hugging Face Qwen2ForCausalLM / Qwen2MoeForCausalLM in the Trainer's bf16=True form, and
Megatron-Core's GPTModel) run the same shapes, batches and steps and are scored with the same
FLOP count.

--fp8 tensorwise rowwise blockwise also measures our step with train.fp8 set to each recipe
(ops/fp8.py), after the bf16 step and in the same run; their MFU uses the same bf16 FLOP count.
The JSON also records the FLOP share FP8 takes (fp8_flop_share: the linear layers; the attention
core, router and vocabulary head stay bf16) and the speed-up over bf16 that share bounds
(speedup_of_share at rate 2: the FP8 GEMMs at twice the bf16 rate and nothing else faster).

--documents MEAN also measures our bf16 step on rows packed with documents (`Batch.document_ids`,
what `data.reset_attention_mask=true` feeds the model): lengths uniform in 1 .. 2 MEAN - 1 tokens,
cut at the row end, positions counted from each document's start; attention stays inside each
document (the attention door's packed-documents path). Its TFLOP/s and MFU use the plain causal
FLOP count, so its tokens/s compare directly with the plain causal row.

--profile adds torch.profiler over 2 more steps of ours (and of each --fp8 recipe): time per op
class and the top kernels (bench/profile_summary.py), also written into the JSON.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.common import (SPEC_PEAK_TFLOPS, device_name, device_slug, matmul_ceiling_tflops,  # noqa: E402
                          write_result_file)
from bench.profile_summary import format_summary, profile_steps  # noqa: E402

# name -> (conf/model file, layers kept by default: None = all). The wide models are cut to a
# few layers of their real width so that one GPU holds them with AdamW state.
PRESETS = {
    "tiny": ("tiny", None),
    "tiny_moe": ("tiny_moe", None),
    "qwen2_0.5b": ("qwen2_0.5b", None),
    "qwen2_1.5b": ("qwen2_1.5b", None),
    "qwen2_7b": ("qwen2_7b", 4),
    "qwen2_72b": ("qwen2_72b", 1),
    "qwen2_57b_a14b": ("qwen2_57b_a14b", 1),
}


def model_config(name: str, layers: int | None):
    """The ModelConfig of a preset (or any conf/model/NAME.yaml), cut to `layers` layers."""
    import yaml

    from megatron_qwen2.config import ModelConfig

    conf_name, default_layers = PRESETS.get(name, (name, None))
    path = ROOT / "conf" / "model" / f"{conf_name}.yaml"
    if not path.exists():
        known = sorted(set(PRESETS) | {p.stem for p in (ROOT / "conf" / "model").glob("*.yaml")})
        raise ValueError(f"--model {name!r} is neither a preset nor a conf/model file; choose from {', '.join(known)}")
    cfg = ModelConfig(**yaml.safe_load(path.read_text()))
    n = layers if layers is not None else default_layers
    if n is not None:
        if n <= 0:
            raise ValueError(f"--layers must be a positive integer, got {n}")
        cfg.num_layers = n
        cfg.mlp_only_layers = [i for i in cfg.mlp_only_layers if i < n]
    return cfg.validate()


def random_batches(vocab: int, gbs: int, seq: int, device: torch.device, seed: int):
    """Endless global batches of random token rows [gbs, seq + 1] (inputs and shifted labels)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    while True:
        yield torch.randint(0, vocab, (gbs, seq + 1), device=device, generator=gen)


def packed_documents(gbs: int, seq: int, mean: int, device: torch.device, gen: torch.Generator):
    """(document_ids, position_ids) [gbs, seq] int64 of rows packed with documents whose lengths are
    uniform in 1 .. 2 mean - 1 tokens, the last one cut at the row end; positions as the data
    pipeline counts them (`positions_in_documents`)."""
    from megatron_qwen2.data.batch import positions_in_documents

    ends = torch.randint(1, 2 * mean, (gbs, seq), generator=gen).cumsum(1)
    ids = torch.searchsorted(ends, torch.arange(seq).expand(gbs, seq).contiguous(), right=True)
    return ids.to(device), torch.from_numpy(positions_in_documents(ids.numpy())).to(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def memory(device: torch.device) -> dict:
    """Peak allocated / reserved device memory since the last reset, GiB (None on a CPU)."""
    if device.type != "cuda":
        return {"mem_peak_allocated_gib": None, "mem_peak_reserved_gib": None}
    return {"mem_peak_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "mem_peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30}


def time_steps(step, device: torch.device, warmup: int, steps: int) -> dict:
    """Run `warmup` then `steps` calls of step() (each returns the loss), synchronising after each."""
    losses = []
    for _ in range(warmup):
        losses.append(step())
        sync(device)
    times = []
    for _ in range(steps):
        began = time.perf_counter()
        losses.append(step())
        sync(device)
        times.append(time.perf_counter() - began)
    return {"step_times_s": times, "losses": losses}


def score(name: str, times: list[float], losses: list[float], tokens_per_step: int, flops_per_token: float,
          ceiling: float | None, device: torch.device) -> dict:
    """Throughput numbers of one system from its timed step times."""
    total = sum(times)
    tokens_per_s = tokens_per_step * len(times) / total
    achieved = flops_per_token * tokens_per_s / 1e12
    return {
        "system": name,
        "step_time_s_mean": total / len(times),
        "step_time_s_median": statistics.median(times),
        "step_time_s_min": min(times),
        "tokens_per_s": tokens_per_s,
        "tflops_per_gpu": achieved,
        "mfu": achieved / SPEC_PEAK_TFLOPS,
        "fraction_of_measured_matmul": achieved / ceiling if ceiling else None,
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        **memory(device),
    }


class OurStep:
    """megatron_qwen2.engine.step.TrainingStep (the step train.py loops over) on one device, fed random tokens."""

    def __init__(self, mcfg, args, device: torch.device, fp8: str = "none", documents: int | None = None):
        from megatron_qwen2.config import Config, OptimConfig, ParallelConfig, TrainConfig
        from megatron_qwen2.data.batch import Batch
        from megatron_qwen2.engine.step import TrainingStep
        from megatron_qwen2.parallel import Topology

        self.cfg = Config(model=mcfg, parallel=ParallelConfig(),
                          optim=OptimConfig(warmup_steps=0, schedule="constant"),
                          train=TrainConfig(seq_length=args.seq, micro_batch_size=args.mbs,
                                            global_batch_size=args.gbs, dtype="bf16", recompute=args.recompute,
                                            seed=args.seed, fp8=fp8),
                          device="cuda" if device.type == "cuda" else "cpu")
        self.cfg.validate(1)
        torch.manual_seed(args.seed)
        # Weights drawn on the device: a large model initialises in seconds instead of minutes.
        self.step = TrainingStep(self.cfg, Topology.build(self.cfg.parallel, 1, 0), device, init_on_device=True)
        self.chunks = self.step.chunks
        rows = random_batches(mcfg.vocab_size, args.gbs, args.seq, device, args.seed)
        if documents is None:
            self.batches = (Batch(tokens=r) for r in rows)
        else:  # one packing for every step, made before the timed steps
            ids, pos = packed_documents(args.gbs, args.seq, documents, device,
                                        torch.Generator().manual_seed(args.seed + 1))
            self.batches = (Batch(tokens=r, document_ids=ids, position_ids=pos) for r in rows)

    def __call__(self) -> float:
        return self.step(next(self.batches), self.cfg.optim.lr).loss


def ops_in_use(device: torch.device, mcfg=None, seq: int = 128, documents: bool = False) -> dict:
    """Which implementation the fused-op doors pick on this device (attention: for rows of one
    sequence, or with `documents` for rows of packed documents)."""
    import importlib

    from megatron_qwen2.ops import extension

    attention_door = importlib.import_module("megatron_qwen2.ops.attention")  # the module, not the function
    built = extension.load() is not None
    try:  # the door's choice for this model's attention shape (it may depend on head dim and length)
        q = torch.empty(1, seq, mcfg.num_attention_heads, mcfg.kv_channels, dtype=torch.bfloat16, device=device,
                        requires_grad=True)  # a training call
        k = torch.empty(1, seq, mcfg.num_kv_heads, mcfg.kv_channels, dtype=torch.bfloat16, device=device,
                        requires_grad=True)
        ids = torch.zeros(1, seq, dtype=torch.long, device=device) if documents else None
        backend = attention_door.backend(q, k, k, document_ids=ids)
    except Exception as e:  # noqa: BLE001 - a door that cannot say for these inputs: record that
        backend = f"unknown ({type(e).__name__})"
    return {"ops_mode": extension.mode(), "extension_built": built,
            "fused_ops": "kernel" if built and device.type == "cuda" else "reference",
            "attention": backend if device.type == "cuda" else f"reference (sdpa on {device.type})"}


def measure_ours(mcfg, args, device, flops_per_token: float, ceiling: float | None,
                 fp8: str = "none", documents: int | None = None) -> tuple[dict, dict | None]:
    reset_memory(device)
    step = OurStep(mcfg, args, device, fp8, documents)
    timed = time_steps(step, device, args.warmup, args.steps)
    name = "megatron_qwen2" + ("" if fp8 == "none" else f"_fp8_{fp8}") + ("" if documents is None else "_documents")
    result = score(name, timed["step_times_s"], timed["losses"], args.gbs * args.seq,
                   flops_per_token, ceiling, device)
    result.update(ops_in_use(device, mcfg, args.seq, documents is not None), recompute=args.recompute, fp8=fp8,
                  documents_mean_tokens=documents)
    if step.step.fp8 is not None:
        from megatron_qwen2.model.flops import fp8_flop_share, speedup_of_share

        share = fp8_flop_share(mcfg, args.seq)
        result.update(fp8_weight_copies_gib=step.step.fp8.weights.nbytes() / 2**30, fp8_flop_share=share,
                      fp8_speedup_bound=speedup_of_share(share, 2))
    prof = profile_steps(step, device) if args.profile else None
    del step
    reset_memory(device)
    return result, prof


def print_table(rows: list[dict]) -> None:
    head = (f"{'system':<26} {'tokens/s':>10} {'step s':>8} {'TFLOP/s':>8} {'MFU':>7} {'of matmul':>9} "
            f"{'peak alloc':>11} {'peak resv':>10}")
    print(head)
    for r in rows:
        if "error" in r:
            print(f"{r['system']:<26} {r['error']}")
            continue
        gib = lambda v: f"{v:.2f} GiB" if v is not None else "-"  # noqa: E731
        frac = f"{100 * r['fraction_of_measured_matmul']:.1f}%" if r.get("fraction_of_measured_matmul") else "-"
        print(f"{r['system']:<26} {r['tokens_per_s']:>10.0f} {r['step_time_s_mean']:>8.3f} "
              f"{r['tflops_per_gpu']:>8.1f} {100 * r['mfu']:>6.1f}% {frac:>9} {gib(r['mem_peak_allocated_gib']):>11} "
              f"{gib(r['mem_peak_reserved_gib']):>10}")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="qwen2_1.5b", help=f"a preset ({', '.join(PRESETS)}) or a conf/model name")
    ap.add_argument("--layers", type=int, default=None, help="keep this many layers (default: the preset's)")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--mbs", type=int, default=1, help="micro-batch size")
    ap.add_argument("--gbs", type=int, default=None, help="global batch size (default: 8 x mbs)")
    ap.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    ap.add_argument("--warmup", type=int, default=3, help="untimed optimizer steps first")
    ap.add_argument("--recompute", default="none", choices=("none", "selective", "full"))
    ap.add_argument("--ops", default="auto", choices=("auto", "kernel", "reference"),
                    help="fused-op implementation (MEGATRON_QWEN2_OPS)")
    ap.add_argument("--profile", action="store_true", help="profile 2 more steps of ours: time per op class")
    ap.add_argument("--hf", action="store_true", help="also measure Hugging Face transformers")
    ap.add_argument("--mcore", action="store_true", help="also measure Megatron-Core's GPTModel when importable")
    ap.add_argument("--no-ours", action="store_true", help="measure only the baselines")
    ap.add_argument("--fp8", nargs="+", default=[], choices=("tensorwise", "rowwise", "blockwise"),
                    help="also measure our step with each of these train.fp8 recipes")
    ap.add_argument("--documents", type=int, default=None, metavar="MEAN",
                    help="also measure our bf16 step on rows packed with documents of MEAN tokens on average")
    ap.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--commit", default=None, help="commit to record (default: $GIT_COMMIT or git rev-parse HEAD)")
    ap.add_argument("--out", default=None,
                    help="result JSON (default: bench/results/train_throughput_<model>_<device>.json)")
    args = ap.parse_args(argv)
    if args.documents is not None and args.documents <= 0:
        ap.error(f"--documents must be a positive number of tokens, got {args.documents}")
    return check_batch_args(ap, args, ("seq", "mbs", "gbs", "steps"))


def check_batch_args(ap: argparse.ArgumentParser, args: argparse.Namespace, positive: tuple[str, ...]):
    """--gbs defaulted to 8 x --mbs, each of `positive` > 0, --warmup >= 0, --gbs a multiple of --mbs
    (ap.error otherwise); returns args."""
    if args.gbs is None:
        args.gbs = 8 * args.mbs
    for name in positive:
        if getattr(args, name) <= 0:
            ap.error(f"--{name} must be a positive integer, got {getattr(args, name)}")
    if args.warmup < 0:
        ap.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.gbs % args.mbs:
        ap.error(f"--gbs {args.gbs} is not a multiple of --mbs {args.mbs}")
    return args


def pick_device(args: argparse.Namespace) -> torch.device:
    """The device of --device (auto: CUDA when there is one); sets args.device to cuda or cpu."""
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA device is available")
    return torch.device(args.device, torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ["MEGATRON_QWEN2_OPS"] = args.ops  # read by the op doors at their first call
    from megatron_qwen2.model.flops import training_flops_per_token

    device = pick_device(args)
    mcfg = model_config(args.model, args.layers)
    if args.seq > mcfg.max_position_embeddings:
        raise SystemExit(f"--seq {args.seq} exceeds model.max_position_embeddings={mcfg.max_position_embeddings}")
    flops_per_token = training_flops_per_token(mcfg, args.seq)
    ceiling = matmul_ceiling_tflops() if device.type == "cuda" else None
    print(f"{device_name()}: {args.model} ({mcfg.num_layers} layers, hidden {mcfg.hidden_size}), seq {args.seq}, "
          f"mbs {args.mbs}, gbs {args.gbs} ({args.gbs // args.mbs} micro-batches), {args.warmup} warm-up + "
          f"{args.steps} timed steps; {flops_per_token / 1e9:.2f} GFLOP per token; bf16 matmul measured "
          f"{ceiling or 0:.0f} TFLOP/s, MFU against {SPEC_PEAK_TFLOPS:.0f}", flush=True)

    rows, prof = [], None
    if not args.no_ours:
        ours, prof = measure_ours(mcfg, args, device, flops_per_token, ceiling)
        rows.append(ours)
        if prof is not None:
            print(format_summary(prof), flush=True)
        variants = [dict(fp8=fp8) for fp8 in args.fp8] + ([] if args.documents is None else
                                                           [dict(documents=args.documents)])
        for variant in variants:
            row, variant_prof = measure_ours(mcfg, args, device, flops_per_token, ceiling, **variant)
            if variant_prof is not None:
                print(format_summary(variant_prof), flush=True)
                row["profile"] = variant_prof
            rows.append(row)
    from bench import train_baselines

    if args.hf:
        rows.append(train_baselines.run_baseline("hf_transformers", train_baselines.HFStep, mcfg, args, device,
                                                 flops_per_token, ceiling))
    if args.mcore:
        rows.append(train_baselines.run_baseline("megatron_core", train_baselines.MCoreStep, mcfg, args, device,
                                                 flops_per_token, ceiling))
    print_table(rows)
    by_name = {r["system"]: r for r in rows}
    if "megatron_qwen2" in by_name:
        mine = by_name["megatron_qwen2"]
        for other in rows[1:]:
            if other["system"].startswith("megatron_qwen2_"):
                bound = (f" (FP8 takes {100 * other['fp8_flop_share']:.1f} % of the FLOPs: x{other['fp8_speedup_bound']:.2f} "
                         "at most with FP8 GEMMs at 2x bf16's rate)" if "fp8_flop_share" in other else "")
                print(f"{other['system']} / megatron_qwen2 (bf16, plain causal): "
                      f"{other['tokens_per_s'] / mine['tokens_per_s']:.2f}x tokens/s{bound}", flush=True)
            elif "error" not in other:
                print(f"megatron_qwen2 / {other['system']}: {mine['tokens_per_s'] / other['tokens_per_s']:.2f}x "
                      f"tokens/s", flush=True)
    payload = {
        "what": "end-to-end training throughput on one device: our optimizer step vs baselines, random tokens",
        "command": " ".join(["bench/train_throughput.py", *(argv if argv is not None else sys.argv[1:])]),
        "model": args.model,
        "model_config": {k: v for k, v in vars(mcfg).items()},
        "config": {"seq": args.seq, "mbs": args.mbs, "gbs": args.gbs, "micro_batches": args.gbs // args.mbs,
                   "tokens_per_step": args.gbs * args.seq, "steps": args.steps, "warmup": args.warmup,
                   "recompute": args.recompute, "ops": args.ops, "dtype": "bf16", "documents": args.documents,
                   "seed": args.seed},
        "flops_per_token": flops_per_token,
        "mfu_formula": "training_flops_per_token (megatron_qwen2/model/flops.py): 3 x (2 x matmul parameters per "
                       "token incl. the head + causal attention 2 x n_heads x head_dim x seq per layer); "
                       f"MFU = that x tokens/s / {SPEC_PEAK_TFLOPS:.0f} TFLOP/s",
        "ceilings": {"spec_bf16_tflops": SPEC_PEAK_TFLOPS, "matmul_bf16_tflops_measured": ceiling},
        "results": rows,
        "profile": prof,
    }
    if "megatron_qwen2" in by_name:
        payload["ours"] = by_name["megatron_qwen2"]
    payload["baselines"] = [r for r in rows if not r["system"].startswith("megatron_qwen2")]
    out = args.out or str(ROOT / "bench" / "results" / f"train_throughput_{args.model}_{device_slug()}.json")
    path = write_result_file(out, payload, args.commit)
    print(f"wrote {path}")
    return 0 if rows and all("error" not in r for r in rows if r["system"] != "megatron_core") else 1


if __name__ == "__main__":
    sys.exit(main())
