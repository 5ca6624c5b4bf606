"""Loss curves of bf16 and each FP8 recipe from the same seed and data: does FP8 train as well?

    python bench/fp8_numerics.py [--steps 1000] [--recipes none tensorwise rowwise blockwise]
        [--seq 512] [--mbs 8] [--gbs 16] [--lr 3e-4] [--out FILE]
    python bench/fp8_numerics.py --merge OUT FILE ...   # one file from runs made in several processes

Each recipe trains the Qwen2-0.5B architecture (24 layers, hidden 896, 14 heads, 2 kv heads, FFN
4864; the vocabulary of the project's tokenizer, 4096, in place of Qwen2's 151,936) from the same
initial weights on the same batches of the built-in corpus (the Python standard library's source,
real text), through TrainingStep, the step train.py runs: bf16 compute, fp32 masters, AdamW,
warm-up then cosine decay. Recorded per recipe: every step's loss and grad norm, skipped steps, the
mean loss of the last 100 steps and its relative difference from bf16's (the issue's bound: 0.5 %
for tensorwise and rowwise, 0.25 % for blockwise). `--plot FILE.png` draws the curves of a result
file (matplotlib), on any machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.common import device_slug, write_result_file  # noqa: E402

BOUNDS = {"tensorwise": 0.005, "rowwise": 0.005, "blockwise": 0.0025}


def config(args, fp8: str):
    from megatron_qwen2.config import Config, DataConfig, ModelConfig, OptimConfig, TrainConfig

    model = ModelConfig(name="qwen2_0.5b_vocab4096", hidden_size=896, num_layers=24, num_attention_heads=14,
                        num_kv_heads=2, ffn_hidden_size=4864, vocab_size=4096, tie_word_embeddings=True,
                        rope_theta=1e6)
    cfg = Config(model=model, optim=OptimConfig(lr=args.lr, min_lr_ratio=0.1, warmup_steps=args.steps // 10,
                                                schedule="cosine"),
                 data=DataConfig(max_files=args.max_files),
                 train=TrainConfig(steps=args.steps, micro_batch_size=args.mbs, global_batch_size=args.gbs,
                                   seq_length=args.seq, dtype="bf16", seed=args.seed, fp8=fp8),
                 device="cuda" if torch.cuda.is_available() else "cpu")
    return cfg.validate(1)


def train_curve(args, fp8: str, device: torch.device, report=lambda run: None) -> dict:
    """Train `args.steps` steps with `fp8`; `report(run)` gets the run so far every 100 steps."""
    from megatron_qwen2.data.batch import Batch
    from megatron_qwen2.data.builder import build_datasets
    from megatron_qwen2.engine.step import TrainingStep
    from megatron_qwen2.lr_schedule import learning_rate
    from megatron_qwen2.parallel import Topology

    cfg = config(args, fp8)
    torch.manual_seed(args.seed)
    step = TrainingStep(cfg, Topology.build(cfg.parallel, 1, 0), device)
    data = build_datasets(cfg.data, cfg.train.seq_length, cfg.train.seed)[0]
    losses, norms, skipped = [], [], 0
    began = time.perf_counter()
    for i in range(args.steps):
        out = step(Batch(tokens=data.local_batch(i, args.gbs, 0, 1).tokens), learning_rate(i, cfg.optim, args.steps))
        losses.append(out.loss)
        norms.append(out.grad_norm)
        skipped += out.skipped
        if (i + 1) % 100 == 0 and i + 1 < args.steps:
            print(f"{fp8:>10} step {i + 1}: loss {out.loss:.4f}", flush=True)
            report(summary(fp8, losses, norms, skipped, time.perf_counter() - began))
    return summary(fp8, losses, norms, skipped, time.perf_counter() - began)


def summary(fp8: str, losses: list[float], norms: list[float], skipped: int, seconds: float) -> dict:
    last = losses[-100:]
    return {"fp8": fp8, "steps": len(losses), "losses": losses, "grad_norms": norms, "skipped_steps": skipped,
            "diverged": not all(math.isfinite(v) for v in losses),
            "mean_loss_last_100": sum(last) / len(last), "seconds": seconds}


def plot(result_file: str, png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(Path(result_file).read_text())
    fig, (full, tail) = plt.subplots(1, 2, figsize=(12, 4.5))
    for run in data["runs"]:
        label = "bf16" if run["fp8"] == "none" else f"fp8 {run['fp8']}"
        smooth = [sum(run["losses"][max(0, i - 19):i + 1]) / len(run["losses"][max(0, i - 19):i + 1])
                  for i in range(len(run["losses"]))]
        full.plot(smooth, label=label, linewidth=1)
        n = min(300, len(smooth))
        tail.plot(range(len(smooth) - n, len(smooth)), smooth[-n:], label=label, linewidth=1)
    fig.suptitle(f"{data['model']}, {data['device']}: loss (20-step mean)")
    full.set(title="every step", xlabel="step", ylabel="loss")
    tail.set(title="the last 300 steps", xlabel="step")
    for ax in (full, tail):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    print(f"wrote {png}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--recipes", nargs="+", default=["none", "tensorwise", "rowwise", "blockwise"])
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--mbs", type=int, default=8)
    ap.add_argument("--gbs", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--max-files", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--out", default=None)
    ap.add_argument("--plot", nargs=2, metavar=("RESULT_JSON", "PNG"), help="only draw the curves of a result file")
    ap.add_argument("--merge", nargs="+", metavar=("OUT", "FILE"),
                    help="only write OUT with the runs of the result files FILE ... (bf16's first)")
    args = ap.parse_args(argv)
    if args.plot:
        plot(*args.plot)
        return 0
    if args.merge:
        return merge(args.merge[0], args.merge[1:])
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    out = args.out or str(ROOT / "bench" / "results" /
                          f"fp8_numerics_qwen2_0.5b_{device_slug()}_{datetime.date.today().isoformat()}.json")
    runs = []
    for fp8 in args.recipes:  # the file is written every 100 steps: a cut-short call keeps what ran
        runs.append(train_curve(args, fp8, device, report=lambda run: write(out, args, argv, runs + [run])))
        write(out, args, argv, runs)
    return 0


def merge(out: str, files: list[str]) -> int:
    """Write `out` with every run of `files`, which must come from the same command but --recipes
    and --out (the recipes trained side by side, one process each)."""
    parts = [json.loads(Path(f).read_text()) for f in files]
    configs = [{k: v for k, v in p["config"].items() if k not in ("recipes", "out")} for p in parts]
    if any(c != configs[0] for c in configs):
        raise SystemExit("error: the files were made with different settings: " + ", ".join(files))
    if len({(p["device"], p["torch"]) for p in parts}) > 1:
        raise SystemExit("error: the files were measured on different devices or torch versions: " + ", ".join(files))
    runs = sorted((r for p in parts for r in p["runs"]), key=lambda r: r["fp8"] != "none")
    steps = min(len(r["losses"]) for r in runs)  # runs cut short are compared over the steps all made
    runs = [r if len(r["losses"]) == steps else
            summary(r["fp8"], r["losses"][:steps], r["grad_norms"][:steps], r["skipped_steps"], r["seconds"])
            for r in runs]
    args = argparse.Namespace(**parts[0]["config"])
    args.recipes = [r["fp8"] for r in runs]
    measured = {k: parts[0][k] for k in ("device", "commit", "date", "torch", "cuda")}  # the first run's
    write(out, args, ["--recipes", *args.recipes, "(one process per recipe, merged with --merge)"], runs, measured)
    return 0


def write(out: str, args, argv, runs: list[dict], measured: dict | None = None) -> None:
    """The result file of `runs`; `measured` (device, commit, date, torch, cuda) when the runs were
    made elsewhere, else those of this process."""
    base = next((r for r in runs if r["fp8"] == "none"), None)
    for r in runs:
        if base is not None and r is not base:
            r["relative_to_bf16"] = r["mean_loss_last_100"] / base["mean_loss_last_100"] - 1
            r["bound"] = BOUNDS[r["fp8"]]
            r["within_bound"] = abs(r["relative_to_bf16"]) <= r["bound"] and not r["diverged"]
    r = runs[-1]
    print(f"{r['fp8']:>10}: mean loss of the last 100 steps {r['mean_loss_last_100']:.4f}"
          + (f" ({100 * r['relative_to_bf16']:+.3f} % of bf16, bound {100 * r['bound']:.2f} %)"
             if "relative_to_bf16" in r else "") + f", {r['skipped_steps']} skipped, {len(r['losses'])} steps in {r['seconds']:.0f} s", flush=True)
    payload = {"what": "loss curves of bf16 and FP8 recipes, same seed, weights and batches",
               "command": " ".join(["python bench/fp8_numerics.py", *(argv if argv is not None else sys.argv[1:])]),
               "model": "Qwen2-0.5B architecture, vocabulary 4096 (the project's tokenizer)",
               "data": "built-in corpus (Python standard library source), "
                       f"{args.gbs} x {args.seq} tokens per step",
               "config": vars(args), "runs": runs}
    print(f"wrote {write_result_file(out, payload, measured=measured)}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
