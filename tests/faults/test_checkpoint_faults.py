"""Faults of checkpoint content and of saving: a same-size bit flip, truncation, a deleted shard or
manifest, rotation next to corrupt checkpoints, a full disk (tmpfs), SIGKILL in the middle of a
save, non-finite state at save time, and the same under two gloo ranks.

Each test injects the fault and checks what is left on disk, the message and the exit code.
"""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from megatron_qwen2.checkpoint import load_native_state, save_native
from megatron_qwen2.checkpoint import distributed, native
from megatron_qwen2.checkpoint.distributed import (CheckpointError, _share, find_resume_checkpoint, read_manifest,
                                                   rotate_checkpoints, verify_checkpoint)
from megatron_qwen2.engine.distributed_optimizer import MixedPrecisionOptimizer
from megatron_qwen2.errors import EXIT_CONFIG, EXIT_IO, EXIT_NONFINITE, NonFiniteError, RunDirError
from megatron_qwen2.outcome import read_outcome
from megatron_qwen2.train import run_and_record, train
from tests.checkpoint.test_resume import cache, losses, make_config, read_metrics, reference_run, tmp_root  # noqa: F401
from tests.distributed import run_distributed

ROOT = Path(__file__).resolve().parents[2]


def step_dir(n: int) -> str:
    return f"step_{n:06d}"


