"""Fused SwiGLU kernel vs eager PyTorch and torch.compile, against the copy-bandwidth ceiling.

    python bench/bench_swiglu.py [--out DIR]

Shapes are Qwen2-7B's MLP (F = 18944) at 8k and 16k tokens per GPU, bf16. Bandwidth counts
the bytes each pass must move: forward reads 2F and writes F per token; backward reads 2F + F
and writes 2F.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import copy_bandwidth_gbs, time_ms, write_result  # noqa: E402
from megatron_qwen2.ops import extension, reference  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None, help="directory for the JSON result (default bench/results)")
    args = parser.parse_args()
    ext = extension.load()
    if ext is None:
        raise SystemExit("megatron_qwen2._C is not built; build it first (pip install --no-build-isolation -e .)")
    ceiling = copy_bandwidth_gbs()
    try:
        compiled = torch.compile(reference.swiglu)
    except Exception as e:  # noqa: BLE001 - report and go on without it
        print(f"torch.compile unavailable: {e}")
        compiled = None
    rows = []
    print(f"copy ceiling: {ceiling:.0f} GB/s")
    print(f"{'tokens':>7} {'pass':>4} {'impl':>8} {'ms':>8} {'GB/s':>7} {'% copy':>7}")
    for tokens in (8192, 16384):
        f = 18944
        x = torch.randn(tokens, 2 * f, device="cuda", dtype=torch.bfloat16)
        dy = torch.randn(tokens, f, device="cuda", dtype=torch.bfloat16)
        xg = x.clone().requires_grad_(True)
        elt = x.element_size()
        fwd_bytes, bwd_bytes = 3 * tokens * f * elt, 5 * tokens * f * elt
        impls = {"kernel": (lambda: ext.swiglu_forward(x), lambda: ext.swiglu_backward(x, dy)),
                 "eager": (lambda: reference.swiglu(x),
                           lambda: torch.autograd.grad(reference.swiglu(xg), xg, dy))}
        if compiled is not None:
            impls["compile"] = (lambda: compiled(x), lambda: torch.autograd.grad(compiled(xg), xg, dy))
        for name, (fwd, fwd_bwd) in impls.items():
            try:
                ms_f = time_ms(fwd)
                ms_fb = time_ms(fwd_bwd)
            except Exception as e:  # noqa: BLE001
                print(f"{name} failed: {e}")
                continue
            # Kernel backward alone; for eager/compile the forward is part of the autograd call.
            bytes_fb = bwd_bytes if name == "kernel" else fwd_bytes + bwd_bytes
            for label, ms, nbytes in (("fwd", ms_f, fwd_bytes), ("bwd" if name == "kernel" else "f+b", ms_fb, bytes_fb)):
                gbs = nbytes / ms / 1e6
                rows.append(dict(tokens=tokens, ffn=f, impl=name, pass_=label, ms=ms, gb_per_s=gbs,
                                 fraction_of_copy=gbs / ceiling))
                print(f"{tokens:>7} {label:>4} {name:>8} {ms:>8.3f} {gbs:>7.0f} {100 * gbs / ceiling:>6.1f}%")
    path = write_result("swiglu", {"copy_ceiling_gb_per_s": ceiling, "rows": rows}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
