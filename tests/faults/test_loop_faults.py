"""Faults of the training loop and the entry point: non-finite streaks, loss spikes, a resume
whose config does not match its checkpoint, unknown keys, unwritable run dirs, one-line errors.

Each test injects the fault and checks what is left on disk, the message and the exit code.
"""

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

import megatron_qwen2.train as train_module
from megatron_qwen2.config import resolve_config
from megatron_qwen2.engine.distributed_optimizer import MixedPrecisionOptimizer
from megatron_qwen2.errors import (EXIT_CONFIG, EXIT_IO, EXIT_NONFINITE, EXIT_OK, EXIT_PREEMPTED, NonFiniteError,
                                   RunDirError)
from megatron_qwen2.outcome import read_outcome
from megatron_qwen2.train import LossSpikes, report_error, run_and_record, train
from tests.distributed import run_distributed

ROOT = Path(__file__).resolve().parents[2]
CONF = str(ROOT / "conf")
# A one-layer model small enough for a few CPU steps per test.
BASE = ["model=tiny", "model.num_layers=1", "model.hidden_size=32", "model.ffn_hidden_size=64",
        "train.seq_length=32", "train.micro_batch_size=2", "train.global_batch_size=4", "train.log_interval=100",
        "optim.warmup_steps=2", "data.max_files=20"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def composed(cache, *overrides, world_size=1):
    """The config `python -m megatron_qwen2.train BASE... OVERRIDES...` resolves to."""
    with initialize_config_dir(config_dir=CONF, version_base=None):
        return resolve_config(compose(config_name="config", overrides=[*BASE, f"data.cache_dir={cache}",
                                                                       *overrides]), world_size)


def cli(cache, *overrides, timeout=240):
    return subprocess.run([sys.executable, "-m", "megatron_qwen2.train", *BASE, f"data.cache_dir={cache}",
                           *overrides], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def files(root: Path) -> dict[str, bytes]:
    """Every file under root (but outcome.json, which records each ending) and its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "outcome.json"}


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def one_error_line(stderr: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


# ---------------------------------------------------------------------------------------------
# Non-finite steps


def test_nonfinite_streak_stops_with_exit_3_and_saves_nothing(tmp_path, cache, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    train(composed(cache, "train.steps=2"), run_dir)
    before = files(run_dir)
    # From step 3 on every gradient norm is NaN: each update is skipped; the 4th in a row stops.
    monkeypatch.setattr(MixedPrecisionOptimizer, "grad_norm", lambda self: float("nan"))
    cfg = composed(cache, "train.steps=20", "train.save_interval=1", "train.max_skipped_steps=3")
    capsys.readouterr()
    code = run_and_record(lambda: train(cfg, run_dir), run_dir, rank=0)
    err = one_error_line(capsys.readouterr().err)
    assert code == EXIT_NONFINITE == 3
    assert "step 6: non-finite" in err and "4 consecutive skipped updates, more than train.max_skipped_steps=3" in err
    assert "without saving" in err
    # No checkpoint of the skipped steps (save_interval=1 fell on each), latest as it was.
    after = files(run_dir)
    assert {k: v for k, v in after.items() if k.startswith("checkpoints")} == \
        {k: v for k, v in before.items() if k.startswith("checkpoints")}
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_000002"
    assert not list((run_dir / "checkpoints").glob(".*tmp*"))
    assert [r.get("skipped", False) for r in metrics(run_dir)] == [False, False, True, True, True]
    assert read_outcome(run_dir)["exit_code"] == 3 and read_outcome(run_dir)["step"] == 6


def test_huge_lr_stops_the_command_line_with_exit_3(tmp_path, cache):
    run_dir = tmp_path / "run"
    res = cli(cache, "train.steps=10", "optim.lr=1e30", "train.max_skipped_steps=2", f"hydra.run.dir={run_dir}")
    assert res.returncode == EXIT_NONFINITE, res.stderr
    err = one_error_line(res.stderr)
    assert "3 consecutive skipped updates, more than train.max_skipped_steps=2" in err
    assert not (run_dir / "checkpoints").exists()  # nothing saved
    assert read_outcome(run_dir)["exit_code"] == 3


def test_loss_spike_is_warned_and_logged(tmp_path, cache, monkeypatch, capsys):
    monkeypatch.setattr(train_module, "LOSS_SPIKE_WINDOW", 4)
    original = train_module.TrainingStep.__call__

    def spiking(self, batch, lr):  # step 6's loss is reported 10x higher
        outcome = original(self, batch, lr)
        if len(calls) == 5:
            outcome.loss *= 10
        calls.append(outcome.loss)
        return outcome

    calls = []
    monkeypatch.setattr(train_module.TrainingStep, "__call__", spiking)
    run_dir = tmp_path / "run"
    train(composed(cache, "train.steps=6", "train.loss_spike_factor=3"), run_dir)
    rows = metrics(run_dir)
    assert [r["step"] for r in rows if r.get("loss_spike")] == [6]
    warnings = [line for line in capsys.readouterr().out.splitlines() if "loss spike" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: step 6: loss spike:")
    assert "median" in warnings[0] and "train.loss_spike_factor=3.0" in warnings[0]


def test_loss_spike_window():
    spikes = LossSpikes(3.0, window=3)
    assert [spikes.check(x) for x in (1.0, 9.0, 1.0)] == [None, None, None]  # the window fills first
    assert spikes.check(3.5) == 1.0  # > 3 x median(1, 9, 1)
    assert spikes.check(3.0) is None  # median(9, 1, 3.5) = 3.5
    off = LossSpikes(0.0, window=1)
    assert [off.check(x) for x in (1.0, 100.0)] == [None, None]


# ---------------------------------------------------------------------------------------------
# Resume guard


def test_resume_with_another_seq_length_exits_2_then_force_continues(tmp_path, cache, capsys):
    run_dir = tmp_path / "run"
    train(composed(cache, "train.steps=2", "train.seq_length=128"), run_dir)
    before = files(run_dir)
    res = cli(cache, "train.steps=3", "train.seq_length=256", f"hydra.run.dir={run_dir}")
    assert res.returncode == EXIT_CONFIG, res.stderr
    err = one_error_line(res.stderr)
    assert "train.seq_length: 128 -> 256" in err and "train.resume=force" in err and "hydra.run.dir" in err
    assert "train.steps" not in err  # allowed to change: not a reason to stop
    assert files(run_dir) == before  # checkpoints, metrics.jsonl and config.yaml untouched
    assert read_outcome(run_dir)["exit_code"] == 2

    capsys.readouterr()
    result = train(composed(cache, "train.steps=3", "train.seq_length=256", "train.resume=force"), run_dir)
    out = capsys.readouterr().out
    assert result["status"] == "completed" and result["step"] == 3
    assert "train.resume=force: resuming" in out and "train.seq_length: 128 -> 256" in out
    assert [r["step"] for r in metrics(run_dir)] == [1, 2, 3]


def test_changed_steps_pass_with_a_note_and_a_finished_run_says_so(tmp_path, cache, capsys):
    run_dir = tmp_path / "run"
    train(composed(cache, "train.steps=2"), run_dir)
    before = files(run_dir)
    capsys.readouterr()
    code = run_and_record(lambda: train(composed(cache, "train.steps=2", "parallel.bucket_size=1000"), run_dir),
                          run_dir, rank=0)
    out = capsys.readouterr().out.splitlines()
    assert code == EXIT_OK and read_outcome(run_dir)["reason"] == "completed"
    done = [line for line in out if "already holds a checkpoint" in line]
    assert len(done) == 1 and str(run_dir) in done[0] and "at step 2" in done[0]
    assert "train.resume=false" in done[0] and "hydra.run.dir" in done[0]
    assert files(run_dir) == before

    train(composed(cache, "train.steps=3", "optim.lr=1e-3", "train.log_interval=7"), run_dir)
    notes = [line for line in capsys.readouterr().out.splitlines() if "with changed settings" in line]
    assert len(notes) == 1
    assert "train.steps: 2 -> 3" in notes[0] and "optim.lr: 0.0003 -> 0.001" in notes[0]
    assert "train.log_interval: 100 -> 7" in notes[0]
    assert [r["step"] for r in metrics(run_dir)] == [1, 2, 3]


def test_a_stop_signal_during_start_up_exits_75_before_the_first_step(tmp_path, cache, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    train(composed(cache, "train.steps=2"), run_dir)
    before = files(run_dir)
    handler_before = signal.getsignal(signal.SIGUSR1)
    real_build = train_module.build_datasets

    def signalled_while_building(*args, **kwargs):  # the signal lands while the data is being built
        os.kill(os.getpid(), signal.SIGUSR1)
        return real_build(*args, **kwargs)

    monkeypatch.setattr(train_module, "build_datasets", signalled_while_building)
    capsys.readouterr()
    code = run_and_record(lambda: train(composed(cache, "train.steps=4"), run_dir), run_dir, rank=0)
    assert code == EXIT_PREEMPTED
    assert read_outcome(run_dir)["reason"] == "preempted" and read_outcome(run_dir)["step"] == 2
    assert "SIGUSR1 received during start-up" in capsys.readouterr().out
    assert files(run_dir) == before  # nothing trained, nothing saved: `latest` is still step 2
    assert signal.getsignal(signal.SIGUSR1) == handler_before  # the handlers are given back


# ---------------------------------------------------------------------------------------------
# One line, one exit code


def test_unknown_key_is_one_line_exit_2(tmp_path, cache):
    run_dir = tmp_path / "run"
    res = cli(cache, "train.stepz=3", f"hydra.run.dir={run_dir}")
    assert res.returncode == EXIT_CONFIG
    err = one_error_line(res.stderr)
    assert "train.stepz" in err and "train.steps" in err
    assert not run_dir.exists()


def test_run_dir_under_a_file_is_one_line_exit_74(tmp_path, cache):
    blocker = tmp_path / "a_file"
    blocker.write_text("keep me\n")
    res = cli(cache, f"hydra.run.dir={blocker / 'run'}")
    assert res.returncode == EXIT_IO == 74
    err = one_error_line(res.stderr)
    assert str(blocker / "run") in err and "not writable" in err and "hydra.run.dir" in err
    assert blocker.read_text() == "keep me\n"


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory on a read-only tmpfs: not writable for root either."""
    path = tmp_path / "ro"
    path.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a read-only tmpfs needs root")
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)], capture_output=True,
                         text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {res.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False)