def flip_bit(path: Path) -> None:
    """Flip one bit in the middle of a file (its size stays)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def largest(directory: Path) -> Path:
    return max(directory.glob("*.distcp"), key=lambda p: p.stat().st_size)


def contents(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def saving_config(cache, steps, **parallel):
    cfg = make_config(cache, steps=steps, **parallel)
    cfg.train.save_interval, cfg.train.keep_last = 1, 0
    return cfg


@pytest.fixture(scope="module")
def base_run(cache, tmp_path_factory):
    """A single-process run of 3 steps with a checkpoint after each."""
    run_dir = tmp_path_factory.mktemp("base") / "run"
    train(saving_config(cache, 3).validate(1), run_dir)
    return run_dir


def copy_run(base_run: Path, tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(base_run, run_dir)
    return run_dir


@pytest.mark.parametrize("sub", ["model", "optim"])
def test_bit_flip_is_refused_set_aside_and_resumed_from_previous(tmp_path, cache, tmp_root, base_run, capsys, sub):
    run_dir = copy_run(base_run, tmp_path)
    ckpts = run_dir / "checkpoints"
    shard = largest(ckpts / step_dir(3) / sub)
    size = shard.stat().st_size
    flip_bit(shard)
    assert shard.stat().st_size == size
    rel = f"{sub}/{shard.name}"
    with pytest.raises(CheckpointError, match=rf"{step_dir(3)} is corrupt: {rel} has checksum [0-9a-f]{{16}}, "
                                              rf"the manifest says [0-9a-f]{{16}}$"):
        verify_checkpoint(ckpts / step_dir(3))
    capsys.readouterr()
    cfg = saving_config(cache, 4)
    cfg.train.keep_last = 2
    train(cfg.validate(1), run_dir)
    out = capsys.readouterr().out
    refusal = [line for line in out.splitlines() if "refusing" in line]
    assert len(refusal) == 1 and f"{step_dir(3)} is corrupt: {rel} has checksum" in refusal[0]
    assert f"renamed it to {step_dir(3)}.corrupt" in refusal[0]
    assert f"resumed from {ckpts / step_dir(2)} at step 2" in out
    # The set-aside copy keeps its bytes; rotation (keep_last=2) neither counts nor deletes it.
    assert (ckpts / f"{step_dir(3)}.corrupt" / rel).read_bytes() != (base_run / "checkpoints" / step_dir(3) / rel).read_bytes()
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == [step_dir(3), f"{step_dir(3)}.corrupt", step_dir(4)]
    assert (ckpts / "latest").read_text().strip() == step_dir(4)
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 3, 4]
    ref = reference_run(cache, tmp_root)
    assert [r["loss"] for r in rows[3:]] == [r["loss"] for r in ref[2:4]]  # bitwise: an uninterrupted run's


@pytest.mark.parametrize("fault, message", [
    ("truncate", r"is corrupt: optim/__0_\d\.distcp has \d+ bytes, the manifest says \d+$"),
    ("delete_shard", r"is incomplete: model/__0_\d\.distcp is missing$"),
    ("delete_manifest", r"is incomplete: it has no manifest\.json$"),
])
def test_truncated_or_missing_files_are_refused_and_previous_used(tmp_path, base_run, fault, message):
    run_dir = copy_run(base_run, tmp_path)
    ckpts = run_dir / "checkpoints"
    newest = ckpts / step_dir(3)
    if fault == "truncate":
        shard = largest(newest / "optim")
        shard.write_bytes(shard.read_bytes()[:-100])
    elif fault == "delete_shard":
        largest(newest / "model").unlink()
    else:
        (newest / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match=message):
        verify_checkpoint(newest)
    refused = []
    assert find_resume_checkpoint(ckpts, on_refused=lambda p, e: refused.append((p, str(e)))) == ckpts / step_dir(2)
    assert [p for p, _ in refused] == [newest] and str(newest) in refused[0][1]


def test_no_usable_checkpoint_stops_with_exit_2_instead_of_training_afresh(tmp_path, cache, base_run, capsys):
    run_dir = copy_run(base_run, tmp_path)
    ckpts = run_dir / "checkpoints"
    for n in (1, 2, 3):
        flip_bit(largest(ckpts / step_dir(n) / "model"))
    metrics_before = (run_dir / "metrics.jsonl").read_bytes()
    code = run_and_record(lambda: train(saving_config(cache, 5).validate(1), run_dir), run_dir, rank=0)
    assert code == EXIT_CONFIG
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds checkpoints but none is usable" in err[0] and "train.resume=false" in err[0]
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == [f"{step_dir(n)}.corrupt" for n in (1, 2, 3)]
    assert (run_dir / "metrics.jsonl").read_bytes() == metrics_before  # nothing trained
    assert read_outcome(run_dir)["exit_code"] == EXIT_CONFIG


def test_rotation_keeps_the_newest_verified_checkpoint_when_newer_ones_are_corrupt(tmp_path, base_run):
    run_dir = copy_run(base_run, tmp_path)
    ckpts = run_dir / "checkpoints"
    shard = largest(ckpts / step_dir(3) / "model")
    shard.write_bytes(shard.read_bytes()[:-1])  # step 3: a file of another size
    (ckpts / step_dir(2) / "manifest.json").unlink()  # step 2: no manifest
    shutil.copytree(ckpts / step_dir(1), ckpts / "step_000000.corrupt")  # set aside earlier
    assert rotate_checkpoints(ckpts, keep_last=1) == []
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == [
        "step_000000.corrupt", step_dir(1), step_dir(2), step_dir(3)]
    # Once a newer verified one exists, what is older goes, but the one `latest` names (step 3);
    # the set-aside one stays.
    shutil.copytree(ckpts / step_dir(1), ckpts / step_dir(4))
    assert rotate_checkpoints(ckpts, keep_last=1) == [ckpts / step_dir(2), ckpts / step_dir(1)]
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == [
        "step_000000.corrupt", step_dir(3), step_dir(4)]


def test_native_checkpoint_is_checksummed_and_verified(tmp_path):
    torch.manual_seed(0)
    from megatron_qwen2.config import ModelConfig
    from megatron_qwen2.model import Qwen2Model

    cfg = ModelConfig(hidden_size=32, num_layers=1, num_attention_heads=2, num_kv_heads=1, ffn_hidden_size=8,
                      vocab_size=64)
    state = {k: v.detach() for k, v in Qwen2Model(cfg).state_dict().items()}
    out = save_native(state, cfg, tmp_path / "native")
    listed = read_manifest(out)
    assert set(listed) == {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()} - {"manifest.json"}
    assert all(len(rec.checksum) == 16 for rec in listed.values())
    shard = largest(out / "model")
    flip_bit(shard)
    with pytest.raises(CheckpointError, match=f"native is corrupt: model/{shard.name} has checksum"):
        load_native_state(out)
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"native is incomplete: model/{shard.name} is missing"):
        load_native_state(out)
    assert issubclass(CheckpointError, ValueError) and CheckpointError.exit_code == EXIT_CONFIG


@pytest.fixture
def small_disk(tmp_path):
    """A directory on a tmpfs of 8 MiB (needs root: mount)."""
    if os.geteuid() != 0:
        pytest.skip("a small tmpfs needs root (mount -t tmpfs)")
    mnt = tmp_path / "small_disk"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(disk: Path, leave: int) -> None:
    st = os.statvfs(disk)
    free = st.f_bavail * st.f_frsize
    with open(disk / "filler", "wb") as fh:
        fh.write(b"\0" * max(free - leave, 0))


@pytest.mark.parametrize("async_save", [False, True], ids=["blocking", "async"])
def test_full_disk_during_save_keeps_previous_checkpoint(tmp_path, cache, base_run, small_disk, capsys, async_save):
    run_dir = tmp_path / "run"
    shutil.copytree(base_run, run_dir, ignore=shutil.ignore_patterns("checkpoints"))
    ckpts = small_disk / "checkpoints"
    shutil.copytree(base_run / "checkpoints", ckpts)
    (run_dir / "checkpoints").symlink_to(ckpts)
    one = sum(p.stat().st_size for p in (ckpts / step_dir(3)).rglob("*") if p.is_file())
    fill(small_disk, leave=one // 3)  # room for a part of one more checkpoint
    before = contents(ckpts)
    cfg = saving_config(cache, 5 if async_save else 4)
    cfg.train.async_save = async_save  # step 4 is saved in the background, its failure shows at step 5
    code = run_and_record(lambda: train(cfg.validate(1), run_dir), run_dir, 0)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_IO
    seen = run_dir / "checkpoints"  # the path training uses
    assert len(err) == 1 and err[0].startswith(f"error: cannot write checkpoint {seen / step_dir(4)}: ")
    assert "No space left on device (ENOSPC)" in err[0] and str(seen / f".{step_dir(4)}.tmp") in err[0]
    assert "Traceback" not in err[0]
    assert contents(ckpts) == before  # no .step_000004.tmp, step 1-3 and latest byte for byte
    verify_checkpoint(ckpts / step_dir(3))
    outcome = read_outcome(run_dir)
    assert outcome["exit_code"] == EXIT_IO and outcome["step"] == 4


def test_read_only_disk_and_failed_metadata_write(tmp_path, cache, base_run, small_disk, capsys, monkeypatch):
    run_dir = tmp_path / "run"
    shutil.copytree(base_run, run_dir, ignore=shutil.ignore_patterns("checkpoints"))
    ckpts = small_disk / "checkpoints"
    shutil.copytree(base_run / "checkpoints", ckpts)
    (run_dir / "checkpoints").symlink_to(ckpts)
    seen = run_dir / "checkpoints"
    before = contents(ckpts)
    # An I/O error writing DCP's metadata file (rank 0, inside DCP's finish step).
    real_open = open

    def failing_open(path, mode="r", *args, **kwargs):
        if "w" in mode and str(path).endswith("optim/.metadata.tmp"):
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))
        return real_open(path, mode, *args, **kwargs)
    monkeypatch.setattr(native, "open", failing_open, raising=False)
    assert run_and_record(lambda: train(saving_config(cache, 4).validate(1), run_dir), run_dir, 0) == EXIT_IO
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{seen / f'.{step_dir(4)}.tmp'}/optim/.metadata.tmp: Input/output error (EIO)" in err[0]
    assert contents(ckpts) == before
    monkeypatch.undo()
    # A file system that went read-only.
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    assert run_and_record(lambda: train(saving_config(cache, 4).validate(1), run_dir), run_dir, 0) == EXIT_IO
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: cannot write checkpoint {seen / step_dir(4)}: ")
    assert "Read-only file system (EROFS)" in err[0]
    assert contents(ckpts) == before


def test_failure_to_move_latest_undoes_the_rename(tmp_path, cache, base_run, monkeypatch):
    run_dir = copy_run(base_run, tmp_path)
    ckpts = run_dir / "checkpoints"
    before = contents(ckpts)

    def full(root, name):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(root / ".latest.tmp"))
    monkeypatch.setattr(distributed, "point_latest", full)
    with pytest.raises(RunDirError, match=r"\.latest\.tmp: No space left on device \(ENOSPC\)") as caught:
        train(saving_config(cache, 4).validate(1), run_dir)
    assert caught.value.exit_code == EXIT_IO
    assert contents(ckpts) == before  # no step_000004, no .step_000004.tmp, latest as it was


_SLOW_SAVE = """
import sys, time
from pathlib import Path
from megatron_qwen2.checkpoint import distributed, native
from megatron_qwen2.train import train
from tests.checkpoint.test_resume import make_config

