"""Training entry point: `python -m megatron_qwen2.train model=tiny train.steps=200 ...`.

The loop and nothing else: build the model, data and optimizer from the config, then step.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path

import hydra
import torch
import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from megatron_qwen2.checkpoint import expected_native_shapes, load_model_config, resolve_checkpoint_dir
from megatron_qwen2.checkpoint.distributed import (CheckpointError, CheckpointSaver, find_resume_checkpoint,
                                                   load_training_checkpoint)
from megatron_qwen2.config import Config, resolve_config
from megatron_qwen2.data import build_datasets
from megatron_qwen2.errors import EXIT_CONFIG, EXIT_NONFINITE, EXIT_PREEMPTED, NonFiniteError
from megatron_qwen2.logging import MetricsLogger, memory_metrics, peak_flops_per_device
from megatron_qwen2.model.flops import training_flops_per_token
from megatron_qwen2.optimizer import learning_rate
from megatron_qwen2.parallel import Topology
from megatron_qwen2.parallel.launch import init_distributed
from megatron_qwen2.step import TrainingStep
from megatron_qwen2.model.moe import moe_load_stats




class StopRequest:
    """SIGTERM / SIGUSR1 (Slurm preemption) set a flag; `agreed()` all-reduces it at a step boundary."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, device: torch.device):
        self.device = device
        self.signum: int | None = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "stop request"

    def agreed(self) -> bool:
        """True on every rank when any rank got a signal (one all-reduce of one number)."""
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return self.signum is not None
        flag = torch.tensor([0.0 if self.signum is None else float(self.signum)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0 and self.signum is None:
            self.signum = int(flag.item())
        return flag.item() > 0

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def train(cfg: Config, run_dir: Path, on_step_start=None) -> dict:
    """Run optimizer steps up to cfg.train.steps, resuming from run_dir/checkpoints when possible.

    Returns the last step's metrics (on every rank) with "status": "completed", or "preempted"
    after a SIGTERM/SIGUSR1 saved a checkpoint. on_step_start(step) is a hook for tests.
    """
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda but no CUDA device is available; use device=cpu")
    world_size, rank = init_distributed(cfg.device)
    cfg.validate(world_size)
    topo = Topology.build(cfg.parallel, world_size, rank)
    device = torch.device(cfg.device, torch.cuda.current_device()) if cfg.device == "cuda" else torch.device("cpu")
    t = cfg.train
    torch.manual_seed(t.seed)

    dataset, valid_dataset = build_datasets(cfg.data, t.seq_length, t.seed)  # valid: None unless data.split says
    if dataset.vocab_size > cfg.model.vocab_size:
        raise ValueError(f"the tokenizer has {dataset.vocab_size} tokens but model.vocab_size="
                         f"{cfg.model.vocab_size}; pick a larger model.vocab_size or another tokenizer")
    trainer = TrainingStep(cfg, topo, device)
    chunks, optimizer = trainer.chunks, trainer.optimizer
    is_logger = rank == 0
    logger = MetricsLogger(run_dir, cfg.wandb, OmegaConf.to_container(OmegaConf.structured(cfg)),
                           log_interval=t.log_interval, total_steps=t.steps) if is_logger else None
    say = logger.message if logger is not None else (lambda text: None)
    if is_logger:
        print(f"model {cfg.model.name}: {count_parameters(cfg.model) / 1e6:.2f}M parameters; {len(dataset)} samples "
              f"of {t.seq_length} tokens per epoch; tp={topo.tp} pp={topo.pp} vpp={topo.vpp} dp={topo.dp} "
              f"cp={topo.cp} sp={topo.sequence_parallel}; run dir {run_dir}", flush=True)

    ckpt_root = run_dir / "checkpoints"
    start_step = restore(cfg, ckpt_root, chunks, optimizer, topo, say)
    if start_step >= t.steps:
        say(f"the checkpoint is at step {start_step} >= train.steps={t.steps}: nothing to train")
        if logger is not None:
            logger.close()
        return {"step": start_step, "status": "completed"}
    flops_per_token = training_flops_per_token(cfg.model, t.seq_length)
    peak = peak_flops_per_device(device, t.peak_tflops)
    stop = StopRequest(device)
    saver = CheckpointSaver(t.async_save)

    def save(step_done: int, blocking: bool) -> None:
        began = time.perf_counter()
        saver.save(ckpt_root, step_done, chunks, optimizer, topo, cfg.model,
                   train_state={"consumed_samples": step_done * t.global_batch_size,
                                "consumed_tokens": step_done * t.global_batch_size * t.seq_length,
                                "scheduler_step": step_done},
                   run_config=dataclasses.asdict(cfg), keep_last=t.keep_last, blocking=blocking,
                   on_done=lambda path, secs: say(f"checkpoint {path.name} complete after {secs:.1f}s"))
        say(f"checkpoint step_{step_done:06d}; the loop waited {time.perf_counter() - began:.1f}s")

    metrics: dict = {}
    skipped_steps = 0
    for step in range(start_step, t.steps):
        if on_step_start is not None:
            on_step_start(step)
        start = time.perf_counter()
        lr = learning_rate(step, cfg.optim, t.steps)
        batch = dataset.global_batch(step, t.global_batch_size)  # Batch of [gbs, s+1] rows, the same in every layout
        outcome = trainer(batch, lr)
        skipped = outcome.skipped
        if skipped:
            text = (f"step {step + 1}: non-finite loss {outcome.loss} or grad norm {outcome.grad_norm}; "
                    f"the update was skipped")
            if t.on_nonfinite == "stop":
                stop.restore()
                if logger is not None:
                    logger.close()
                raise NonFiniteError(f"{text} and training stops (train.on_nonfinite=stop)")
            skipped_steps += 1
            say(f"warning: {text} (train.on_nonfinite=skip; {skipped_steps} skipped so far)")
        elapsed = time.perf_counter() - start
        metrics = {
            "step": step + 1,
            "loss": outcome.loss,
            "lr": lr,
            "grad_norm": outcome.grad_norm,
            "tokens_per_s": t.global_batch_size * t.seq_length / elapsed,
            "step_time_s": elapsed,
            "consumed_samples": (step + 1) * t.global_batch_size,
            "consumed_tokens": (step + 1) * t.global_batch_size * t.seq_length,
        }
        if skipped:
            metrics["skipped"] = True
        if peak is not None:
            achieved = flops_per_token * metrics["tokens_per_s"] / topo.world_size
            metrics["tflops_per_device"] = achieved / 1e12
            metrics["mfu"] = achieved / peak
        metrics.update(memory_metrics(device))
        if cfg.model.is_moe:
            metrics["aux_loss"] = outcome.aux_loss
            metrics.update(moe_load_stats(chunks, topo.group("dp_cp")))  # this stage's layers, whole batch
        if t.eval_interval and ((step + 1) % t.eval_interval == 0 or step + 1 == t.steps):
            val = evaluate(trainer, valid_dataset, cfg)
            if val is not None:
                metrics["val_loss"] = val
        if logger is not None:
            logger.log(metrics)
        if stop.agreed():  # every rank saw the same flag: all save, all leave
            save(step + 1, blocking=True)
            say(f"{stop.name} received: saved checkpoint step_{step + 1:06d} at the step boundary; "
                f"exiting with code {EXIT_PREEMPTED}")
            stop.restore()
            if logger is not None:
                logger.close(summary=metrics)
            return dict(metrics, status="preempted")
        if (t.save_interval and (step + 1) % t.save_interval == 0) or step + 1 == t.steps:
            save(step + 1, blocking=step + 1 == t.steps)
    saver.wait()
    stop.restore()
    if logger is not None:
        logger.close(summary=metrics)
    return dict(metrics, status="completed")


def count_parameters(cfg) -> int:
    return sum(math.prod(shape) for shape in expected_native_shapes(cfg).values())


def restore(cfg: Config, ckpt_root: Path, chunks, optimizer, topo: Topology, say) -> int:
    """Resume from the newest usable checkpoint in ckpt_root (returns its step), else load the
    weights of train.init_from (fresh optimizer) and return 0. Every rank calls it."""
    t = cfg.train
    found = None
    if t.resume:
        # Rank 0 decides (found, or why none can be used); every rank then loads the same one.
        decision = [None, None]
        if topo.rank == 0:
            found = find_resume_checkpoint(ckpt_root, log=say)
            if found is None and any(ckpt_root.glob("step_*")):
                decision[1] = (f"{ckpt_root} holds checkpoints but none is usable (reasons above); move them "
                               f"away or set train.resume=false to start afresh")
            decision[0] = None if found is None else str(found)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast_object_list(decision, src=0)
        if decision[1] is not None:
            raise CheckpointError(decision[1])
        found = None if decision[0] is None else Path(decision[0])
    if found is not None:
        began = time.perf_counter()
        state = load_training_checkpoint(found, chunks, optimizer, topo)
        step = int(state["step"])
        if state.get("consumed_samples") != step * t.global_batch_size:
            raise CheckpointError(f"{found} consumed {state.get('consumed_samples')} samples in {step} steps, which is "
                                  f"not {step} x train.global_batch_size={t.global_batch_size}; resume with the "
                                  f"global batch size it was saved with")
        lay = state.get("layout", {})
        say(f"resumed from {found} at step {step} (saved under tp={lay.get('tp')} pp={lay.get('pp')} "
            f"vpp={lay.get('vpp')} dp={lay.get('dp')} cp={lay.get('cp', 1)} ep={lay.get('ep')}) "
            f"in {time.perf_counter() - began:.1f}s")
        return step
    if t.init_from:
        src = resolve_checkpoint_dir(t.init_from)  # follows `latest`
        theirs, ours = dataclasses.asdict(load_model_config(src)), dataclasses.asdict(cfg.model)
        differ = [f"model.{k}: {theirs[k]!r} there, {ours[k]!r} here" for k in ours
                  if k != "name" and theirs[k] != ours[k]]
        if differ:
            raise ValueError(f"train.init_from={t.init_from} holds another architecture: " + "; ".join(differ))
        load_training_checkpoint(src, chunks, optimizer, topo, weights_only=True)
        say(f"initialised the weights from {src} (optimizer state starts afresh)")
    return 0


def evaluate(trainer: TrainingStep, dataset, cfg: Config) -> float | None:
    """Mean validation loss over train.eval_iters global batches (the same batches every time)."""
    if dataset is None:
        return None
    t = cfg.train
    losses = [trainer.validation_loss(dataset.global_batch(i % max(len(dataset) // t.global_batch_size, 1),
                                                           t.global_batch_size))
              for i in range(t.eval_iters)]
    return sum(losses) / len(losses)


@hydra.main(version_base=None, config_path="../conf", config_name="config")
def main(dcfg: DictConfig) -> None:
    try:
        cfg = resolve_config(dcfg)
    except (ValueError, OmegaConfBaseException) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if int(os.environ.get("RANK", "0")) == 0:
        OmegaConf.save(OmegaConf.structured(cfg), run_dir / "config.yaml")
    try:
        result = train(cfg, run_dir)
    except ValueError as e:  # CheckpointError included
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    except NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_NONFINITE)
    if result.get("status") == "preempted":
        sys.exit(EXIT_PREEMPTED)


if __name__ == "__main__":
    main()
