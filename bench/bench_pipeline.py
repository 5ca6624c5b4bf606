"""Pipeline-parallel training steps of a Qwen2-7B-shaped model of reduced depth, on N GPUs.

    torchrun --nproc-per-node N bench/bench_pipeline.py [--layers 8] [--micro 8] [--seq 4096] [--out DIR]

All N ranks form one pipeline (pp = N, dp = tp = 1). For 1F1B and interleaved (vpp 2) it
reports the step time, tokens/s, MFU, and the measured bubble: 1 - m * t_stage / t_schedule,
where t_stage is the slowest rank's forward + backward of one micro-batch measured alone
(no pipeline) and t_schedule the time of the schedule itself (the step without gradient
reduction and optimizer), next to the textbook (pp - 1) / (vpp m + pp - 1).
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
from megatron_qwen2.engine.pipeline import PipelineRunner, build_model_chunks  # noqa: E402
from megatron_qwen2.engine.schedule import textbook_bubble_fraction  # noqa: E402
from megatron_qwen2.model.flops import training_flops_per_token  # noqa: E402
from megatron_qwen2.parallel import Topology  # noqa: E402


def stage_time_ms(runner: PipelineRunner, chunks, cfg: ModelConfig, seq: int) -> float:
    """Forward + backward of one micro-batch through this rank's chunks, without the pipeline."""
    ids = torch.randint(0, cfg.vocab_size, (1, seq + 1), device="cuda")
    pos = torch.arange(seq, device="cuda").expand(1, -1)

    def once():
        for c, chunk in enumerate(chunks):
            stage = runner._stage(c)
            x = ids[:, :-1] if stage == 0 else torch.randn(seq, 1, cfg.hidden_size, device="cuda",
                                                             dtype=torch.bfloat16, requires_grad=True)
            sums = None
            out = chunk.forward_stage(x, pos, ids[:, 1:] if stage == runner.last_stage else None, sums)
            if stage == runner.last_stage:
                out.token_loss.mean().backward()
            else:
                out[0].backward(torch.ones_like(out[0]))

    for _ in range(3):
        once()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(5):
        once()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / 5 * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--micro", type=int, default=8)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--layout", default=None, help="pp_layout for vpp 1, e.g. 5,3")
    parser.add_argument("--layout-vpp2", default=None, help="pp_layout for vpp 2, e.g. 3,2,2,1")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl")
    world, rank = dist.get_world_size(), dist.get_rank()
    cfg = ModelConfig(name="qwen2_7b_shape", hidden_size=3584, num_layers=args.layers, num_attention_heads=28,
                      num_kv_heads=4, ffn_hidden_size=18944, vocab_size=152064, tie_word_embeddings=False,
                      max_position_embeddings=32768)
    rows = []
    for vpp in (1, 2):
        layout = args.layout if vpp == 1 else args.layout_vpp2
        par = ParallelConfig(pp=world, vpp=vpp, pp_layout=[int(n) for n in layout.split(",")] if layout else None)
        topo = Topology.build(par, world, rank)
        with torch.device("cuda"):
            chunks = build_model_chunks(cfg, par, topo)
        for chunk in chunks:
            chunk.to(torch.bfloat16)
        params = [p for c in chunks for p in c.parameters()]
        grads = GradBuffer(params, GradientReductions.of(topo))
        opt = MixedPrecisionOptimizer(grads, OptimConfig(lr=1e-4, warmup_steps=0))
        runner = PipelineRunner(chunks, cfg, topo, 1, args.seq, torch.bfloat16, torch.device("cuda"))
        batch = torch.randint(0, cfg.vocab_size, (args.micro, args.seq + 1), device="cuda")

        pipe_ms = []

        def step():
            grads.start_step(args.micro)
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            runner.run(list(batch.split(1)), 1.0 / args.micro, 0.0)
            end.record()
            grads.finish()
            opt.step(1e-4)
            pipe_ms.append((begin, end))

        for _ in range(2):
            step()
        torch.cuda.synchronize()
        dist.barrier()
        start = time.perf_counter()
        for _ in range(4):
            step()
        torch.cuda.synchronize()
        step_s = (time.perf_counter() - start) / 4
        # The schedule alone (forwards, backwards, p2p), without gradient reduction and optimizer.
        pipe_s = torch.tensor(sum(b.elapsed_time(e) for b, e in pipe_ms[-4:]) / 4 / 1e3, device="cuda")
        dist.all_reduce(pipe_s, op=dist.ReduceOp.MAX)
        grads.start_step(1)
        t_stage = torch.tensor(stage_time_ms(runner, chunks, cfg, args.seq), device="cuda")
        dist.all_reduce(t_stage, op=dist.ReduceOp.MAX)
        grads.start_step(1)
        tokens = args.micro * args.seq
        tflops = training_flops_per_token(cfg, args.seq) * tokens / step_s / world / 1e12
        rows.append(dict(pp=world, vpp=vpp, pp_layout=layout or "even", micro_batches=args.micro, step_s=step_s, tokens_per_s=tokens / step_s,
                         tflops_per_gpu=tflops, mfu_vs_spec=tflops / SPEC_PEAK_TFLOPS,
                         stage_fwd_bwd_ms=float(t_stage),
                         schedule_s=float(pipe_s),
                         bubble_measured=1 - args.micro * float(t_stage) / 1e3 / float(pipe_s),
                         bubble_textbook=textbook_bubble_fraction(world, vpp, args.micro),
                         max_memory_gb=torch.cuda.max_memory_allocated() / 1e9))
    ceiling = matmul_ceiling_tflops()
    if rank == 0:
        for row in rows:
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        print(f"matmul ceiling {ceiling:.0f} TFLOP/s")
        print(f"wrote {write_result(f'pipeline_pp{world}' + ('_layout' if args.layout else '') + f'_m{args.micro}', dict(layers=args.layers, seq=args.seq, rows=rows, matmul_ceiling_tflops=ceiling), args.out)}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