run_dir, cache, marker = sys.argv[1:4]
write = native._HashingStream.write

def slow_write(self, data):  # step 2's optimizer state: stop in the middle of writing it
    if ".step_000002.tmp/optim/" in str(getattr(self._file, "name", "")) and self.size > 0:
        Path(marker).touch()
        time.sleep(600)
    return write(self, data)

native._HashingStream.write = slow_write
cfg = make_config(cache, steps=3)
cfg.train.save_interval, cfg.train.keep_last = 1, 0
train(cfg.validate(1), Path(run_dir))
"""


def test_sigkill_in_the_middle_of_a_save_resumes_from_the_previous_checkpoint(tmp_path, cache, tmp_root, capsys):
    run_dir, marker = tmp_path / "run", tmp_path / "saving"
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_SAVE, str(run_dir), str(cache), str(marker)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 180
        while not marker.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert marker.exists(), proc.communicate(timeout=10)[0] if proc.poll() is not None else "no save began"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    ckpts = run_dir / "checkpoints"
    partial = ckpts / f".{step_dir(2)}.tmp"
    assert partial.is_dir() and (ckpts / "latest").read_text().strip() == step_dir(1)
    capsys.readouterr()
    train(saving_config(cache, 3).validate(1), run_dir)
    out = capsys.readouterr().out
    assert f"removed {partial}, left by a save that did not complete" in out
    assert f"resumed from {ckpts / step_dir(1)} at step 1" in out
    assert not partial.exists() and not list(ckpts.glob(".*"))
    assert (ckpts / "latest").read_text().strip() == step_dir(3)
    rows = read_metrics(run_dir)
    ref = reference_run(cache, tmp_root)
    assert [(r["step"], r["loss"]) for r in rows[-2:]] == [(r["step"], r["loss"]) for r in ref[1:3]]


def poison_after_step(n: int, rank: int = 0):
    """Patch the optimizer so that after its n-th step one master weight of `rank` is inf."""
    step = MixedPrecisionOptimizer.step

    def poisoned(self, *args, **kwargs):
        norm = step(self, *args, **kwargs)
        here = dist.get_rank() if dist.is_initialized() else 0
        if self.num_steps == n and here == rank:
            self.fragments[-1].master.view(-1)[0] = float("inf")
        return norm
    return poisoned


def test_nonfinite_state_is_never_saved(tmp_path, cache, base_run, monkeypatch):
    run_dir = copy_run(base_run, tmp_path)
    ckpts = run_dir / "checkpoints"
    before = contents(ckpts)
    monkeypatch.setattr(MixedPrecisionOptimizer, "step", poison_after_step(4))
    with pytest.raises(NonFiniteError, match=f"step 4: a master weight or Adam moment is inf or nan, so "
                                             f"checkpoint {step_dir(4)} was not written") as caught:
        train(saving_config(cache, 4).validate(1), run_dir)
    assert caught.value.exit_code == EXIT_NONFINITE and caught.value.step == 4
    assert contents(ckpts) == before


# ---------------------------------------------------------------------------------------------
# Two gloo ranks, distributed optimizer: each rank writes and checks its own files.


def _two_rank_worker(rank, world_size, cache, run_dir):
    run_dir = Path(run_dir)
    ckpts = run_dir / "checkpoints"
    out = {}
    train(saving_config(cache, 2, distributed_optimizer=True).validate(world_size), run_dir)
    # A bit flip in the largest shard of step 2 that rank 1 checks: both ranks refuse step 2.
    if rank == 0:
        listed = read_manifest(ckpts / step_dir(2))
        out["shares"] = [sorted(_share(listed, r, world_size)) for r in range(2)]
        out["flipped"] = max((rel for rel in out["shares"][1] if rel.endswith(".distcp")),
                             key=lambda rel: listed[rel].size)
        flip_bit(ckpts / step_dir(2) / out["flipped"])
    dist.barrier()
    out["resumed"] = train(saving_config(cache, 3, distributed_optimizer=True).validate(world_size), run_dir)
    dist.barrier()
    # Rank 1 cannot write its optimizer shards (a full disk on its node): both ranks raise the same error.
    real_open = open

    def full_disk_open(path, mode="r", *args, **kwargs):
        if "w" in mode and "/optim/" in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_open(path, mode, *args, **kwargs)
    if rank == 1:
        native.open = full_disk_open
    try:
        train(saving_config(cache, 4, distributed_optimizer=True).validate(world_size), run_dir)
    except RunDirError as e:
        out["full_disk"] = (str(e), e.exit_code)
    finally:
        if rank == 1:
            del native.open
    dist.barrier()
    out["after_full_disk"] = sorted(p.name for p in ckpts.iterdir()) if rank == 0 else None
    # Rank 1's state goes non-finite: one all-reduce stops both before anything is written.
    MixedPrecisionOptimizer.step = poison_after_step(4, rank=1)
    try:
        train(saving_config(cache, 4, distributed_optimizer=True).validate(world_size), run_dir)
    except NonFiniteError as e:
        out["nonfinite"] = str(e)
    return out


def test_two_ranks_corrupt_shard_failed_write_and_nonfinite_state(tmp_path, cache, tmp_root):
    ref = losses(reference_run(cache, tmp_root))
    run_dir = tmp_path / "run"
    results = run_distributed(_two_rank_worker, 2, cache, run_dir)
    shares, flipped = results[0]["shares"], results[0]["flipped"]
    assert shares[0] and shares[1] and not set(shares[0]) & set(shares[1])
    assert flipped in shares[1]
    ckpts = run_dir / "checkpoints"
    with pytest.raises(CheckpointError, match=f"is corrupt: {flipped} has checksum"):
        verify_checkpoint(ckpts / f"{step_dir(2)}.corrupt")  # what both ranks refused, set aside
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 2, 3, 4, 4]  # each failed save came after its step was logged
    for r in rows[2:4]:  # resumed from step 1: the single-process run's losses
        assert r["loss"] == pytest.approx(ref[r["step"]], abs=1e-5)
    assert results[0]["resumed"]["status"] == results[1]["resumed"]["status"] == "completed"
    full = [r["full_disk"] for r in results]
    assert full[0] == full[1] and full[0][1] == EXIT_IO
    assert full[0][0].startswith(f"cannot write checkpoint {ckpts / step_dir(4)}: {ckpts / f'.{step_dir(4)}.tmp'}"
                                 f"/optim/__1_") and "No space left on device (ENOSPC) (rank 1)" in full[0][0]
    assert results[0]["after_full_disk"] == ["latest", step_dir(1), step_dir(2), f"{step_dir(2)}.corrupt", step_dir(3)]
    assert results[0]["nonfinite"] == results[1]["nonfinite"]
    assert f"checkpoint {step_dir(4)} was not written" in results[0]["nonfinite"]
    assert sorted(p.name for p in ckpts.iterdir()) == results[0]["after_full_disk"]
    assert (ckpts / "latest").read_text().strip() == step_dir(3)
    verify_checkpoint(ckpts / step_dir(3))
