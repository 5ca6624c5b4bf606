"""Weight-gradient GEMMs into fp32 main_grad: FP8 accumulating in the GEMM vs FP8 product then add, vs bf16.

    python bench/fp8_wgrad.py [--tokens 8192] [--out DIR] [--commit SHA]

main_grad [N, K] += dy^T x for the four linear layers of a Qwen2-7B block (q|k|v, o, gate|up, down)
over `tokens` rows (micro-batch 2 x seq 4096): bf16 as the bf16 step does it (`torch.addmm` into
main_grad, fp32 out), and for each FP8 recipe `ops.fp8.add_weight_gemm` with the GEMM accumulating
into main_grad (csrc/fp8_gemm.cpp, cuBLASLt with beta 1) and with its fp32 product made and then
added (`in_gemm=False`). The operands are quantised once before timing (both FP8 paths take the
same ones). TFLOP/s over 2 x N x K x tokens, against the bf16 matmul rate measured here.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import matmul_ceiling_tflops, time_ms, write_result  # noqa: E402
from megatron_qwen2.ops.fp8 import add_weight_gemm, pad_rows, quantize, recipe  # noqa: E402

HIDDEN, FFN, QKV = 3584, 18944, 3584 + 2 * 512
LAYERS = {"qkv": (QKV, HIDDEN), "o": (HIDDEN, HIDDEN), "gate_up": (2 * FFN, HIDDEN), "down": (HIDDEN, FFN)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--out", default=None)
    ap.add_argument("--commit", default=None)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    ceiling = matmul_ceiling_tflops()
    table = []
    print(f"Qwen2-7B weight gradients over {args.tokens} tokens; bf16 matmul ceiling {ceiling:.0f} TFLOP/s")
    for layer, (n, k) in LAYERS.items():
        dy = torch.randn(args.tokens, n, device="cuda", dtype=torch.bfloat16)
        x = torch.randn(args.tokens, k, device="cuda", dtype=torch.bfloat16)
        main_grad = torch.zeros(n, k, device="cuda", dtype=torch.float32)
        flops = 2 * n * k * args.tokens
        runs = [("bf16", "addmm into main_grad",
                 lambda: torch.addmm(main_grad, dy.t(), x, out_dtype=torch.float32, out=main_grad))]
        for name in ("tensorwise", "rowwise", "blockwise"):
            rcp = recipe(name)
            dyt = quantize(pad_rows(dy, rcp.token_multiple).t().contiguous(), rcp.activation_tiling, rcp.grad_dtype)
            xt = quantize(pad_rows(x, rcp.token_multiple).t().contiguous(), rcp.activation_tiling, rcp.input_dtype)
            runs.append((name, "accumulating GEMM", lambda a=dyt, b=xt: add_weight_gemm(a, b, main_grad)))
            runs.append((name, "product, then add",
                         lambda a=dyt, b=xt: add_weight_gemm(a, b, main_grad, in_gemm=False)))
        base = None
        for name, how, run in runs:
            ms = time_ms(run, warmup=5, iters=20)
            base = base or ms
            tflops = flops / ms / 1e9
            table.append({"layer": layer, "n": n, "k": k, "recipe": name, "how": how, "ms": ms, "tflops": tflops,
                          "fraction_of_matmul": tflops / ceiling, "speedup_vs_bf16": base / ms})
            print(f"{layer:>8} [{n}, {k}] {name:>10} {how:>21}: {ms:7.3f} ms {tflops:6.0f} TFLOP/s x{base / ms:.2f}")
        del dy, x, main_grad
    for name in ("bf16", "tensorwise", "rowwise", "blockwise"):
        for how in sorted({r["how"] for r in table if r["recipe"] == name}):
            ms = sum(r["ms"] for r in table if r["recipe"] == name and r["how"] == how)
            print(f"block total {name:>10} {how:>21}: {ms:7.3f} ms")
    path = write_result("fp8_wgrad_qwen2_7b", {
        "what": "weight-gradient GEMMs of one Qwen2-7B block into fp32 main_grad: bf16 addmm, FP8 accumulating "
                "GEMM (csrc/fp8_gemm.cpp), FP8 product then add",
        "command": " ".join(["python bench/fp8_wgrad.py", *(argv if argv is not None else sys.argv[1:])]),
        "tokens": args.tokens, "matmul_ceiling_tflops": ceiling, "results": table}, args.out, args.commit)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
