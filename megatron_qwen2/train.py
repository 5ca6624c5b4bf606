"""Training entry point: `python -m megatron_qwen2.train model=tiny train.steps=200 ...`.

The loop and nothing else: build the model, data and optimizer from the config, then step.
How a run ends is decided in one place, `run_and_record`: the exit code of megatron_qwen2/errors.py,
one `error: ...` line on stderr (once per job), and RUN_DIR/outcome.json on rank 0.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import signal
import statistics
import sys
import threading
import time
import traceback
from pathlib import Path

import hydra
import torch
import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from megatron_qwen2.checkpoint import checkpoint_for, expected_native_shapes
from megatron_qwen2.checkpoint.distributed import (RUN_CONFIG_FILE, CheckpointError, CheckpointSaver,
                                                   find_resume_checkpoint, load_training_checkpoint, point_latest,
                                                   read_latest, remove_partial_saves, set_aside)
from megatron_qwen2.config import (Config, check_overrides, format_differences, resolve_config,
                                   resume_differences)
from megatron_qwen2.data import build_datasets
from megatron_qwen2.data.loader import BatchPrefetcher, read_on_every_rank
from megatron_qwen2.data.preference import preference_parts
from megatron_qwen2.dpo_reference import prepare_reference, reference_source
from megatron_qwen2.engine.launch import init_distributed
from megatron_qwen2.engine.step import TrainingStep
from megatron_qwen2.errors import (EXIT_CONFIG, EXIT_HANG, EXIT_INTERNAL, EXIT_IO, EXIT_NONFINITE, EXIT_OK,
                                   EXIT_PREEMPTED, ConfigError, NonFiniteError, RunDirError, TrainingError)
from megatron_qwen2.lr_schedule import learning_rate
from megatron_qwen2.metrics import MetricsLogger, memory_metrics, peak_flops_per_device
from megatron_qwen2.model.flops import training_flops_per_token
from megatron_qwen2.model.moe import moe_load_metrics
from megatron_qwen2.outcome import write_outcome
from megatron_qwen2.parallel import Topology
from megatron_qwen2.watchdog import HangWatchdog, collective_timeout_floor_min

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"

# Finite losses in the running median that train.loss_spike_factor compares each loss with.
LOSS_SPIKE_WINDOW = 50

# outcome.json's "reason" for each exit code.
REASONS = {EXIT_OK: "completed", EXIT_PREEMPTED: "preempted", EXIT_CONFIG: "config", EXIT_NONFINITE: "nonfinite",
           EXIT_IO: "io", EXIT_HANG: "hang", EXIT_INTERNAL: "internal"}


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


class LossSpikes:
    """Flags a loss above `factor` x the median of the `window` finite losses before it (checked
    once the window is full; it starts empty at every start and resume). factor 0: never."""

    def __init__(self, factor: float, window: int = LOSS_SPIKE_WINDOW):
        self.factor = factor
        self.recent: collections.deque[float] = collections.deque(maxlen=window)

    def check(self, loss: float) -> float | None:
        """Record a finite loss; returns the median it exceeds `factor` times, else None."""
        full = len(self.recent) == self.recent.maxlen
        median = statistics.median(self.recent) if full else None
        self.recent.append(loss)
        if self.factor and median is not None and loss > self.factor * median:
            return median
        return None


class FailedOnAnotherRank(TrainingError):
    """A start-up check failed on some rank: the other ranks stop with its exit code (rank 0 prints it)."""

    def __init__(self, exit_code: int, message: str):
        super().__init__(message)
        self.exit_code = exit_code


def all_ranks_agree(action):
    """Run a start-up step on every rank and return its result; when it raises on any rank, every
    rank raises, with the exit code of the lowest failing rank, and rank 0 holds the message.

    Every rank must call it at the same point (one all-gather), so that a failure on one node (a
    file it cannot read, a directory it cannot write) stops the job instead of leaving the other
    ranks waiting in the next collective, and is reported once.
    """
    error = None
    try:
        result = action()
    except Exception as e:  # noqa: BLE001 - every failure is reported below
        error = e
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        if error is not None:
            raise error
        return result
    reports: list = [None] * dist.get_world_size()
    dist.all_gather_object(reports, None if error is None else (exit_code_of(error), one_line(error)))
    failed = [(rank, report) for rank, report in enumerate(reports) if report is not None]
    if not failed:
        return result
    rank = dist.get_rank()
    if error is not None and (rank == 0 or exit_code_of(error) == EXIT_INTERNAL):
        raise error  # rank 0 reports its own; a bug prints its traceback where it happened
    first, (code, message) = failed[0]
    more = f" (and on {len(failed) - 1} more rank{'s' if len(failed) > 2 else ''})" if len(failed) > 1 else ""
    raise FailedOnAnotherRank(code, f"rank {first}: {message}{more}") from error


def check_run_dir(run_dir: Path) -> None:
    """Create the run directory and write a probe file in it; RunDirError (exit 74) if that fails."""
    probe = Path(run_dir) / f".write_probe.{os.getpid()}"
    try:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise RunDirError(f"the run directory {run_dir} is not writable ({e.strerror or e}); pick another "
                          f"hydra.run.dir or make it writable") from None


def check_resume(cfg: Config, ckpt_dir: Path, say) -> None:
    """Before loading ckpt_dir: compare the run config it was saved with (its config.json) with cfg.

    A difference in a field that defines the model, the data order or the batch
    (config.RESUME_MUST_MATCH) stops the run with a ConfigError listing each as `old -> new`,
    unless train.resume=force; the other differences are noted in one line.
    """
    force = cfg.train.resume == "force"
    try:
        saved = json.loads((ckpt_dir / RUN_CONFIG_FILE).read_text())
    except (OSError, ValueError) as e:
        if not force:
            raise ConfigError(f"cannot compare the config with {ckpt_dir / RUN_CONFIG_FILE} ({e}); pass "
                              f"train.resume=force to resume without the comparison") from None
        say(f"warning: train.resume=force: resuming {ckpt_dir} without comparing configs ({e})")
        return
    blocking, allowed = resume_differences(saved, dataclasses.asdict(cfg))
    if blocking and not force:
        raise ConfigError(f"{ckpt_dir} was saved with other model, data or batch settings: "
                          f"{format_differences(blocking)}; start a new run in another hydra.run.dir, or "
                          f"pass train.resume=force to continue this one with the new values")
    if blocking:
        say(f"warning: train.resume=force: resuming {ckpt_dir} despite {format_differences(blocking)}")
    if allowed:
        say(f"resuming {ckpt_dir} with changed settings: {format_differences(allowed)}")


def train(cfg: Config, run_dir: Path, on_step_start=None) -> dict:
    """Run optimizer steps up to cfg.train.steps, resuming from run_dir/checkpoints when possible.

    Returns the last step's metrics (on every rank) with "status": "completed", or "preempted"
    after a SIGTERM/SIGUSR1 saved a checkpoint. Raises a megatron_qwen2.errors.TrainingError for an
    expected stop: ConfigError/DataError (bad config, data, or a resume that does not match its
    checkpoint), RunDirError (run dir not writable), NonFiniteError (more than
    train.max_skipped_steps consecutive non-finite steps, or any with train.on_nonfinite=stop;
    nothing is saved then). on_step_start(step) is a hook for tests.
    """
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is available; use device=cpu")
    world_size, rank = init_distributed(cfg.device, collective_timeout_floor_min(cfg.train.hang_timeout_min))
    device = torch.device(cfg.device, torch.cuda.current_device()) if cfg.device == "cuda" else torch.device("cpu")
    stop = StopRequest(device)  # a signal during start-up stops the run before its first step
    try:
        return _train(cfg, run_dir, world_size, rank, device, stop, on_step_start)
    finally:
        stop.restore()


def _train(cfg: Config, run_dir: Path, world_size: int, rank: int, device: torch.device, stop: StopRequest,
           on_step_start) -> dict:
    """The body of `train` once the process group and the stop-signal handlers exist."""
    # Start-up checks, before anything is allocated: a failure on any rank stops every rank.
    all_ranks_agree(lambda: (cfg.validate(world_size), check_run_dir(run_dir)))
    topo = Topology.build(cfg.parallel, world_size, rank)
    t = cfg.train
    torch.manual_seed(t.seed)

    def datasets():
        train_set, valid_set = build_datasets(cfg.data, t.seq_length, t.seed)  # valid: None unless data.split says
        if train_set.vocab_size > cfg.model.vocab_size:
            raise ConfigError(f"the tokenizer has {train_set.vocab_size} tokens but model.vocab_size="
                              f"{cfg.model.vocab_size}; pick a larger model.vocab_size or another tokenizer")
        if cfg.is_dpo:
            reference_source(cfg)  # the reference checkpoint exists and holds this architecture
        return train_set, valid_set

    dataset, valid_dataset = all_ranks_agree(datasets)
    trainer = TrainingStep(cfg, topo, device)
    chunks, optimizer = trainer.chunks, trainer.optimizer
    is_logger = rank == 0
    say = (lambda text: print(text, flush=True)) if is_logger else (lambda text: None)
    if is_logger:
        fp8 = "" if t.fp8 == "none" else f"; fp8 {t.fp8}" + (" (emulated on the CPU)" if device.type == "cpu" else "")
        print(f"model {cfg.model.name}: {count_parameters(cfg.model) / 1e6:.2f}M parameters; {len(dataset)} samples "
              f"of {t.seq_length} tokens per epoch; tp={topo.tp} pp={topo.pp} vpp={topo.vpp} dp={topo.dp} "
              f"cp={topo.cp} sp={topo.sequence_parallel}{fp8}; run dir {run_dir}", flush=True)
    if cfg.is_dpo:
        prepare_reference(cfg, trainer, preference_parts(dataset) + preference_parts(valid_dataset), run_dir, say)

    ckpt_root = run_dir / "checkpoints"
    start_step = restore(cfg, ckpt_root, chunks, optimizer, topo, say)
    if start_step >= t.steps:
        say(f"{run_dir} already holds a checkpoint at step {start_step} (train.steps={t.steps}): nothing to "
            f"train; raise train.steps to continue it, or start afresh with another hydra.run.dir or "
            f"train.resume=false")
        return {"step": start_step, "status": "completed"}
    if stop.agreed():  # signalled while starting: the checkpoint resumed from (if any) stays `latest`
        say(f"{stop.name} received during start-up: stopping before step {start_step + 1} without saving "
            f"(nothing was trained); exiting with code {EXIT_PREEMPTED}")
        return {"step": start_step, "status": "preempted"}
    # The run dir changes only once the resume (or fresh start) is decided.
    if is_logger:
        OmegaConf.save(OmegaConf.structured(cfg), run_dir / "config.yaml")
    flops_per_token = training_flops_per_token(cfg.model, t.seq_length)
    peak = peak_flops_per_device(device, t.peak_tflops)
    saver = CheckpointSaver(t.async_save)

    def save(step_done: int, blocking: bool) -> None:
        """Save step_done; NonFiniteError (nothing written) or RunDirError (the disk is full or read-only,
        the previous checkpoints stay), raised alike on every rank, end the run."""
        began = time.perf_counter()
        saver.save(ckpt_root, step_done, chunks, optimizer, topo, cfg.model,
                   train_state={"consumed_samples": step_done * t.global_batch_size,
                                "consumed_tokens": step_done * t.global_batch_size * t.seq_length,
                                "scheduler_step": step_done},
                   run_config=dataclasses.asdict(cfg), keep_last=t.keep_last, blocking=blocking,
                   on_done=lambda path, secs: say(f"checkpoint {path.name} complete after {secs:.1f}s"))
        say(f"checkpoint step_{step_done:06d}; the loop waited {time.perf_counter() - began:.1f}s")

    logger = MetricsLogger(run_dir, cfg.wandb, OmegaConf.to_container(OmegaConf.structured(cfg)),
                           enabled=is_logger, log_interval=t.log_interval, total_steps=t.steps)
    summary = None  # the metrics of the last step, once the loop has finished or stopped at a boundary
    try:
        metrics: dict = {}
        skipped_in_a_row = 0
        save_due = False
        spikes = LossSpikes(t.loss_spike_factor, LOSS_SPIKE_WINDOW)
        watchdog = HangWatchdog(run_dir, rank, timeout_s=t.hang_timeout_min * 60)  # disarms when the loop ends
        # This dp rank's rows of each global batch, read on a thread while the step before runs.
        batches = BatchPrefetcher(dataset, t.global_batch_size, topo.dp_rank, topo.dp, range(start_step, t.steps))
        for step in watchdog.watch(batches.steps_then_close()):
            if on_step_start is not None:
                on_step_start(step)
            start = time.perf_counter()
            lr = learning_rate(step, cfg.optim, t.steps)
            batch = read_on_every_rank(lambda: batches.get(step), topo.groups.dp.pg, device)  # [gbs/dp, s+1] rows
            data_time = time.perf_counter() - start
            outcome = trainer(batch, lr)
            skipped = outcome.skipped
            spike_median = None
            if skipped:
                skipped_in_a_row += 1
                text = f"step {step + 1}: non-finite loss {outcome.loss} or grad norm {outcome.grad_norm}"
                if t.on_nonfinite == "stop" or skipped_in_a_row > t.max_skipped_steps:
                    saver.wait()  # a periodic save still writing holds finite state: let it finish
                    why = ("train.on_nonfinite=stop" if t.on_nonfinite == "stop" else
                           f"{skipped_in_a_row} consecutive skipped updates, more than "
                           f"train.max_skipped_steps={t.max_skipped_steps}")
                    error = NonFiniteError(f"{text}: {why}; training stops without saving a checkpoint ({ckpt_root} "
                                           f"is unchanged): lower optim.lr or check the data, then run again to resume "
                                           f"from the last checkpoint")
                    error.step = step + 1  # outcome.json's step
                    raise error
                say(f"warning: {text}; the update was skipped ({skipped_in_a_row} in a row; more than "
                    f"train.max_skipped_steps={t.max_skipped_steps} stop the run)")
            else:
                skipped_in_a_row = 0
                spike_median = spikes.check(outcome.loss)
                if spike_median is not None:
                    say(f"warning: step {step + 1}: loss spike: {outcome.loss:.4f} is "
                        f"{outcome.loss / spike_median:.1f}x the median {spike_median:.4f} of the last "
                        f"{spikes.recent.maxlen} losses (train.loss_spike_factor={t.loss_spike_factor})")
            elapsed = time.perf_counter() - start
            metrics = {
                "step": step + 1,
                "loss": outcome.loss,
                "lr": lr,
                "grad_norm": outcome.grad_norm,
                "tokens_per_s": t.global_batch_size * t.seq_length / elapsed,
                "step_time_s": elapsed,
                "data_time_s": data_time,
                "consumed_samples": (step + 1) * t.global_batch_size,
                "consumed_tokens": (step + 1) * t.global_batch_size * t.seq_length,
            }
            if skipped:
                metrics["skipped"] = True
            if spike_median is not None:
                metrics["loss_spike"] = True
            if peak is not None:
                achieved = flops_per_token * metrics["tokens_per_s"] / topo.world_size
                metrics["tflops_per_device"] = achieved / 1e12
                metrics["mfu"] = achieved / peak
            if outcome.dpo is not None:
                metrics.update(outcome.dpo.as_metrics())
            metrics.update(memory_metrics(device))
            if cfg.model.is_moe:
                metrics["aux_loss"] = outcome.aux_loss
                metrics.update(moe_load_metrics(outcome.moe_load, topo.groups.dp_cp.pg))  # this stage's layers, whole batch
            if t.eval_interval and ((step + 1) % t.eval_interval == 0 or step + 1 == t.steps):
                val = evaluate(trainer, valid_dataset, cfg)
                if val is not None:
                    metrics["val_loss"] = val
            logger.log(metrics)
            if stop.agreed():  # every rank saw the same flag: all save, all leave
                save(step + 1, blocking=True)
                say(f"{stop.name} received: saved checkpoint step_{step + 1:06d} at the step boundary; "
                    f"exiting with code {EXIT_PREEMPTED}")
                summary = metrics
                return dict(metrics, status="preempted")
            # A periodic save due on a skipped step waits for the next applied update, so that a run
            # stopped by non-finite steps leaves the checkpoint from before them as `latest`.
            save_due = save_due or bool(t.save_interval and (step + 1) % t.save_interval == 0)
            if (save_due and not skipped) or step + 1 == t.steps:
                save(step + 1, blocking=step + 1 == t.steps)
                save_due = False
        saver.wait()
        summary = metrics
        return dict(metrics, status="completed")
    finally:
        logger.close(summary=summary)


def count_parameters(cfg) -> int:
    return sum(math.prod(shape) for shape in expected_native_shapes(cfg).values())


def restore(cfg: Config, ckpt_root: Path, chunks, optimizer, topo: Topology, say) -> int:
    """Resume from the newest usable checkpoint in ckpt_root (returns its step), else load the
    weights of train.init_from (fresh optimizer) and return 0. Every rank calls it."""
    t = cfg.train
    found = None
    if t.resume:
        if topo.rank == 0:
            for path in remove_partial_saves(ckpt_root):
                say(f"removed {path}, left by a save that did not complete")

        def refused(path: Path, error: CheckpointError) -> None:  # on every rank, in the same order
            if topo.rank == 0:
                try:
                    done = f"renamed it to {set_aside(path).name}"
                except OSError as e:  # the other ranks go on to the next one: never raise here
                    done = f"it cannot be renamed aside ({e.strerror or e})"
                say(f"warning: refusing {error}; {done} and trying the previous checkpoint")

        began = time.perf_counter()
        found = find_resume_checkpoint(ckpt_root, on_refused=refused)  # the ranks share the checking
        verified_s = time.perf_counter() - began
        # Rank 0 says whether starting afresh would train over checkpoints it could not use.
        unusable = None
        if topo.rank == 0 and found is None and any(ckpt_root.glob("step_*")):
            unusable = (f"{ckpt_root} holds checkpoints but none is usable (reasons above); move them "
                        f"away or set train.resume=false to start afresh")
        if dist.is_initialized() and dist.get_world_size() > 1:
            box = [unusable]
            dist.broadcast_object_list(box, src=0)
            unusable = box[0]
        if unusable is not None:
            raise CheckpointError(unusable)
    if found is not None:
        check_resume(cfg, found, say)  # before loading: a config that does not match stops here
        began = time.perf_counter()
        state = load_training_checkpoint(found, chunks, optimizer, topo, verify=False)  # verified above
        if topo.rank == 0 and read_latest(ckpt_root) != found.name:
            try:
                point_latest(ckpt_root, found.name)  # `latest` named a checkpoint that was set aside
            except OSError as e:  # a read-only checkpoint dir: the next save reports it on every rank
                say(f"warning: cannot point {ckpt_root / 'latest'} at {found.name} ({e.strerror or e})")
        step = int(state["step"])
        if state.get("consumed_samples") != step * t.global_batch_size:
            raise CheckpointError(f"{found} consumed {state.get('consumed_samples')} samples in {step} steps, which is "
                                  f"not {step} x train.global_batch_size={t.global_batch_size}; resume with the "
                                  f"global batch size it was saved with")
        lay = state.get("layout", {})
        say(f"resumed from {found} at step {step} (saved under tp={lay.get('tp')} pp={lay.get('pp')} "
            f"vpp={lay.get('vpp')} dp={lay.get('dp')} cp={lay.get('cp', 1)} ep={lay.get('ep')}) "
            f"in {time.perf_counter() - began:.1f}s, its checksums verified in {verified_s:.1f}s")
        return step
    if t.init_from:
        src = checkpoint_for(t.init_from, cfg.model, "train.init_from")  # follows `latest`
        load_training_checkpoint(src, chunks, optimizer, topo, weights_only=True)
        say(f"initialised the weights from {src} (optimizer state starts afresh)")
    return 0


def evaluate(trainer: TrainingStep, dataset, cfg: Config) -> float | None:
    """Mean validation loss over train.eval_iters global batches (the same batches every time); each
    rank reads its dp rank's rows of them."""
    if dataset is None:
        return None
    t, topo = cfg.train, trainer.topo
    losses = []
    for i in range(t.eval_iters):
        index = i % max(len(dataset) // t.global_batch_size, 1)
        rows = read_on_every_rank(lambda: dataset.local_batch(index, t.global_batch_size, topo.dp_rank, topo.dp),
                                  topo.groups.dp.pg, trainer.device)
        losses.append(trainer.validation_loss(rows))
    return sum(losses) / len(losses)


def exit_code_of(error: BaseException) -> int:
    """The exit code of an error (megatron_qwen2/errors.py): a TrainingError's own; other bad values
    (ValueError, OmegaConf's errors) 2; an I/O error (OSError) 74; anything else is a bug, 1."""
    if isinstance(error, TrainingError):
        return error.exit_code
    if isinstance(error, (ValueError, OmegaConfBaseException)):
        return EXIT_CONFIG
    if isinstance(error, OSError):
        return EXIT_IO
    return EXIT_INTERNAL


def one_line(error: BaseException) -> str:
    """The error's message on one line (OmegaConf's: the first line of its message and the key)."""
    if isinstance(error, OmegaConfBaseException) and getattr(error, "msg", None):
        text = error.msg.splitlines()[0]
        return f"{error.full_key}: {text}" if getattr(error, "full_key", None) else text
    return "; ".join(part.strip() for part in str(error).splitlines() if part.strip()) or type(error).__name__


def prints_error(error: BaseException, rank: int) -> bool:
    """Whether this rank prints the `error:` line. Expected stops (TrainingError, bad values) are
    raised alike on every rank (start-up failures through `all_ranks_agree`, non-finite steps from
    all-reduced numbers, checkpoint errors after the ranks agree): rank 0 prints them. Other errors
    (I/O, bugs) print on the rank that raised them."""
    if isinstance(error, (TrainingError, ValueError, OmegaConfBaseException)):
        return rank == 0
    return True


# A rank that leaves an error to another rank's line waits this long before it exits: a launcher
# (torchrun) stops every rank once one exits, which could otherwise cut the printing rank short.
SILENT_RANK_EXIT_DELAY_S = 5.0


def report_error(error: BaseException, run_dir: Path | None, rank: int, printing: bool) -> int:
    """Print `error: <message>` (one line) where `printing`, a traceback only for a bug or with
    HYDRA_FULL_ERROR=1, and record the outcome on rank 0; returns the exit code. A rank that neither
    prints nor records waits SILENT_RANK_EXIT_DELAY_S first."""
    code = exit_code_of(error)
    if code == EXIT_INTERNAL or os.environ.get("HYDRA_FULL_ERROR") == "1":
        traceback.print_exception(error)
    if printing:
        print(f"error: {one_line(error)}", file=sys.stderr, flush=True)
    if rank == 0 and run_dir is not None:
        write_outcome(run_dir, code, REASONS.get(code, "error"), getattr(error, "step", None), one_line(error))
    if not printing and rank != 0:
        time.sleep(SILENT_RANK_EXIT_DELAY_S)
    return code


def run_and_record(action, run_dir: Path, rank: int) -> int:
    """Run `action` (training) and report how it ended: an error through `report_error` on the rank
    `prints_error` picks; RUN_DIR/outcome.json on rank 0 for every ending. Returns the exit code."""
    try:
        result = action()
    except Exception as error:  # noqa: BLE001 - every ending is reported
        return report_error(error, run_dir, rank, prints_error(error, rank))
    code = EXIT_PREEMPTED if result.get("status") == "preempted" else EXIT_OK
    if rank == 0 and run_dir is not None:
        write_outcome(run_dir, code, REASONS[code], result.get("step"))
    return code


@hydra.main(version_base=None, config_path="../conf", config_name="config")
def main(dcfg: DictConfig) -> None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    sys.exit(run_and_record(lambda: train(resolve_config(dcfg), run_dir), run_dir,
                            int(os.environ.get("RANK", "0"))))


def literal_run_dir(args: list[str]) -> Path | None:
    """The run dir a command line names with `hydra.run.dir=PATH` (None for none, or one that
    needs interpolation: Hydra resolves those)."""
    values = [a.split("=", 1)[1] for a in args if a.lstrip("+").startswith("hydra.run.dir=")]
    if not values or "${" in values[-1]:
        return None
    return Path(values[-1])


def cli(args: list[str] | None = None) -> None:
    """`python -m megatron_qwen2.train OVERRIDES...`: what Hydra would report in its own words
    (exit 1) is checked first — unknown keys and group options (exit 2), a run dir that cannot be
    created (exit 74) — then Hydra composes the config and main() runs."""
    args = sys.argv[1:] if args is None else args
    rank = int(os.environ.get("RANK", "0"))
    run_dir = literal_run_dir(args)
    # Before the process group exists: the command line is the same on every rank (rank 0 prints),
    # and a run dir that cannot be created fails alike on the ranks of a node (its first prints).
    try:
        check_overrides(args, CONF_DIR)
    except ConfigError as error:
        sys.exit(report_error(error, run_dir if run_dir is not None and run_dir.is_dir() else None, rank,
                              printing=rank == 0))
    if run_dir is not None:
        try:
            check_run_dir(run_dir)
        except RunDirError as error:
            sys.exit(report_error(error, None, rank, printing=int(os.environ.get("LOCAL_RANK", "0")) == 0))
    main()


if __name__ == "__main__":
    cli()
