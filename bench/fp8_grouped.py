"""Routed experts' FP8 GEMMs as one grouped GEMM (torch._scaled_grouped_mm) vs one GEMM per expert.

    python bench/fp8_grouped.py [--tokens 4096] [--profile] [--out DIR] [--commit SHA]

Forward and backward (input and weight gradients) of the two grouped linears of one
Qwen2-57B-A14B MoE layer on one GPU (64 experts, hidden 3584, expert FFN 2560, top-8: 8 x tokens
rows, spread over the experts by a uniform random router), through `model.moe.expert_mlp`:
bf16 (`torch._grouped_mm`, the baseline), and each FP8 recipe with `Fp8.grouped_gemms` on (one
grouped GEMM where the recipe has one) and off (one GEMM per expert), and the grouped recipes again
on rows whose groups the token permutation padded (as the dispatcher hands them to FP8 experts).
The quantisation of activations and gradients is timed with the GEMMs; the weights' FP8 copies are
made once before timing, as the training step makes them once per optimizer step. TFLOP/s over the 6 x rows x
hidden x FFN x 3 FLOPs of the two linears, against the bf16 matmul rate measured here.
`--profile` adds, per row, where its time goes: the op-class table and the top kernels
(`profile_summary.profile_steps`), so that GEMM time and the quantisation and copies around it are
told apart.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import matmul_ceiling_tflops, time_ms, write_result  # noqa: E402
from bench.profile_summary import format_summary, profile_steps  # noqa: E402
from megatron_qwen2.model.moe import _pad_groups, _rows_kept, expert_mlp  # noqa: E402
from megatron_qwen2.ops.fp8 import Fp8, Fp8Weights, padded, recipe  # noqa: E402

EXPERTS, HIDDEN, FFN, TOP_K = 64, 3584, 2560, 8


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--profile", action="store_true", help="also profile each row: op classes and top kernels")
    ap.add_argument("--out", default=None)
    ap.add_argument("--commit", default=None)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    rows = args.tokens * TOP_K
    counts = torch.randint(0, EXPERTS, (rows,)).bincount(minlength=EXPERTS).tolist()
    x = torch.randn(rows, HIDDEN, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    gate_up = (torch.randn(EXPERTS, 2 * FFN, HIDDEN, device="cuda", dtype=torch.bfloat16) * 0.02).requires_grad_()
    down = (torch.randn(EXPERTS, HIDDEN, FFN, device="cuda", dtype=torch.bfloat16) * 0.02).requires_grad_()
    dy = torch.randn(rows, HIDDEN, device="cuda", dtype=torch.bfloat16)
    flops = 3 * 2 * rows * HIDDEN * 3 * FFN  # forward + two backward GEMMs of gate_up (2F) and down (F)

    # The rows as the dispatcher hands them to FP8 experts: each expert's group padded by the token
    # permutation (ops.permute multiple), so the experts run no pad or drop copy.
    multiple = recipe("tensorwise").token_multiple  # rowwise's too: the recipes with a grouped GEMM
    groups = [padded(c, multiple) for c in counts]
    keep = _rows_kept(counts, groups, x.device)
    x_padded = _pad_groups(x.detach(), keep, sum(groups)).requires_grad_()
    dy_padded = _pad_groups(dy, keep, sum(groups))

    def step(fp8, padded_rows=False):
        rows_in, groups_in, dy_in = (x_padded, groups, dy_padded) if padded_rows else (x, counts, dy)

        def run():
            out = expert_mlp(rows_in, gate_up, down, groups_in, fp8)
            torch.autograd.grad(out, (rows_in, gate_up, down), dy_in)
        return run

    ceiling = matmul_ceiling_tflops()
    profiles = {}

    def measure(name, how, run):
        if args.profile:
            profiles[(name, how)] = profile_steps(run, torch.device("cuda"))
        return name, how, time_ms(run, warmup=3, iters=10)

    results = [measure("bf16", "torch._grouped_mm", step(None))]
    # Hopper has no grouped blockwise GEMM: one GEMM per expert is blockwise's only path.
    for name, grouped in [("tensorwise", True), ("tensorwise", False), ("rowwise", True), ("rowwise", False),
                          ("blockwise", False)]:
        fp8 = Fp8(recipe(name), Fp8Weights(), grouped_gemms=grouped)
        step(fp8)()  # the weights' FP8 copies, made once
        how = "torch._scaled_grouped_mm" if grouped else "one GEMM per expert"
        results.append(measure(name, how, step(fp8)))
        if grouped:
            results.append(measure(name, how + ", rows padded by the permutation", step(fp8, padded_rows=True)))
    base = results[0][2]
    print(f"Qwen2-57B-A14B experts, {rows} rows over {EXPERTS} experts (max/mean {max(counts) * EXPERTS / rows:.2f}); "
          f"bf16 matmul ceiling {ceiling:.0f} TFLOP/s")
    table = []
    for name, how, ms in results:
        tflops = flops / ms / 1e9
        table.append({"recipe": name, "gemms": how, "ms": ms, "tflops": tflops, "speedup_vs_bf16": base / ms})
        print(f"{name:>10} {how:>26}: {ms:7.2f} ms  {tflops:6.0f} TFLOP/s  x{base / ms:.2f} vs bf16")
        if (name, how) in profiles:
            table[-1]["profile"] = profiles[(name, how)]
            print(format_summary(profiles[(name, how)]))
    path = write_result("fp8_grouped_qwen2_57b_a14b", {
        "what": "forward + backward of one MoE layer's routed experts (gate_up, SwiGLU, down), bf16 vs FP8 "
                "grouped GEMMs vs one FP8 GEMM per expert",
        "command": " ".join(["python bench/fp8_grouped.py", *(argv if argv is not None else sys.argv[1:])]),
        "rows": rows, "experts": EXPERTS, "hidden": HIDDEN, "ffn": FFN, "counts": counts,
        "matmul_ceiling_tflops": ceiling, "results": table}, args.out, args.commit)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
