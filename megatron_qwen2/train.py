"""Training entry point: `python -m megatron_qwen2.train model=tiny train.steps=200 ...`.

The loop and nothing else: build the model, data and optimizer from the config, then step.
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

import hydra
import torch
import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from megatron_qwen2.checkpoint import expected_native_shapes, save_native
from megatron_qwen2.config import Config, resolve_config
from megatron_qwen2.data import build_packed_dataset
from megatron_qwen2.logging import MetricsLogger
from megatron_qwen2.model import Qwen2Model
from megatron_qwen2.optimizer import learning_rate
from megatron_qwen2.parallel import Topology
from megatron_qwen2.parallel.distributed_optimizer import MixedPrecisionOptimizer
from megatron_qwen2.parallel.grad_buffer import GradBuffer
from megatron_qwen2.parallel.launch import init_distributed
from megatron_qwen2.parallel.pipeline import PipelineRunner, build_model_chunks
from megatron_qwen2.parallel.schedule import check_microbatches
from megatron_qwen2.parallel.layers import gather_full
from megatron_qwen2.parallel.tp_grads import sync_tp_grads


def _check_supported(cfg: Config) -> None:
    p = cfg.parallel
    if max(p.cp, p.ep) > 1:
        raise ValueError(f"parallel.cp={p.cp}, ep={p.ep}: this training loop runs tensor, sequence, pipeline "
                         "and data parallelism; context and expert degrees must be 1")


def train(cfg: Config, run_dir: Path) -> dict:
    """Run cfg.train.steps optimizer steps; returns the final metrics (on every rank)."""
    _check_supported(cfg)
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda but no CUDA device is available; use device=cpu")
    world_size, rank = init_distributed(cfg.device)
    cfg.validate(world_size)
    topo = Topology.build(cfg.parallel, world_size, rank)
    device = torch.device(cfg.device, torch.cuda.current_device()) if cfg.device == "cuda" else torch.device("cpu")
    dtype = torch.bfloat16 if cfg.train.dtype == "bf16" else torch.float32
    t = cfg.train
    torch.manual_seed(t.seed)

    dataset = build_packed_dataset(cfg.data, t.seq_length, t.seed)
    if dataset.vocab_size > cfg.model.vocab_size:
        raise ValueError(f"the tokenizer has {dataset.vocab_size} tokens but model.vocab_size="
                         f"{cfg.model.vocab_size}; pick a larger model.vocab_size or another tokenizer")
    chunks = build_model_chunks(cfg.model, cfg.parallel, topo)
    for chunk in chunks:
        chunk.init_weights(t.seed)
        chunk.to(device=device, dtype=dtype)
    params = [p for chunk in chunks for p in chunk.parameters()]
    tied = [p for chunk in chunks for n, p in chunk.named_parameters() if n == "embedding.weight"
            and cfg.model.tie_word_embeddings and topo.pp > 1]
    grads = GradBuffer(params, topo.group("dp"), bucket_size=cfg.parallel.bucket_size,
                       shard=cfg.parallel.distributed_optimizer, overlap=cfg.parallel.overlap_grad_reduce,
                       deferred=tied)
    optimizer = MixedPrecisionOptimizer(grads, cfg.optim, topo.group("tp"), norm_groups=[topo.group("mp")])
    runner = PipelineRunner(chunks, cfg.model, topo, t.micro_batch_size, t.seq_length, dtype, device)

    total_micro = t.global_batch_size // t.micro_batch_size  # over all dp ranks
    local_samples = t.global_batch_size // topo.dp
    check_microbatches(topo.pp, topo.vpp, total_micro // topo.dp)
    is_logger = rank == 0
    logger = MetricsLogger(run_dir, cfg.wandb, OmegaConf.to_container(OmegaConf.structured(cfg)),
                           log_interval=t.log_interval) if is_logger else None
    if is_logger:
        print(f"model {cfg.model.name}: {count_parameters(cfg.model) / 1e6:.2f}M parameters; {len(dataset)} samples "
              f"of {t.seq_length} tokens per epoch; tp={topo.tp} pp={topo.pp} vpp={topo.vpp} dp={topo.dp} "
              f"sp={topo.sequence_parallel}; run dir {run_dir}", flush=True)

    metrics: dict = {}
    for step in range(t.steps):
        start = time.perf_counter()
        lr = learning_rate(step, cfg.optim, t.steps)
        batch = dataset.global_batch(step, t.global_batch_size)  # [gbs, s+1], the same in every layout
        batch = batch[topo.dp_rank * local_samples:(topo.dp_rank + 1) * local_samples].to(device)
        micro = list(batch.split(t.micro_batch_size))
        grads.start_step(len(micro))
        # Every micro-batch of the global batch weighs 1/total_micro, whichever rank runs it.
        result = runner.run(micro, loss_scale=1.0 / total_micro, aux_coef=cfg.model.aux_loss_coef)
        grads.finish(before_deferred=lambda ps: sum_tied_embedding_grads(ps, topo))
        sync_tp_grads(params, topo.group("tp"))
        grad_norm = optimizer.step(lr)
        # Only the last pipeline stage saw the losses; sum over stages and data-parallel ranks.
        sums = torch.stack([result.loss_sum, result.aux_sum]).cpu()
        for group in (topo.group("pp"), topo.group("dp")):
            if group is not None:
                dist.all_reduce(sums, group=group)
        elapsed = time.perf_counter() - start
        metrics = {
            "step": step + 1,
            "loss": sums[0].item() / total_micro,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_s": t.global_batch_size * t.seq_length / elapsed,
            "step_time_s": elapsed,
        }
        if cfg.model.is_moe:
            metrics["aux_loss"] = sums[1].item() / total_micro
        if logger is not None:
            logger.log(metrics)
        if t.save_interval and (step + 1) % t.save_interval == 0 and step + 1 != t.steps:
            save_checkpoint(chunks, cfg, topo, run_dir, step + 1)
    save_checkpoint(chunks, cfg, topo, run_dir, t.steps)
    if logger is not None:
        logger.close(summary=metrics)
    return metrics


def sum_tied_embedding_grads(params: list[torch.nn.Parameter], topo: Topology) -> None:
    """First and last stage each hold the tied embedding: give both the sum of their gradients."""
    group = topo.group("embedding")
    if group is not None:
        for p in params:
            dist.all_reduce(p.main_grad, group=group)


def count_parameters(cfg) -> int:
    return sum(math.prod(shape) for shape in expected_native_shapes(cfg).values())


def save_checkpoint(chunks: list[Qwen2Model], cfg: Config, topo: Topology, run_dir: Path, step: int) -> None:
    """Write run_dir/checkpoints/step_N (atomically, full unsharded tensors), then move `latest`.

    Every stage reassembles its tensors over tp and sends them to rank 0, which writes them all.
    """
    state = {name: gather_full(p, p.detach(), topo.group("tp")).cpu()
             for chunk in chunks for name, p in chunk.named_parameters() if not getattr(p, "pipeline_copy", False)}
    if topo.world_size > 1:
        mine = state if topo.tp_rank == 0 and topo.dp_rank == 0 else {}
        parts = [None] * topo.world_size if topo.rank == 0 else None
        dist.gather_object(mine, parts, dst=0)
        if topo.rank == 0:
            state = {k: v for part in parts for k, v in part.items()}
    if topo.rank == 0:
        ckpt_root = run_dir / "checkpoints"
        name = f"step_{step:06d}"
        save_native(state, cfg.model, ckpt_root / name, overwrite=True)
        tmp = ckpt_root / f".latest.tmp-{os.getpid()}"
        tmp.write_text(name + "\n")
        os.replace(tmp, ckpt_root / "latest")
    if dist.is_initialized():
        dist.barrier()


@hydra.main(version_base=None, config_path="../conf", config_name="config")
def main(dcfg: DictConfig) -> None:
    try:
        cfg = resolve_config(dcfg)
    except (ValueError, OmegaConfBaseException) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if int(os.environ.get("RANK", "0")) == 0:
        OmegaConf.save(OmegaConf.structured(cfg), run_dir / "config.yaml")
    try:
        train(cfg, run_dir)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