def test_read_only_run_dir_stops_before_anything_is_allocated(read_only_dir, cache, monkeypatch, capsys):
    def must_not_run(*args, **kwargs):
        raise AssertionError("the data was built for a run dir that cannot be written")

    monkeypatch.setattr(train_module, "build_datasets", must_not_run)
    code = run_and_record(lambda: train(composed(cache), read_only_dir), read_only_dir, rank=0)
    assert code == EXIT_IO
    err = one_error_line(capsys.readouterr().err)
    assert str(read_only_dir) in err and "Read-only file system" in err
    assert list(read_only_dir.iterdir()) == []


def test_missing_data_file_is_one_line_exit_2(tmp_path, cache):
    missing = tmp_path / "no_such_prefix"
    res = cli(cache, f"data.paths=[{missing}]", f"hydra.run.dir={tmp_path / 'run'}")
    assert res.returncode == EXIT_CONFIG, res.stderr
    assert str(missing) in one_error_line(res.stderr)


def test_traceback_only_with_hydra_full_error(capsys, monkeypatch):
    error = NonFiniteError("step 3: non-finite loss nan")
    assert report_error(error, None, rank=0, printing=True) == 3
    assert capsys.readouterr().err == "error: step 3: non-finite loss nan\n"
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    try:
        raise RunDirError("the run directory x is not writable")
    except RunDirError as e:
        assert report_error(e, None, rank=0, printing=True) == 74
    err = capsys.readouterr().err
    assert "Traceback" in err and err.endswith("error: the run directory x is not writable\n")


