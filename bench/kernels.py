"""The compiled kernels vs PyTorch eager and torch.compile, against ceilings measured in the same run.

    python bench/kernels.py [--out DIR] [--commit SHA] [--only rms_norm permute rope cross_entropy fp8_quant fp8_fused
                                                           attention]
    python bench/kernels.py --sanitize     # one small call of every kernel path, for compute-sanitizer

Memory-bound kernels are reported in GB/s of the fewest bytes each pass must move (every input
read once, every output written once; the row gathers of permute/unpermute count each gathered
row) and as a fraction of the device copy bandwidth (bytes read + written) measured here.
FP8 quantisation counts x once per pass the kernels make over it (twice for "tensor" and for "row"
with the transpose) plus the e4m3 codes and scales written, against the PyTorch definition in
ops/fp8.py (which the kernels match bit for bit) timed on the same inputs. The ops that hand an FP8
linear layer its input quantised (RMSNorm, RMSNorm with the residual add, SwiGLU: y never written)
count the fewest bytes of one pass (inputs read once, the sum written, both codes and the scales
written) against their kernel then the quantisation kernel (y written and read again).
Attention is reported in TFLOP/s (causal: half the square) against the bf16 matmul rate
measured here, for the door (`ops.attention`) and each SDPA backend alone.
Shapes: RMSNorm at hidden 896/1536/3584/5120/8192 (tokens sized so each tensor exceeds the L2 cache),
MoE permutation at Qwen2-57B-A14B (hidden 3584, 64 experts, top-8, 16k tokens), RoPE and
attention at Qwen2-7B (28 query / 4 kv heads, head dim 128), cross-entropy at vocab 152064 / tp 2,
FP8 quantisation of 8192 tokens at hidden 3584 and at the MLP widths 18944 / 37888 (Qwen2-7B's
intermediate size, and its gate | up pair), the fused RMSNorm and SwiGLU quantisation at the same
Qwen2-7B shapes (8192 tokens, hidden 3584, SwiGLU 18944).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import copy_bandwidth_gbs, matmul_ceiling_tflops, time_ms, write_result  # noqa: E402
from megatron_qwen2 import ops  # noqa: E402
from megatron_qwen2.ops import extension, library, reference  # noqa: E402

BF16 = torch.bfloat16


def _grad(fn, inputs, grads):
    """Forward + backward of fn through autograd w.r.t. `inputs`."""
    def run():
        out = fn()
        outs = out if isinstance(out, tuple) else (out,)
        return torch.autograd.grad(outs, inputs, grads[: len(outs)], allow_unused=True)
    return run


REPS = 10  # calls captured back to back in one graph; a replay is timed and divided by REPS
ATTENTION_REPS = 3  # attention calls of 0.2-10 ms


def graph_of(fn, reps=REPS):
    """`reps` calls of fn captured in one CUDA graph (after warm-up on a side stream): the replay.

    Timing a single eager call between two events also times the host: the start event fires and
    the GPU waits while Python, the custom-op dispatch and autograd reach the launch, which for
    kernels of 0.1 ms is 10-50 %. A replay of back-to-back captured calls is the GPU time alone,
    which is what a training step, whose host runs ahead of the GPU, spends. Every row is timed
    so; the f+b row is also timed as plain eager calls ("f+b host") to show the host-bound latency.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    return graph.replay


KERNEL_ONLY = False


def measure(rows, ceiling, kernel, impls, nbytes, rounds, **meta):
    """Time every (impl, pass) callable; append one row each. impls: name -> {pass: callable}."""
    for name, passes in impls.items():
        if KERNEL_ONLY and name != "kernel":
            continue
        timed = {label: call if isinstance(call, tuple) else ("graph", call) for label, call in passes.items()}
        if "f+b" in passes and not isinstance(passes["f+b"], tuple):
            timed["f+b host"] = ("eager", passes["f+b"])
            nbytes = dict(nbytes, **{"f+b host": nbytes["f+b"]})
        for label, (how, call) in timed.items():
            try:
                if how == "graph":
                    replay = graph_of(call)
                    ms_rounds = [time_ms(replay, warmup=3, iters=20) / REPS for _ in range(rounds)]
                else:
                    ms_rounds = [time_ms(call) for _ in range(rounds)]
            except Exception as e:  # noqa: BLE001 - one failing baseline must not hide the others
                print(f"{kernel} {meta} {name} {label} failed: {type(e).__name__}: {str(e)[:200]}")
                continue
            ms = min(ms_rounds)
            gbs = nbytes[label] / ms / 1e6
            rows.append(dict(kernel=kernel, impl=name, pass_=label, timing=how, ms=ms, ms_rounds=ms_rounds, bytes=nbytes[label],
                             gb_per_s=gbs, fraction_of_copy=gbs / ceiling, **meta))


