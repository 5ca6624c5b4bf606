"""The MoE layer of Qwen2-57B-A14B under expert parallelism, and a training step of a 2-layer slice.

    torchrun --nproc-per-node N bench/bench_moe.py [--seq 4096] [--micro 2] [--out DIR]

All N ranks form one ep group (ep = dp = N; attention data-parallel). Full width: hidden 3584,
64 experts of FFN 2560, top-8, shared expert 20480. Measured, per GPU, in one run:

- the MoE block (router, dispatch, all-to-all, grouped expert GEMM, combine, shared expert),
  forward + backward on this rank's tokens: time, TFLOP/s on active FLOPs, MFU (989 TFLOP/s spec),
  and the GPU time of its NCCL kernels (the all-to-alls, waiting on the peer included);
- a dense SwiGLU MLP with the same active FLOPs (FFN = top_k * 2560 + 20480 = 40960) on the same
  tokens: the baseline; the ratio of the two MFUs is the figure of merit (target >= 0.5);
- the expert GEMMs alone (gate_up + down, forward + backward) on the rows a real dispatch gives:
  TFLOP/s with `torch._grouped_mm` and with the loop over experts;
- a training step of the 2-layer slice (embedding, 2 MoE layers, head; distributed optimizer):
  tokens/s and MFU on active parameters (model FLOPs, no recomputation);
- the bf16 matmul ceiling of the same GPU; the ep block against the same experts on one GPU.

`--device cpu --tiny` runs the same code on gloo with a tiny model (a smoke test).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import SPEC_PEAK_TFLOPS, matmul_ceiling_tflops, write_result  # noqa: E402
from megatron_qwen2.config import ModelConfig, OptimConfig, ParallelConfig  # noqa: E402
from megatron_qwen2.engine.distributed_optimizer import MixedPrecisionOptimizer  # noqa: E402
from megatron_qwen2.engine.grad_buffer import GradBuffer  # noqa: E402
from megatron_qwen2.engine.reductions import GradientReductions  # noqa: E402
from megatron_qwen2.model import Qwen2Model  # noqa: E402
from megatron_qwen2.model import moe  # noqa: E402
from megatron_qwen2.model.flops import training_flops_per_token  # noqa: E402
from megatron_qwen2.model.mlp import MLP  # noqa: E402
from megatron_qwen2.parallel import Topology  # noqa: E402
from megatron_qwen2.parallel.expert_dispatch import gather_ep_full  # noqa: E402
from megatron_qwen2.parallel.shard import shard_of  # noqa: E402


def timed(fn, device, warmup: int = 2, iters: int = 5) -> float:
    """Median seconds of fn() (CUDA events on the GPU, wall clock on the CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def nccl_seconds(fn, device) -> tuple[float, list]:
    """GPU time of NCCL kernels in one fn() and the top kernels (CUDA only)."""
    if device.type != "cuda":
        return 0.0, []
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    avg = prof.key_averages()
    nccl = sum(e.self_device_time_total for e in avg if "nccl" in e.key.lower()) / 1e6
    top = sorted(avg, key=lambda e: e.self_device_time_total, reverse=True)[:12]
    return nccl, [(e.key[:80], round(e.self_device_time_total / 1e3, 3)) for e in top]


def init_(module, std=0.02, seed=0):
    g = torch.Generator(device=next(module.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, std, generator=g)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--micro", type=int, default=2, help="sequences per rank (the block's tokens: micro x seq)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--skip-step", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    for k, v in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"), ("NVSHMEM_DISABLE_NVLS", "1")):
        os.environ.setdefault(k, v)
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        dist.init_process_group("gloo")
        device = torch.device("cpu")
    world, rank = dist.get_world_size(), dist.get_rank()
    topo = Topology.build(ParallelConfig(ep=world), world, rank)
    if args.tiny:
        cfg = ModelConfig(name="tiny_moe", hidden_size=64, num_layers=2, num_attention_heads=4, num_kv_heads=2,
                          ffn_hidden_size=128, vocab_size=512, num_experts=8, moe_top_k=2, moe_ffn_hidden_size=32,
                          shared_expert_ffn_hidden_size=64)
    else:
        cfg = ModelConfig(name="qwen2_57b_a14b_slice", hidden_size=3584, num_layers=2, num_attention_heads=28,
                          num_kv_heads=4, ffn_hidden_size=18944, vocab_size=151936, max_position_embeddings=32768,
                          num_experts=64, moe_top_k=8, moe_ffn_hidden_size=2560, shared_expert_ffn_hidden_size=20480)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    h, k, f, fs = cfg.hidden_size, cfg.moe_top_k, cfg.moe_ffn_hidden_size, cfg.shared_expert_ffn_hidden_size
    tokens = args.micro * args.seq
    row: dict = dict(ep=world, dp=world, seq=args.seq, sequences_per_rank=args.micro, tokens_per_rank=tokens,
                     hidden=h, experts=cfg.num_experts, top_k=k, expert_ffn=f, shared_ffn=fs)

    def report():
        if rank == 0:
            for key, v in row.items():
                print(f"{key:>34}: {v}", flush=True)
            if device.type == "cuda":
                print(f"wrote {write_result(f'moe_ep{world}', row, args.out)}", flush=True)

    # grouped GEMM: does it run forward and backward here?
    row["grouped_mm_available"] = False
    if device.type == "cuda" and hasattr(torch, "_grouped_mm"):
        try:
            a = torch.randn(48, 64, device=device, dtype=dtype, requires_grad=True)
            w = torch.randn(3, 32, 64, device=device, dtype=dtype, requires_grad=True)
            y = moe.grouped_linear(a, w, [16, 0, 32])
            y.sum().backward()  # a broadcast gradient, as .sum() gives
            y = moe.grouped_linear(a, w, [16, 0, 32])
            y.backward(torch.randn_like(y))
            ref = torch.cat([a[:16] @ w[0].t(), a[16:48] @ w[2].t()])
            row["grouped_mm_available"] = bool(torch.allclose(y.float(), ref.float(), rtol=2e-2, atol=2e-2))
        except Exception as e:  # noqa: BLE001 - recorded, then the loop runs
            row["grouped_mm_error"] = repr(e)[:300]
    _grouped = moe._use_grouped_mm
    if not row["grouped_mm_available"]:
        moe._use_grouped_mm = lambda x: False

    # --- the MoE block vs a dense MLP of the same active FLOPs ---
    block = moe.MoEBlock(cfg, topo).to(device=device, dtype=dtype)
    init_(block, seed=1 + topo.ep_rank)  # each ep rank's experts differ; router etc. differ too (fine for timing)
    with torch.no_grad():  # router, gate and shared expert must be equal on every rank
        for name, p in block.named_parameters():
            if not shard_of(p).is_expert:
                dist.broadcast(p, src=0)
    gen = torch.Generator(device=device).manual_seed(10 + rank)
    x = torch.randn(args.seq, args.micro, h, device=device, dtype=dtype, generator=gen).requires_grad_()
    dy = torch.randn(args.seq, args.micro, h, device=device, dtype=dtype, generator=gen)

    def moe_fwd_bwd():
        out, _ = block(x)
        out.backward(dy)

    t_moe = timed(moe_fwd_bwd, device)
    nccl_moe, top_moe = nccl_seconds(moe_fwd_bwd, device)
    # Variants measured in the same run: no shared-expert overlap; the loop over experts.
    block.overlap_shared_expert = False
    row["moe_block_no_overlap_ms"] = timed(moe_fwd_bwd, device) * 1e3
    block.overlap_shared_expert = True
    if row["grouped_mm_available"]:
        moe._use_grouped_mm = lambda x: False
        row["moe_block_expert_loop_ms"] = timed(moe_fwd_bwd, device) * 1e3
        del moe._use_grouped_mm
        moe._use_grouped_mm = _grouped

    # The overlap must not change the numbers: gradients with and without it.
    def grads_of(overlap):
        block.overlap_shared_expert = overlap
        block.zero_grad()
        x.grad = None
        moe_fwd_bwd()
        return [p.grad.clone() for p in block.parameters()] + [x.grad.clone()]

    def max_diff(xs, ys):
        return max(((a.float() - b.float()).abs().max() / b.float().abs().max()).item() for a, b in zip(xs, ys))

    with_overlap, without, again = grads_of(True), grads_of(False), grads_of(False)
    block.overlap_shared_expert = True
    # Relative to each gradient's largest element; the second number is run-to-run noise without
    # the overlap (the reference permute's backward adds with atomics).
    row["overlap_vs_none_max_rel_grad_diff"] = max_diff(with_overlap, without)
    row["none_vs_none_max_rel_grad_diff"] = max_diff(again, without)
    del with_overlap, without, again

    # The link: an all-to-all of the dispatch's size (tokens * top_k rows of h, bf16), alone.
    buf = torch.randn(tokens * k, h, device=device, dtype=dtype)
    recv = torch.empty_like(buf)
    t_a2a = timed(lambda: dist.all_to_all_single(recv, buf), device)
    sent = buf.numel() * buf.element_size() * (world - 1) / world
    row.update(raw_all_to_all_ms=t_a2a * 1e3, raw_all_to_all_gbs_per_direction=sent / t_a2a / 1e9)
    buf = recv = None  # freed (not del: the timed lambda names them)
    active = 3 * (2 * 3 * h * (k * f + fs) + 2 * h * cfg.num_experts + 2 * h)  # fwd+bwd: experts, shared, router, gate
    moe_tflops = active * tokens / t_moe / 1e12
    with torch.no_grad():  # the expert load of one forward of the timed input
        loads = block(x.detach())[1].tokens_per_expert.float()
    row.update(moe_block_ms=t_moe * 1e3, moe_block_tflops=moe_tflops, moe_block_mfu=moe_tflops / SPEC_PEAK_TFLOPS,
               moe_all_to_all_ms=nccl_moe * 1e3, moe_all_to_all_fraction=nccl_moe / t_moe if t_moe else 0.0,
               moe_block_top_kernels_ms=top_moe,
               load_max_over_mean=(loads.max() / loads.mean()).item())

    dense = MLP(h, k * f + fs).to(device=device, dtype=dtype)
    init_(dense, seed=2)

    def dense_fwd_bwd():
        dense(x).backward(dy)

    t_dense = timed(dense_fwd_bwd, device)
    dense_flops = 3 * 2 * 3 * h * (k * f + fs)
    dense_tflops = dense_flops * tokens / t_dense / 1e12
    row.update(dense_same_active_ms=t_dense * 1e3, dense_same_active_tflops=dense_tflops,
               dense_same_active_mfu=dense_tflops / SPEC_PEAK_TFLOPS,
               moe_over_dense_mfu=(moe_tflops / dense_tflops))
    dense = None  # freed (not del: dense_fwd_bwd names it)

    # --- the expert GEMMs alone on the rows of a real dispatch ---
    with torch.no_grad():
        tok = x.detach().reshape(-1, h)
        weights, experts, _ = block.router(tok)
        rows, counts, _ = block.dispatcher.dispatch(tok, weights, experts)
    rows = rows.detach().requires_grad_()
    drows = torch.randn_like(rows)
    gemm_flops = 3 * 2 * rows.shape[0] * 3 * h * f

    def experts_fwd_bwd():
        block.experts(rows, counts).backward(drows)

    t_grouped = timed(experts_fwd_bwd, device)
    row.update(expert_rows=rows.shape[0], expert_rows_per_local_expert_min_max=[min(counts), max(counts)],
               expert_gemm_ms=t_grouped * 1e3, expert_gemm_tflops=gemm_flops / t_grouped / 1e12,
               expert_gemm_path="torch._grouped_mm" if row["grouped_mm_available"] else "loop over experts")
    if row["grouped_mm_available"]:
        saved = moe._use_grouped_mm
        moe._use_grouped_mm = lambda x: False
        t_loop = timed(experts_fwd_bwd, device)
        moe._use_grouped_mm = saved
        row.update(expert_gemm_loop_ms=t_loop * 1e3, expert_gemm_loop_tflops=gemm_flops / t_loop / 1e12)

    # --- the ep block against the same experts on one GPU (this rank's tokens) ---
    single = moe.MoEBlock(cfg, Topology.single()).to(device=device, dtype=dtype)
    with torch.no_grad():
        for (name, p), q in zip(block.named_parameters(), single.parameters()):
            q.copy_(gather_ep_full(p, p.detach(), topo.groups.ep.pg))
        out_ep, _ = block(x.detach())
        out_one, _ = single(x.detach())
    row["ep_vs_one_gpu_max_rel_diff"] = ((out_ep.float() - out_one.float()).abs().max()
                                         / out_one.float().abs().max()).item()
    single = block = rows = drows = x = dy = None  # freed (not del: the timed closures name them)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        row["matmul_ceiling_tflops"] = matmul_ceiling_tflops()
        row["moe_block_fraction_of_ceiling"] = moe_tflops / row["matmul_ceiling_tflops"]
    report()

    # --- a training step of the 2-layer slice ---
    if args.skip_step:
        return
    try:
        with torch.device(device):
            model = Qwen2Model(cfg, topo)
        model.init_weights(0)
        model.to(dtype)
        params = list(model.parameters())
        grads = GradBuffer(params, GradientReductions.of(topo), shard=True)
        opt = MixedPrecisionOptimizer(grads, OptimConfig(lr=1e-4, warmup_steps=0))
        batch = torch.randint(0, cfg.vocab_size, (args.micro, args.seq + 1), device=device,
                              generator=torch.Generator(device=device).manual_seed(100 + rank))

        def step():
            grads.start_step(args.micro)
            for mb in batch.split(1):
                out = model(mb[:, :-1], labels=mb[:, 1:])
                ((out.token_loss.mean() + cfg.aux_loss_coef * out.aux_loss) / (args.micro * world)).backward()
            grads.finish()
            opt.step(1e-4)

        t_step = timed(step, device, warmup=1, iters=3)
        nccl_step, top_step = nccl_seconds(step, device)
        step_flops = training_flops_per_token(cfg, args.seq) * tokens
        achieved = step_flops / t_step / 1e12
        row.update(step_s=t_step, step_tokens_per_s_per_gpu=tokens / t_step, step_tokens_per_s=world * tokens / t_step,
                   step_tflops_per_gpu=achieved, step_mfu_active=achieved / SPEC_PEAK_TFLOPS,
                   step_nccl_ms=nccl_step * 1e3, step_top_kernels_ms=top_step,
                   )
        if device.type == "cuda":
            row["max_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
    except Exception as e:  # noqa: BLE001 - the layer numbers above still count
        row["step_error"] = repr(e)[:500]
    report()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
