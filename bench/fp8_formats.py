"""e4m3 or e5m2 for each operand of the FP8 GEMMs: the error each format gives on the real
tensors of a training run, per recipe (ops/fp8.py).

    python bench/fp8_formats.py [--steps 30] [--out FILE]

Trains the tiny Qwen2 (conf/model/tiny.yaml, fp32) on the built-in corpus for --steps steps, then
captures one micro-batch's inputs x, weights W and output gradients dy of every attention and MLP
projection. For each recipe, operand role and format it reports the relative error
||dequantise(quantise(t)) - t|| / ||t|| of the operand, and of the GEMM it enters against the fp32
product: the forward (x, W), the input gradient (dy, W^T) and the weight gradient (dy^T, x^T).
Errors are the median over the layers. Runs on the CPU: quantisation is the same on every device.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.common import write_result_file  # noqa: E402
from megatron_qwen2.ops.fp8 import E4M3, E5M2, quantize, recipe  # noqa: E402

FORMATS = {"e4m3": E4M3, "e5m2": E5M2}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def captured_tensors(steps: int, seed: int) -> list[dict]:
    """x, W, dy of every projection for one micro-batch after `steps` training steps."""
    from megatron_qwen2.config import Config, DataConfig, ModelConfig, OptimConfig, TrainConfig
    from megatron_qwen2.data.batch import Batch
    from megatron_qwen2.data.builder import build_datasets
    from megatron_qwen2.engine.step import TrainingStep
    from megatron_qwen2.parallel import Topology
    from megatron_qwen2.parallel.layers import ColumnParallelLinear, RowParallelLinear

    cfg = Config(model=ModelConfig(hidden_size=128, num_layers=4, num_attention_heads=4, num_kv_heads=2,
                                   ffn_hidden_size=352, vocab_size=4096, tie_word_embeddings=True),
                 optim=OptimConfig(lr=3e-3, warmup_steps=5), data=DataConfig(max_files=50),
                 train=TrainConfig(steps=steps, micro_batch_size=8, global_batch_size=8, seq_length=128, seed=seed))
    cfg.validate(1)
    step = TrainingStep(cfg, Topology.build(cfg.parallel, 1, 0), torch.device("cpu"))
    train_set = build_datasets(cfg.data, cfg.train.seq_length, seed)[0]
    for i in range(steps):
        step(Batch(tokens=train_set.local_batch(i, 8, 0, 1).tokens), cfg.optim.lr)
    found, hooks = [], []
    for name, module in step.chunks[0].named_modules():
        if isinstance(module, (ColumnParallelLinear, RowParallelLinear)) and name.startswith("layers."):
            entry = {"layer": name, "weight": module.weight.detach().reshape(-1, module.weight.shape[-1]).clone()}
            found.append(entry)
            hooks.append(module.register_forward_hook(
                lambda m, inp, out, e=entry: e.update(x=inp[0].detach().reshape(-1, inp[0].shape[-1]).clone())))
            hooks.append(module.register_full_backward_hook(
                lambda m, gin, gout, e=entry: e.update(dy=gout[0].detach().reshape(-1, gout[0].shape[-1]).clone())))
    step(Batch(tokens=train_set.local_batch(steps, 8, 0, 1).tokens), 0.0)
    for h in hooks:
        h.remove()
    return found


def errors(tensors: list[dict], name: str) -> dict:
    r = recipe(name)
    act, wt = r.activation_tiling, r.weight_tiling
    out = {}
    for fmt, dtype in FORMATS.items():
        if name == "blockwise" and dtype is E5M2:
            continue  # cuBLASLt's blockwise GEMMs take e4m3 only
        rows = {"x": [], "weight": [], "dy": [], "forward": [], "input_grad": [], "weight_grad": []}
        for t in tensors:
            x, w, dy = t["x"].float(), t["weight"].float(), t["dy"].float()
            xq, wq, dyq = quantize(x, act, dtype), quantize(w, wt, dtype), quantize(dy, act, dtype)
            rows["x"].append(rel(xq.dequantize(), x))
            rows["weight"].append(rel(wq.dequantize(), w))
            rows["dy"].append(rel(dyq.dequantize(), dy))
            rows["forward"].append(rel(xq.dequantize() @ wq.dequantize().t(), x @ w.t()))
            wtq = quantize(w.t(), wt, dtype)
            rows["input_grad"].append(rel(dyq.dequantize() @ wtq.dequantize().t(), dy @ w))
            dyt, xt = quantize(dy.t(), act, dtype), quantize(x.t(), act, dtype)
            rows["weight_grad"].append(rel(dyt.dequantize() @ xt.dequantize().t(), dy.t() @ x))
        out[fmt] = {k: statistics.median(v) for k, v in rows.items()}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    tensors = captured_tensors(args.steps, args.seed)
    results = {name: errors(tensors, name) for name in ("tensorwise", "rowwise", "blockwise")}
    print(f"{'recipe':<11} {'format':<6} " + " ".join(f"{k:>11}" for k in next(iter(results["rowwise"].values()))))
    for name, by_format in results.items():
        for fmt, row in by_format.items():
            print(f"{name:<11} {fmt:<6} " + " ".join(f"{v:>11.4f}" for v in row.values()))
    import datetime
    out = args.out or str(ROOT / "bench" / "results" / f"fp8_formats_cpu_{datetime.date.today().isoformat()}.json")
    payload = {"what": "relative error of e4m3 and e5m2 quantisation of each FP8 GEMM operand, and of the GEMMs, "
                       "on a training run's tensors (median over the projections)",
               "command": " ".join(["python bench/fp8_formats.py", *(argv if argv is not None else sys.argv[1:])]),
               "model": "tiny (hidden 128, 4 layers, ffn 352), fp32, trained --steps steps on the built-in corpus",
               "layers": [t["layer"] for t in tensors], "results": results}
    print(f"wrote {write_result_file(out, payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
