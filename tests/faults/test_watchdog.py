"""The hang watchdog: a rank held before a collective makes every rank write its stacks and exit 76,
rank 0 records the hang in outcome.json, and the last checkpoint stays usable."""

import json
import multiprocessing
import os
import pickle
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from megatron_qwen2.checkpoint import load_model
from megatron_qwen2.config import Config, DataConfig, ModelConfig, OptimConfig, TrainConfig
from megatron_qwen2.errors import EXIT_HANG, ConfigError
from megatron_qwen2.outcome import read_outcome
from megatron_qwen2.watchdog import FIRST_STEP_FACTOR, HangWatchdog, hang_file
from tests.distributed import _free_port

HOLD_AT = 2  # 0-based: rank 1 is held before step 3, after the checkpoint of step 2
TIMEOUT_MIN = 0.15  # 9 s: far above a tiny step, even on a busy machine


def tiny_config(cache_dir: Path, device: str) -> Config:
    return Config(
        device=device,
        model=ModelConfig(hidden_size=32, num_layers=2, num_attention_heads=4, num_kv_heads=2, ffn_hidden_size=64,
                          vocab_size=4096, tie_word_embeddings=True),
        optim=OptimConfig(lr=3e-3, warmup_steps=1),
        data=DataConfig(max_files=20, cache_dir=str(cache_dir)),
        train=TrainConfig(steps=6, micro_batch_size=1, global_batch_size=4, seq_length=16, log_interval=100,
                          save_interval=2, hang_timeout_min=TIMEOUT_MIN),
    )


def held_before_the_all_reduce(step: int) -> None:
    """The train() hook: rank 1 sleeps through step HOLD_AT, so rank 0 waits in its collectives."""
    if int(os.environ["RANK"]) == 1 and step == HOLD_AT:
        time.sleep(600)


def _rank_main(rank: int, port: int, run_dir: str, cache_dir: str, device: str) -> None:
    err = os.open(f"{run_dir}.rank{rank}.stderr", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(err, 2)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", OMP_NUM_THREADS="1", TORCH_FR_BUFFER_SIZE="100",
                      TORCH_NCCL_TRACE_BUFFER_SIZE="100")
    from megatron_qwen2.train import train

    train(tiny_config(Path(cache_dir), device), Path(run_dir), on_step_start=held_before_the_all_reduce)
    sys.exit(0)  # not reached: the watchdog ends the process


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="needs 2 CUDA devices (NCCL and its flight recorder)"))])
def test_held_rank_makes_every_rank_dump_its_stacks_and_exit_76(tmp_path, device):
    run_dir = tmp_path / "run"
    ctx = multiprocessing.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, port, str(run_dir), str(tmp_path / "cache"), device))
             for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    for p in procs:
        if p.is_alive():
            p.kill()
    stderr = [Path(f"{run_dir}.rank{r}.stderr").read_text() for r in (0, 1)]
    assert [p.exitcode for p in procs] == [EXIT_HANG, EXIT_HANG], stderr

    # Every rank's stacks name where it was held: rank 1 in the hook, rank 0 inside a collective.
    held, waiting = hang_file(run_dir, 1).read_text(), hang_file(run_dir, 0).read_text()
    assert f"last completed step: {HOLD_AT}" in held and f"last completed step: {HOLD_AT}" in waiting
    assert "in held_before_the_all_reduce" in held and "in train" in held
    assert "in train" in waiting, waiting
    if device == "cpu":  # gloo waits in the step's first collective (every dp rank's read succeeded); NCCL's
        # wait is wherever the host syncs
        assert "loader.py" in waiting and "in read_on_every_rank" in waiting, waiting
    # The flight recorder (with TORCH_FR_BUFFER_SIZE set) holds rank 0's pending collective.
    trace = pickle.loads((run_dir / ("hang/fr_trace_rank_0" if device == "cpu" else "hang/nccl_trace_rank_0"))
                         .read_bytes())
    assert trace["entries"] and trace["entries"][-1]["state"] != "completed", trace["entries"][-1]

    outcome = read_outcome(run_dir)
    assert (outcome["exit_code"], outcome["reason"], outcome["step"]) == (EXIT_HANG, "hang", HOLD_AT)
    # One line, printed once (rank 0), naming the hang directory; no traceback.
    errors = [line for text in stderr for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(run_dir / "hang") in errors[0] and "exiting with code 76" in errors[0], stderr
    assert "Traceback" not in "".join(stderr)

    # Nothing lost: the checkpoint of step 2 is `latest` and loads; metrics hold steps 1-2.
    assert (run_dir / "checkpoints/latest").read_text().strip() == f"step_{HOLD_AT:06d}"
    assert load_model(run_dir / "checkpoints") is not None
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, HOLD_AT + 1))


def watchdog_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("hang-watchdog")]


def test_the_first_step_gets_the_longer_allowance_and_a_late_step_fires(tmp_path):
    exits = []
    timeout = 0.5
    watchdog = HangWatchdog(tmp_path, rank=0, timeout_s=timeout, exit_grace_s=0, exit_process=exits.append)

    def late_step():
        time.sleep(4 * timeout)

    for step in watchdog.watch(range(3)):
        if step == 0:
            time.sleep((FIRST_STEP_FACTOR - 1.2) * timeout)  # within the first step's allowance
            assert exits == []
        elif step == 1:
            late_step()
    assert exits == [EXIT_HANG]
    stacks = hang_file(tmp_path, 0).read_text()
    assert "last completed step: 1" in stacks and "in late_step" in stacks
    outcome = read_outcome(tmp_path)
    assert (outcome["exit_code"], outcome["reason"], outcome["step"]) == (EXIT_HANG, "hang", 1)
    assert not watchdog_threads()


def test_leaving_the_loop_by_an_exception_disarms_the_watchdog(tmp_path):
    exits = []
    watchdog = HangWatchdog(tmp_path, rank=0, timeout_s=0.2, exit_grace_s=0, exit_process=exits.append)
    with pytest.raises(RuntimeError):
        for step in watchdog.watch(range(5)):
            if step == 1:
                raise RuntimeError("a failed step")
    assert not watchdog_threads()
    time.sleep(1.0)
    assert exits == [] and not (tmp_path / "hang").exists()


def test_timeout_zero_turns_it_off_and_negative_is_refused(tmp_path):
    watchdog = HangWatchdog(tmp_path, rank=0, timeout_s=0, exit_process=pytest.fail)
    for _ in watchdog.watch(range(2)):
        assert not watchdog_threads()
    with pytest.raises(ConfigError, match="train.hang_timeout_min must be >= 0.*got -1"):
        TrainConfig(hang_timeout_min=-1).validate()


def test_collectives_wait_longer_than_the_watchdog():
    from megatron_qwen2.watchdog import EXIT_GRACE_S, FIRST_STEP_FACTOR, collective_timeout_floor_min

    assert collective_timeout_floor_min(0) == 0
    assert collective_timeout_floor_min(30) * 60 > FIRST_STEP_FACTOR * 30 * 60 + EXIT_GRACE_S