def bench_rms_norm(rows, ceiling, rounds):
    ext = extension.load()
    tokens_for = {896: 65536, 1536: 32768, 3584: 16384, 5120: 16384, 8192: 16384}
    eager = reference.rms_norm
    compiled = torch.compile(reference.rms_norm)
    eager_add = reference.add_rms_norm
    compiled_add = torch.compile(reference.add_rms_norm)
    for h, n in tokens_for.items():
        e = 2
        x = torch.randn(n, h, device="cuda", dtype=BF16)
        w = torch.randn(h, device="cuda", dtype=BF16)
        dy = torch.randn_like(x)
        xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        y, rstd = ext.rms_norm_forward(x, None, w, 1e-6)
        nbytes = {"fwd": 2 * n * h * e + h * e + 4 * n, "bwd": 3 * n * h * e + 2 * h * e + 4 * n}
        nbytes["f+b"] = nbytes["fwd"] + nbytes["bwd"]
        impls = {
            "kernel": {"fwd": lambda: ext.rms_norm_forward(x, None, w, 1e-6),
                       "bwd": lambda: ext.rms_norm_backward(dy, x, w, rstd, None),
                       "f+b": _grad(lambda: ops.rms_norm(xg, wg, 1e-6), (xg, wg), (dy,))},
            "eager": {"fwd": lambda: eager(x, w, 1e-6), "f+b": _grad(lambda: eager(xg, wg, 1e-6), (xg, wg), (dy,))},
            "compile": {"fwd": lambda: compiled(x, w, 1e-6),
                        "f+b": _grad(lambda: compiled(xg, wg, 1e-6), (xg, wg), (dy,))},
        }
        measure(rows, ceiling, "rms_norm", impls, nbytes, rounds, tokens=n, hidden=h, dtype="bf16")
        if h in (3584, 8192):  # fused with the residual add: x, residual in; y, sum out
            res = torch.randn_like(x)
            resg = res.clone().requires_grad_(True)
            ds = torch.randn_like(x)
            _, rstd2, s = ext.rms_norm_forward(x, res, w, 1e-6)
            nb = {"fwd": 4 * n * h * e + h * e + 4 * n, "bwd": 4 * n * h * e + 2 * h * e + 4 * n}
            nb["f+b"] = nb["fwd"] + nb["bwd"]
            impls = {
                "kernel": {"fwd": lambda: ext.rms_norm_forward(x, res, w, 1e-6),
                           "bwd": lambda: ext.rms_norm_backward(dy, s, w, rstd2, ds),
                           "f+b": _grad(lambda: ops.add_rms_norm(xg, resg, wg, 1e-6), (xg, resg, wg), (dy, ds))},
                "eager": {"fwd": lambda: eager_add(x, res, w, 1e-6),
                          "f+b": _grad(lambda: eager_add(xg, resg, wg, 1e-6), (xg, resg, wg), (dy, ds))},
                "compile": {"fwd": lambda: compiled_add(x, res, w, 1e-6),
                            "f+b": _grad(lambda: compiled_add(xg, resg, wg, 1e-6), (xg, resg, wg), (dy, ds))},
            }
            measure(rows, ceiling, "add_rms_norm", impls, nb, rounds, tokens=n, hidden=h, dtype="bf16")
        del x, dy, xg, y


