"""A requeued job continues the same wandb run: the run id is kept in the run dir (offline wandb)."""

import os
import re

import pytest

from megatron_qwen2.config import WandbConfig
from megatron_qwen2.metrics import WANDB_RUN_ID_FILE, MetricsLogger

wandb = pytest.importorskip("wandb")


def start(run_dir, step):
    """One start of a job in run_dir (a first start, then its requeue): log one step, close."""
    logger = MetricsLogger(run_dir, WandbConfig(enabled=True, mode="offline"), {"x": 1})
    run_id = logger.wandb.id
    logger.log({"step": step, "loss": 1.0 / step})
    logger.close()
    return run_id


def test_every_start_in_a_run_dir_continues_one_wandb_run(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run"
    first = start(run_dir, 1)
    assert (run_dir / WANDB_RUN_ID_FILE).read_text().strip() == first
    assert start(run_dir, 2) == first
    offline = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))
    # offline-run-<time>-<id>, with -1 appended when both started in the same second
    assert len(offline) == 2 and all(re.fullmatch(rf"offline-run-\d+_\d+-{first}(-\d+)?", n) for n in offline), offline
    # Another run dir is another wandb run.
    assert start(tmp_path / "other", 1) != first


def test_wandb_run_id_from_the_environment_is_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_RUN_ID", "given123")
    assert start(tmp_path, 1) == "given123"
    monkeypatch.delenv("WANDB_RUN_ID")
    assert start(tmp_path, 2) == "given123"
    assert os.path.exists(tmp_path / WANDB_RUN_ID_FILE)
