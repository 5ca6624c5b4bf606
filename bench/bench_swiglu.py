"""Fused SwiGLU kernel vs eager PyTorch and torch.compile, against the copy-bandwidth ceiling.

    python bench/bench_swiglu.py [--out DIR] [--commit SHA] [--tokens 8192 16384]

Shapes are Qwen2-7B's MLP (F = 18944), bf16. Bandwidth counts the fewest bytes each pass must
move: forward reads 2F and writes F per token; backward reads x (2F) and dy (F) and writes dx (2F);
forward+backward is the sum of the two.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import copy_bandwidth_gbs, time_ms, write_result  # noqa: E402
from megatron_qwen2 import ops  # noqa: E402
from megatron_qwen2.ops import extension, reference  # noqa: E402

FFN = 18944


def passes(name: str, fn, ext, x, dy) -> dict:
    """The timed callables of one implementation: forward, forward+backward (and the kernel's bare backward).

    The kernel's fwd/bwd rows call the extension directly; its f+b row goes through the ops door and autograd.
    """
    xg = x.detach().clone().requires_grad_(True)
    out = {"fwd": lambda: fn(x), "f+b": lambda: torch.autograd.grad(fn(xg), xg, dy)}
    if name == "kernel":
        out["fwd"] = lambda: ext.swiglu_forward(x)
        out["bwd"] = lambda: ext.swiglu_backward(x, dy)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None, help="directory for the JSON result (default bench/results)")
    parser.add_argument("--commit", default=None, help="commit measured (default $GIT_COMMIT or git rev-parse HEAD)")
    parser.add_argument("--tokens", type=int, nargs="+", default=[8192, 16384])
    parser.add_argument("--rounds", type=int, default=2, help="times each measurement is repeated, to show the spread")
    args = parser.parse_args()
    ext = extension.load()
    if ext is None or not torch.cuda.is_available():
        raise SystemExit("needs CUDA and megatron_qwen2._C (pip install --no-build-isolation -e .)")
    impls = {"kernel": ops.swiglu, "eager": reference.swiglu}
    try:
        impls["compile"] = torch.compile(reference.swiglu)
    except Exception as e:  # noqa: BLE001 - report and go on without it
        print(f"torch.compile unavailable: {e}")
    ceiling = copy_bandwidth_gbs()
    rows = []
    for tokens in args.tokens:
        x = torch.randn(tokens, 2 * FFN, device="cuda", dtype=torch.bfloat16)
        dy = torch.randn(tokens, FFN, device="cuda", dtype=torch.bfloat16)
        elt = x.element_size()
        nbytes = {"fwd": 3 * tokens * FFN * elt, "bwd": 5 * tokens * FFN * elt, "f+b": 8 * tokens * FFN * elt}
        for name, fn in list(impls.items()):
            try:
                timed = {label: [time_ms(call) for _ in range(args.rounds)]
                         for label, call in passes(name, fn, ext, x, dy).items()}
            except Exception as e:  # noqa: BLE001 - a failing compile must not hide the other numbers
                print(f"{name} failed at {tokens} tokens: {type(e).__name__}: {e}")
                impls.pop(name)
                continue
            for label, ms_rounds in timed.items():
                ms = min(ms_rounds)
                gbs = nbytes[label] / ms / 1e6
                rows.append(dict(tokens=tokens, ffn=FFN, dtype="bf16", impl=name, pass_=label, ms=ms,
                                 ms_rounds=ms_rounds, bytes=nbytes[label], gb_per_s=gbs,
                                 fraction_of_copy=gbs / ceiling))
        del x, dy
    path = write_result("swiglu", {"copy_ceiling_gb_per_s": ceiling, "rows": rows}, args.out, args.commit)
    print(f"\n{torch.cuda.get_device_name()}  torch {torch.__version__}  CUDA {torch.version.cuda}")
    print(f"copy ceiling: {ceiling:.0f} GB/s (bytes read + written)")
    print(f"{'tokens':>7} {'pass':>4} {'impl':>8} {'ms':>8} {'spread':>7} {'GB/s':>7} {'% copy':>7}")
    for r in sorted(rows, key=lambda r: (r["tokens"], r["pass_"])):
        spread = max(r["ms_rounds"]) - min(r["ms_rounds"])
        print(f"{r['tokens']:>7} {r['pass_']:>4} {r['impl']:>8} {r['ms']:>8.3f} {spread:>7.3f} "
              f"{r['gb_per_s']:>7.0f} {100 * r['fraction_of_copy']:>6.1f}%")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