def bench_permute(rows, ceiling, rounds, tokens=16384, h=3584, experts=64, k=8):
    ext = extension.load()
    e = 2
    x = torch.randn(tokens, h, device="cuda", dtype=BF16)
    routing = torch.rand(tokens, experts, device="cuda").topk(k, dim=-1).indices
    probs = torch.rand(tokens, k, device="cuda")
    permuted, row_map, counts = ops.permute(x, routing, experts)
    order, _, _ = reference.permute_indices(routing, experts)
    flat = row_map.reshape(-1)
    src = order // k
    dperm = torch.randn_like(permuted)
    dout = torch.randn_like(x)
    xg = x.clone().requires_grad_(True)
    yg = permuted.clone().requires_grad_(True)
    pg = probs.clone().requires_grad_(True)

    def gather(a, idx):
        return a[idx]

    cgather = torch.compile(gather)
    cunpermute = torch.compile(reference.unpermute)
    index_nb = {"fwd": 8 * tokens * k + 4 * tokens * k + 8 * experts}
    measure(rows, ceiling, "expert_rows", {"kernel": {"fwd": lambda: library.expert_rows(routing, experts)}},
            index_nb, rounds, tokens=tokens, experts=experts, topk=k)
    rows_b = tokens * k * h * e
    nb = {"fwd": tokens * h * e + rows_b + 4 * tokens * k, "bwd": rows_b + tokens * h * e + 4 * tokens * k}
    nb["f+b"] = nb["fwd"] + nb["bwd"]
    impls = {
        "kernel": {"fwd": lambda: ext.permute_forward(x, flat, k, flat.numel()),
                   "bwd": lambda: ext.permute_backward(dperm, flat, k),
                   "f+b": _grad(lambda: library.permute(xg, flat, k, flat.numel()), (xg,), (dperm,))},
        "door(+index sort)": {"fwd": ("eager", lambda: ops.permute(x, routing, experts))},  # a host sync: no graph
        "eager": {"fwd": lambda: gather(x, src), "f+b": _grad(lambda: gather(xg, src), (xg,), (dperm,))},
        "compile": {"fwd": lambda: cgather(x, src), "f+b": _grad(lambda: cgather(xg, src), (xg,), (dperm,))},
    }
    meta = dict(tokens=tokens, hidden=h, experts=experts, topk=k, dtype="bf16")
    measure(rows, ceiling, "permute", impls, nb, rounds, **meta)
    nb = {"fwd": rows_b + tokens * h * e + 8 * tokens * k, "bwd": 2 * rows_b + tokens * h * e + 12 * tokens * k}
    nb["f+b"] = nb["fwd"] + nb["bwd"]
    impls = {
        "kernel": {"fwd": lambda: ext.unpermute_forward(permuted, flat, probs),
                   "bwd": lambda: ext.unpermute_backward(dout, permuted, flat, probs),
                   "f+b": _grad(lambda: library.unpermute(yg, flat, pg), (yg, pg), (dout,))},
        "eager": {"fwd": lambda: reference.unpermute(permuted, row_map, probs),
                  "f+b": _grad(lambda: reference.unpermute(yg, row_map, pg), (yg, pg), (dout,))},
        "compile": {"fwd": lambda: cunpermute(permuted, row_map, probs),
                    "f+b": _grad(lambda: cunpermute(yg, row_map, pg), (yg, pg), (dout,))},
    }
    measure(rows, ceiling, "unpermute", impls, nb, rounds, **meta)
    index_ms = time_ms(lambda: reference.permute_indices(routing, experts))
    rows.append(dict(kernel="permute_indices", impl="torch (stable argsort, bincount, validation)", pass_="fwd",
                     ms=index_ms, ms_rounds=[index_ms], bytes=0, gb_per_s=0.0, fraction_of_copy=0.0, **meta))