def test_torchrun_config_error_prints_once(tmp_path):
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "megatron_qwen2.train", "model.num_kv_heads=3", f"hydra.run.dir={tmp_path / 'run'}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert res.returncode != 0
    ours = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert ours == ["error: model.num_attention_heads=4 is not divisible by model.num_kv_heads=3"], res.stderr
    assert read_outcome(tmp_path / "run")["exit_code"] == 2


def _one_rank_cannot_write(rank, world_size, cfg, run_dirs):
    run_dir = Path(run_dirs[rank])
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = run_and_record(lambda: train(cfg.validate(world_size), run_dir), run_dir, rank)
    return code, err.getvalue()


def test_a_failure_on_one_rank_stops_every_rank_and_prints_once(tmp_path, cache):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    good, bad = tmp_path / "run", blocker / "run"  # rank 1's run dir cannot be created
    (code0, err0), (code1, err1) = run_distributed(_one_rank_cannot_write, 2, composed(cache, world_size=2),
                                                   [str(good), str(bad)])
    assert code0 == code1 == EXIT_IO
    assert one_error_line(err0).startswith(f"error: rank 1: the run directory {bad} is not writable")
    assert err1 == ""
    assert read_outcome(good)["exit_code"] == EXIT_IO
    assert sorted(p.name for p in good.iterdir()) == ["outcome.json"]  # nothing else written
