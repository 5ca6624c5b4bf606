"""One training step of a Qwen2-72B-shaped slice under tensor (+ sequence) parallelism.

    torchrun --nproc-per-node N bench/bench_tp_step.py [--layers 4] [--seq 4096] [--micro 4] [--out DIR]

All N ranks form one tp group (dp = 1). Reports tokens/s, model FLOP utilisation (MFU, model
FLOPs only: no recomputation), the GPU time spent in NCCL kernels (the tp collectives) from a
profiled step, and the measured bf16 matmul ceiling of the same GPU. Then checks in bf16 that
3 steps of a small model at this tp, and at dp = N with the distributed optimizer, give the
losses of one GPU (the tolerance is printed).
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
from megatron_qwen2.engine.tp_grads import sync_tp_grads  # noqa: E402
from megatron_qwen2.model import Qwen2Model  # noqa: E402
from megatron_qwen2.model.flops import training_flops_per_token  # noqa: E402
from megatron_qwen2.parallel import Topology  # noqa: E402

def build(cfg: ModelConfig, topo: Topology, seed: int = 0, distributed_optimizer: bool = False):
    with torch.device("cuda"):
        model = Qwen2Model(cfg, topo)
    model.init_weights(seed)
    model.to(torch.bfloat16)
    grads = GradBuffer(list(model.parameters()), GradientReductions.of(topo), shard=distributed_optimizer)
    opt = MixedPrecisionOptimizer(grads, OptimConfig(lr=1e-4, warmup_steps=0))
    return model, grads, opt


def train_step(model, grads, opt, topo, batch, micro: int) -> float:
    """One step on this dp rank's share of `batch` cut into `micro` micro-batches in all; mean loss."""
    mine = batch.chunk(topo.dp)[topo.dp_rank]
    total = torch.zeros((), device=batch.device)
    parts = mine.split(batch.shape[0] // micro)
    grads.start_step(len(parts))
    for mb in parts:
        loss = model(mb[:, :-1], labels=mb[:, 1:]).token_loss.mean()
        (loss / micro).backward()
        total += loss.detach()
    grads.finish()
    sync_tp_grads(model.parameters(), topo.groups.tp.pg)
    opt.step(1e-4)
    if topo.groups.dp.pg is not None:
        dist.all_reduce(total, group=topo.groups.dp.pg)
    return float(total) / micro


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--micro", type=int, default=4, help="micro-batches of one sequence per step")
    parser.add_argument("--sp", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local)
    dist.init_process_group("nccl")
    world, rank = dist.get_world_size(), dist.get_rank()
    topo = Topology.build(ParallelConfig(tp=world, sequence_parallel=bool(args.sp)), world, rank)
    cfg = ModelConfig(name="qwen2_72b_slice", hidden_size=8192, num_layers=args.layers, num_attention_heads=64,
                      num_kv_heads=8, ffn_hidden_size=29568, vocab_size=152064, max_position_embeddings=32768)
    model, grads, opt = build(cfg, topo)
    gen = torch.Generator(device="cuda").manual_seed(0)
    batch = torch.randint(0, cfg.vocab_size, (args.micro, args.seq + 1), device="cuda", generator=gen)
    for _ in range(2):  # warm-up
        train_step(model, grads, opt, topo, batch, args.micro)
    torch.cuda.synchronize()
    dist.barrier()
    steps = 5
    start = time.perf_counter()
    for _ in range(steps):
        train_step(model, grads, opt, topo, batch, args.micro)
    torch.cuda.synchronize()
    step_s = (time.perf_counter() - start) / steps
    tokens = args.micro * args.seq
    flops = training_flops_per_token(cfg, args.seq) * tokens
    achieved = flops / step_s / world / 1e12  # per GPU
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        train_step(model, grads, opt, topo, batch, args.micro)
        torch.cuda.synchronize()
    nccl_ms = sum(e.device_time_total for e in prof.key_averages() if "nccl" in e.key.lower()) / 1e3
    gpu_ms = sum(e.self_device_time_total for e in prof.key_averages()) / 1e3
    top = sorted(prof.key_averages(), key=lambda e: e.self_device_time_total, reverse=True)[:15]
    top_kernels = [(e.key[:90], round(e.self_device_time_total / 1e3, 2)) for e in top]
    ceiling = matmul_ceiling_tflops()
    mem_gb = torch.cuda.max_memory_allocated() / 1e9
    del model, grads, opt
    torch.cuda.empty_cache()

    # bf16 equivalence: a small model at this tp, and at dp = world with the distributed
    # optimizer, against the same model on one GPU.
    small = ModelConfig(hidden_size=256, num_layers=2, num_attention_heads=8, num_kv_heads=2, ffn_hidden_size=512,
                        vocab_size=1024)
    sb = torch.randint(0, small.vocab_size, (4, 129), device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
    single = Topology.single()
    dp_topo = Topology.build(ParallelConfig(tp=1), world, rank)
    runs = {"tp": (build(small, topo, seed=3), topo), "dp_distopt": (build(small, dp_topo, 3, True), dp_topo),
            "single": (build(small, single, seed=3), single)}
    losses = {name: [] for name in runs}
    for _ in range(3):
        for name, (parts, t) in runs.items():
            losses[name].append(train_step(*parts, t, sb, 4))
    max_rel = max(abs(a - b) / abs(b) for name in ("tp", "dp_distopt")
                  for a, b in zip(losses[name], losses["single"]))

    if rank == 0:
        row = dict(tp=world, sp=bool(args.sp), layers=args.layers, seq=args.seq, micro_batches=args.micro,
                   step_s=step_s, tokens_per_s=tokens / step_s, tflops_per_gpu=achieved,
                   mfu_vs_spec=achieved / SPEC_PEAK_TFLOPS, fraction_of_matmul_ceiling=achieved / ceiling,
                   matmul_ceiling_tflops=ceiling, nccl_ms_per_step=nccl_ms, gpu_kernel_ms_per_step=gpu_ms,
                   max_memory_gb=mem_gb, top_kernels_ms=top_kernels, bf16_losses=losses, bf16_max_rel_loss_diff=max_rel,
                   bf16_tolerance=2e-2)
        for k, v in row.items():
            print(f"{k:>28}: {v}")
        print(f"wrote {write_result(f'tp_step_tp{world}', row, args.out)}")
        if max_rel > 2e-2:
            raise SystemExit(f"bf16 losses at tp={world} or dp={world} differ from one GPU by {max_rel:.3g} (> 2e-2)")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