def bench_rope(rows, ceiling, rounds, s=4096, b=4, hq=28, hkv=4, d=128):
    e = 2
    qkv = torch.randn(s, b, hkv, hq // hkv + 2, d, device="cuda", dtype=BF16)
    q = qkv[:, :, :, : hq // hkv].reshape(s, b, hq, d)
    pos = torch.arange(s, device="cuda").float()[:, None].expand(s, b)
    inv = 1.0 / 1e6 ** (torch.arange(0, d, 2, device="cuda").float() / d)
    emb = torch.cat([pos[..., None] * inv] * 2, -1)[:, :, None, :]
    cos, sin = emb.cos().to(BF16), emb.sin().to(BF16)
    dq = torch.randn_like(q)
    qg = q.clone().requires_grad_(True)
    compiled = torch.compile(reference.rope)
    nb = {"fwd": 2 * q.numel() * e + 2 * s * b * d * e}
    nb["bwd"] = nb["fwd"]
    nb["f+b"] = 2 * nb["fwd"]
    impls = {
        "kernel": {"fwd": lambda: library.rope(q, cos, sin), "bwd": lambda: library.rope_backward(dq, cos, sin),
                   "f+b": _grad(lambda: ops.rope(qg, cos, sin), (qg,), (dq,))},
        "eager": {"fwd": lambda: reference.rope(q, cos, sin), "f+b": _grad(lambda: reference.rope(qg, cos, sin), (qg,), (dq,))},
        "compile": {"fwd": lambda: compiled(q, cos, sin), "f+b": _grad(lambda: compiled(qg, cos, sin), (qg,), (dq,))},
    }
    measure(rows, ceiling, "rope", impls, nb, rounds, seq=s, batch=b, heads=hq, head_dim=d, dtype="bf16", tensor="q")


def bench_cross_entropy(rows, ceiling, rounds, n=8192, v=152064 // 2):
    e = 2
    logits = torch.randn(n, v, device="cuda", dtype=BF16) * 3
    labels = torch.randint(0, v, (n,), device="cuda")
    target = labels.clone()
    g = torch.rand(n, device="cuda")
    lse = torch.logsumexp(logits.float(), -1)
    lg = logits.clone().requires_grad_(True)
    compiled = torch.compile(reference.cross_entropy)
    nb = {"fwd": n * v * e + 20 * n, "bwd": 2 * n * v * e + 16 * n}
    nb["f+b"] = nb["fwd"] + nb["bwd"]
    impls = {
        "kernel": {"fwd": lambda: library.cross_entropy_stats(logits, target),
                   "bwd": lambda: library.cross_entropy_backward(logits, target, lse, g),
                   "f+b": _grad(lambda: ops.cross_entropy(lg, labels), (lg,), (g,))},
        "eager(fp32 upcast)": {"fwd": lambda: reference.cross_entropy(logits, labels),
                               "f+b": _grad(lambda: reference.cross_entropy(lg, labels), (lg,), (g,))},
        "compile": {"fwd": lambda: compiled(logits, labels), "f+b": _grad(lambda: compiled(lg, labels), (lg,), (g,))},
    }
    measure(rows, ceiling, "cross_entropy", impls, nb, rounds, tokens=n, vocab_shard=v, dtype="bf16")
    del logits, lg


def bench_fp8_quant(rows, ceiling, rounds, tokens=8192):
    """e4m3 quantisation of bf16 [tokens, k] per tiling, with and without the transposed copy; the
    kernels against the PyTorch definition (for the transpose: x and x.t() quantised one after the
    other)."""
    from megatron_qwen2.ops import fp8

    definition = fp8.quantize_reference

    def reference(x, tiling, transpose):
        if tiling == "tensor":
            q = definition(x, "tensor")
            return (q, q.t()) if transpose else q
        return (definition(x, tiling), definition(x.t(), tiling)) if transpose else definition(x, tiling)

    def kernel(x, tiling, transpose):
        if tiling == "tensor":
            return library.fp8_quantize_tensorwise(x, transpose)
        return library.fp8_quantize(x, tiling, transpose)

    for k in (3584, 18944, 37888):
        x = torch.randn(tokens, k, device="cuda", dtype=BF16)
        n = tokens * k
        for tiling in ("tensor", "row", "1x128"):
            for transpose in (False, True):
                passes = 2 if tiling == "tensor" or (tiling == "row" and transpose) else 1
                scales = {"tensor": 1, "row": tokens + k * transpose,
                          "1x128": tokens * -(-k // 128) + transpose * k * -(-tokens // 128)}[tiling]
                label = tiling + ("+T" if transpose else "")
                nb = {label: passes * 2 * n + (1 + transpose) * n + 4 * scales}
                impls = {"kernel": {label: lambda x=x, t=tiling, tr=transpose: kernel(x, t, tr)},
                         "pytorch definition": {label: lambda x=x, t=tiling, tr=transpose: reference(x, t, tr)}}
                measure(rows, ceiling, "fp8_quant", impls, nb, rounds, tokens=tokens, hidden=k, dtype="bf16",
                        tiling=tiling, transpose=transpose, x_reads=passes)
        del x
        torch.cuda.empty_cache()
    # The transpose of a weight's FP8 codes (W^T for tensorwise / blockwise backward products).
    for shape in ((3584, 18944), (18944, 3584), (8192, 29568)):
        w = torch.randn(shape, device="cuda").to(torch.float8_e4m3fn)
        impls = {"kernel": {"transpose": lambda w=w: library.fp8_transpose(w)},
                 "torch transpose": {"transpose": lambda w=w: w.t().contiguous()}}
        measure(rows, ceiling, "fp8_transpose", impls, {"transpose": 2 * w.numel()}, rounds, weight=f"{shape[0]}x{shape[1]}",
                dtype="e4m3")
        del w


def bench_fp8_fused(rows, ceiling, rounds, tokens=8192, hidden=3584, ffn=18944):
    """A linear layer's FP8 operands (x along the features and x^T along the tokens) made by the op that
    makes x, x never written (library.rms_norm_fp8, swiglu_fp8), against the op's kernel then the
    quantisation kernel with the transpose, per activation tiling, at Qwen2-7B."""
    ext = extension.load()

    def quantized(y, tiling):
        return library.fp8_quantize_tensorwise(y, True) if tiling == "tensor" else library.fp8_quantize(y, tiling, True)

    def codes_bytes(k, tiling):  # both codes and the scales
        scales = {"tensor": 1, "row": tokens + k,
                  "1x128": tokens * -(-k // 128) + k * -(-tokens // 128)}[tiling]
        return 2 * tokens * k + 4 * scales

    x = torch.randn(tokens, hidden, device="cuda", dtype=BF16)
    res = torch.randn_like(x)
    w = torch.randn(hidden, device="cuda", dtype=BF16)
    gate_up = torch.randn(tokens, 2 * ffn, device="cuda", dtype=BF16)
    n, e = tokens * hidden, 2
    for tiling in ("tensor", "row", "1x128"):
        meta = dict(tokens=tokens, dtype="bf16", tiling=tiling)
        nb = {tiling: n * e + hidden * e + 4 * tokens + codes_bytes(hidden, tiling)}
        impls = {"kernel": {tiling: lambda t=tiling: library.rms_norm_fp8(x, None, w, 1e-6, t, tokens)},
                 "rms_norm + fp8_quantize": {
                     tiling: lambda t=tiling: quantized(ext.rms_norm_forward(x, None, w, 1e-6)[0], t)}}
        measure(rows, ceiling, "rms_norm_fp8", impls, nb, rounds, hidden=hidden, **meta)
        nb = {tiling: 3 * n * e + hidden * e + 4 * tokens + codes_bytes(hidden, tiling)}  # x, residual in; sum out
        impls = {"kernel": {tiling: lambda t=tiling: library.rms_norm_fp8(x, res, w, 1e-6, t, tokens)},
                 "add_rms_norm + fp8_quantize": {
                     tiling: lambda t=tiling: quantized(ext.rms_norm_forward(x, res, w, 1e-6)[0], t)}}
        measure(rows, ceiling, "add_rms_norm_fp8", impls, nb, rounds, hidden=hidden, **meta)
        nb = {tiling: 2 * tokens * ffn * e + codes_bytes(ffn, tiling)}
        impls = {"kernel": {tiling: lambda t=tiling: library.swiglu_fp8(gate_up, t, tokens)},
                 "swiglu + fp8_quantize": {tiling: lambda t=tiling: quantized(ext.swiglu_forward(gate_up), t)}}
        measure(rows, ceiling, "swiglu_fp8", impls, nb, rounds, hidden=ffn, **meta)


def _attention_flops(doc_lengths, hq, d, causal=True):
    """Matmul FLOPs of one forward: 2 products of 2 * q * k * d over the visible (query, key) pairs."""
    pairs = sum(n * (n + 1) // 2 if causal else n * n for row in doc_lengths for n in row)
    return 4 * hq * d * pairs


def bench_attention(rows, mm_ceiling, rounds, b=1):
    """Causal GQA attention (bf16, head_dim 128) at Qwen2-7B (28 / 4 heads) and Qwen2-72B (64 / 8)
    heads, s 4096 / 8192, and one packed-documents shape; ours (and on Hopper ours_sm90), the door,
    SDPA backends, flash-attn; on Hopper also the two backward kernels alone ("bwd"). Every row is GPU
    time (graph_of) where the call can be captured; "f+b host" is forward + backward as eager calls."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F

    from megatron_qwen2.ops.attention import backend_reason, document_ranges, hopper_kernel_available, packed_documents

    fa = None
    try:
        from flash_attn import flash_attn_func as fa
    except Exception:  # noqa: BLE001 - not installed on the machine: the row is simply absent
        pass
    sm90 = hopper_kernel_available()
    # (seq, heads, kv heads, head_dim, documents): Qwen2-7B and -72B heads at head_dim 128, Qwen2-0.5B's at 64
    shapes = [(4096, 28, 4, 128, None), (8192, 28, 4, 128, None), (4096, 64, 8, 128, None), (8192, 64, 8, 128, None),
              (8192, 28, 4, 128, "packed"), (8192, 64, 8, 128, "packed"), (8192, 14, 2, 64, None),
              (8192, 14, 2, 64, "packed")]
    gen = torch.Generator().manual_seed(0)
    for s, hq, hkv, d, docs in shapes:
        g = hq // hkv
        # the model's layout: q, k, v as [b, s, heads, d] views of [s, b, ...] buffers
        qkv = torch.randn(s, b, hkv, g + 2, d, device="cuda", dtype=BF16)
        q = qkv[:, :, :, :g].reshape(s, b, hq, d).transpose(0, 1).detach().requires_grad_(True)
        k = qkv[:, :, :, g].transpose(0, 1).detach().requires_grad_(True)
        v = qkv[:, :, :, g + 1].transpose(0, 1).detach().requires_grad_(True)
        do = torch.randn(b, s, hq, d, device="cuda", dtype=BF16)
        ids, lengths = None, [[s]] * b
        if docs == "packed":  # documents of 1 to 4096 tokens (mean ~1.5k), as packed pretraining rows
            lengths = []
            for _ in range(b):
                row, left = [], s
                while left > 0:
                    n = min(left, int(torch.randint(1, 4096, (1,), generator=gen)))
                    row.append(n)
                    left -= n
                lengths.append(row)
            ids = torch.stack([torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r)) for r in lengths]).cuda()
        ranges = document_ranges(ids) if ids is not None else (None,) * 4
        flops_fwd = _attention_flops(lengths, hq, d)
        fl = {"fwd": flops_fwd, "bwd": 2.5 * flops_fwd, "f+b": 3.5 * flops_fwd, "f+b host": 3.5 * flops_fwd}
        scale = d ** -0.5

        def sdpa(be, expand):
            def run():
                kk, vv = (k.repeat_interleave(g, 2), v.repeat_interleave(g, 2)) if expand else (k, v)
                with sdpa_kernel([be]):
                    return F.scaled_dot_product_attention(q.transpose(1, 2), kk.transpose(1, 2), vv.transpose(1, 2),
                                                          is_causal=True, enable_gqa=not expand).transpose(1, 2)
            return run

        cands = {"ours": lambda: library.flash_attention(q, k, v, True, scale, *ranges)[0]}
        if sm90:  # the Hopper forward and backward
            cands["ours_sm90"] = lambda: library.flash_attention_sm90(q, k, v, True, scale, *ranges)[0]
        packed = packed_documents(ids)  # as the model passes them: the ranges made once per batch
        cands["door"] = lambda: ops.attention(q, k, v, causal=True, document_ids=packed)
        if docs is None:
            cands["sdpa-cudnn(gqa)"] = sdpa(SDPBackend.CUDNN_ATTENTION, False)
            cands["sdpa-cudnn(kv repeated)"] = sdpa(SDPBackend.CUDNN_ATTENTION, True)
            cands["sdpa-flash(kv repeated)"] = sdpa(SDPBackend.FLASH_ATTENTION, True)
            if fa is not None:
                cands["flash_attn"] = lambda: fa(q, k, v, causal=True)
        else:
            cands["sdpa dense mask (before)"] = lambda: reference.attention(q, k, v, True, None, ids)
        def record(name, label, call, how="graph"):
            try:
                picked = None  # the door's choice in this grad mode, with its reason
                with torch.enable_grad() if label.startswith("f+b") else torch.no_grad():
                    if name == "door":
                        picked = backend_reason(q, k, v, True, ids)
                        name = f"door({picked.split(':')[0]})"
                    replay = None
                    if how == "graph":  # GPU time, as graph_of says
                        try:
                            replay = graph_of(call, reps=ATTENTION_REPS)
                        except RuntimeError:  # a call that waits on the host cannot be captured: timed eagerly
                            torch.cuda.synchronize()
                            how = "eager"
                    if replay is not None:
                        ms_rounds = [time_ms(replay, warmup=1, iters=3) / ATTENTION_REPS for _ in range(rounds)]
                    else:
                        ms_rounds = [time_ms(call, warmup=3, iters=10) for _ in range(rounds)]
            except Exception as e:  # noqa: BLE001 - a backend that rejects the inputs is a result
                rows.append(dict(kernel="attention", impl=name, pass_=label, seq=s, heads=hq, kv_heads=hkv,
                                 error=f"{type(e).__name__}: {str(e)[:160]}"))
                return
            ms = min(ms_rounds)
            tf = fl[label] / ms / 1e9
            rows.append(dict(kernel="attention", impl=name, pass_=label, timing=how, ms=ms, ms_rounds=ms_rounds, flops=fl[label],
                             tflops=tf, fraction_of_matmul=tf / mm_ceiling, seq=s, batch=b, heads=hq, kv_heads=hkv,
                             head_dim=d, dtype="bf16", documents=None if docs is None else lengths,
                             door_backend=picked))

        for name, fn in cands.items():
            record(name, "fwd", lambda fn=fn: fn().detach())
            record(name, "f+b", _grad(fn, (q, k, v), (do,)))
            record(name, "f+b host", _grad(fn, (q, k, v), (do,)), how="eager")  # with the host's latency
        if sm90:  # the two backward kernels alone, from the same out and lse
            with torch.no_grad():
                out, lse = library.flash_attention(q, k, v, True, scale, *ranges)
            qd, kd, vd = q.detach(), k.detach(), v.detach()
            for name, bwd in (("ours", library.flash_attention_backward),
                              ("ours_sm90", library.flash_attention_backward_sm90)):
                record(name, "bwd", lambda bwd=bwd: bwd(do, qd, kd, vd, out, lse, None, True, scale, *ranges[2:])[0])
            del out, lse
        del q, k, v, do, qkv
        torch.cuda.empty_cache()


def sanitize() -> None:
    """Every kernel path once on small inputs (vector and scalar paths), for compute-sanitizer."""
    torch.manual_seed(0)
    for dtype in (torch.float32, BF16):
        for h in (24, 100, 896):
            x = torch.randn(5, h, device="cuda", dtype=dtype, requires_grad=True)
            r = torch.randn(5, h, device="cuda", dtype=dtype, requires_grad=True)
            w = torch.randn(h, device="cuda", dtype=dtype, requires_grad=True)
            y, s = ops.add_rms_norm(x, r, w, 1e-6)
            (y.sum() + s.sum() + ops.rms_norm(x, w, 1e-6).sum()).backward()
            p, rm, _ = ops.permute(x, torch.randint(0, 7, (5, 3), device="cuda"), 7)
            pr = torch.rand(5, 3, device="cuda", requires_grad=True)
            (ops.unpermute(p * 1.5, rm, pr).sum()).backward()
            lg = torch.randn(3, h + 1, device="cuda", dtype=dtype, requires_grad=True)
            ops.cross_entropy(lg, torch.randint(0, h + 1, (3,), device="cuda")).sum().backward()
            sw = torch.randn(3, 2 * h, device="cuda", dtype=dtype, requires_grad=True)
            ops.swiglu(sw).sum().backward()
        for d in (6, 128):
            qkv = torch.randn(7, 2, 3, 4, d, device="cuda", dtype=dtype, requires_grad=True)
            cos, sin = torch.rand(7, 2, 1, d, device="cuda", dtype=dtype), torch.rand(7, 2, 1, d, device="cuda", dtype=dtype)
            (ops.rope(qkv[:, :, :, :2].reshape(7, 2, 6, d), cos, sin).sum() + ops.rope(qkv[:, :, :, 2], cos, sin).sum()).backward()
        if dtype == BF16:
            from megatron_qwen2.ops.attention import document_ranges, hopper_kernel_available

            for d, hq, hkv, n in ((64, 4, 2, 77), (128, 7, 1, 130), (128, 2, 2, 65)):
                qkv = torch.randn(n, 2, hkv, hq // hkv + 2, d, device="cuda", dtype=dtype)
                q = qkv[:, :, :, : hq // hkv].reshape(n, 2, hq, d).transpose(0, 1).requires_grad_(True)
                k = qkv[:, :, :, -2].transpose(0, 1).detach().requires_grad_(True)
                v = qkv[:, :, :, -1].transpose(0, 1).detach().requires_grad_(True)
                ids = torch.randint(0, 5, (2, n), device="cuda").sort(dim=1).values
                kernels = (library.flash_attention, library.flash_attention_sm90) if hopper_kernel_available() \
                    else (library.flash_attention,)
                for ranges in ((None,) * 4, document_ranges(ids)):
                    for kernel in kernels:
                        out, lse = kernel(q, k, v, True, d ** -0.5, *ranges)
                        (out.float().sum() + lse.sum()).backward()
        for shape in ((5, 3), (130, 264), (3, 40000)):  # element-wise and vector paths, both row paths
            xq = torch.randn(*shape, device="cuda", dtype=dtype)
            for transpose in (False, True):
                library.fp8_quantize_tensorwise(xq, transpose)
                for tiling in ("row", "1x128"):
                    library.fp8_quantize(xq, tiling, transpose)
        # The fused quantisation: RMSNorm's register path (128 and 256 threads) and its composed paths,
        # SwiGLU's 8-element rows and its composed path; rows padded.
        for h in (24, 1000, 3000, 12000):
            xn = torch.randn(37, h, device="cuda", dtype=dtype)
            wn = torch.randn(h, device="cuda", dtype=dtype)
            for tiling in ("tensor", "row", "1x128"):
                library.rms_norm_fp8(xn, None, wn, 1e-6, tiling, 48)
                library.rms_norm_fp8(xn, torch.randn_like(xn), wn, 1e-6, tiling, 128)
                library.swiglu_fp8(torch.randn(37, 2 * (h // 2 + 2), device="cuda", dtype=dtype), tiling, 48)
    torch.cuda.synchronize()
    print("sanitize: all kernel paths ran")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None, help="directory for the JSON result (default bench/results)")
    parser.add_argument("--commit", default=None)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--only", nargs="+",
                        default=["rms_norm", "permute", "rope", "cross_entropy", "fp8_quant", "fp8_fused", "attention"])
    parser.add_argument("--sanitize", action="store_true")
    parser.add_argument("--kernel-only", action="store_true", help="skip the eager and torch.compile baselines")
    args = parser.parse_args()
    global KERNEL_ONLY
    KERNEL_ONLY = args.kernel_only
    if extension.load() is None or not torch.cuda.is_available():
        raise SystemExit("needs CUDA and megatron_qwen2._C (pip install --no-build-isolation -e .)")
    if args.sanitize:
        return sanitize()
    ceiling = copy_bandwidth_gbs()
    mm = matmul_ceiling_tflops()
    rows: list[dict] = []
    for name in args.only:
        print(f"... {name}", flush=True)
        if name == "attention":
            bench_attention(rows, mm, args.rounds)
        else:
            globals()[f"bench_{name}"](rows, ceiling, args.rounds)
        torch.cuda.empty_cache()
    name = "kernels_attention" if args.only == ["attention"] else "kernels"
    path = write_result(name, {"copy_ceiling_gb_per_s": ceiling, "matmul_ceiling_tflops": mm, "rows": rows},
                        args.out, args.commit)
    print(f"\n{torch.cuda.get_device_name()}  torch {torch.__version__}  CUDA {torch.version.cuda}")
    print(f"copy ceiling {ceiling:.0f} GB/s (read + write), bf16 matmul {mm:.0f} TFLOP/s")
    for line in sorted({r["door_backend"] for r in rows if r.get("door_backend")}):
        print(f"ops.attention picks {line}")
    print(f"{'kernel':<14}{'shape':<17}{'pass':<10}{'impl':<28}{'ms':>8}{'spread':>7}{'rate':>9}{'%ceil':>7}")
    for r in rows:
        shape = "/".join(str(r[key]) for key in ("tokens", "hidden", "weight", "seq", "heads", "kv_heads", "vocab_shard") if key in r)
        if r.get("documents"):
            shape += "/docs"
        if "error" in r:
            print(f"{r['kernel']:<14}{shape:<17}{r['pass_']:<10}{r['impl']:<28}  {r['error'][:60]}")
            continue
        spread = max(r["ms_rounds"]) - min(r["ms_rounds"])
        if r["kernel"] == "attention":
            rate, frac = f"{r['tflops']:.0f}TF", r["fraction_of_matmul"]
        else:
            rate, frac = f"{r['gb_per_s']:.0f}", r["fraction_of_copy"]
        print(f"{r['kernel'][:13]:<14}{shape:<17}{r['pass_']:<10}{r['impl'][:27]:<28}{r['ms']:>8.3f}{spread:>7.3f}{rate:>9}"
              f"{100 * frac:>6.1f}%")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
