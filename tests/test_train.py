"""The CPU training job: loss falls, the run directory holds config, metrics and a loadable checkpoint."""

import json
import subprocess
import sys
from pathlib import Path

import torch

from megatron_qwen2.checkpoint import load_model
from megatron_qwen2.config import Config, DataConfig, ModelConfig, OptimConfig, TrainConfig
from megatron_qwen2.train import train

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(tmp_path, **model):
    return Config(
        model=ModelConfig(hidden_size=64, num_layers=2, num_attention_heads=4, num_kv_heads=2, ffn_hidden_size=128,
                          vocab_size=4096, tie_word_embeddings=True, **model),
        optim=OptimConfig(lr=3e-3, warmup_steps=5),
        data=DataConfig(max_files=40, cache_dir=str(tmp_path / "cache")),
        train=TrainConfig(steps=40, micro_batch_size=4, global_batch_size=8, seq_length=64, log_interval=100),
    ).validate()


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_loss_falls_and_checkpoint_loads(tmp_path):
    cfg = tiny_config(tmp_path)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    train(cfg, run_dir)
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 41))
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s"} <= set(rows[0])
    first, last = sum(r["loss"] for r in rows[:5]) / 5, sum(r["loss"] for r in rows[-5:]) / 5
    assert last < first - 1.0, (first, last)
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_000040"
    model = load_model(run_dir / "checkpoints")
    ids = torch.randint(0, 4096, (1, 10))
    assert model(ids).shape == (1, 10, 4096)


def test_moe_training_logs_aux_loss(tmp_path):
    cfg = tiny_config(tmp_path, num_experts=4, moe_top_k=2, moe_ffn_hidden_size=32, shared_expert_ffn_hidden_size=64)
    cfg.train.steps = 3
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    train(cfg, run_dir)
    rows = read_metrics(run_dir)
    assert len(rows) == 3 and all(r["aux_loss"] > 0 for r in rows)


def test_command_line_writes_run_dir(tmp_path):
    run_dir = tmp_path / "cli_run"
    cmd = [sys.executable, "-m", "megatron_qwen2.train", "model=tiny", "model.num_layers=1", "train.steps=3",
           "train.seq_length=32", f"data.cache_dir={tmp_path / 'cache'}", "data.max_files=20",
           f"hydra.run.dir={run_dir}"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert len(read_metrics(run_dir)) == 3
    assert "num_layers: 1" in (run_dir / "config.yaml").read_text()


def test_command_line_rejects_bad_value_cleanly(tmp_path):
    run_dir = tmp_path / "bad"
    cmd = [sys.executable, "-m", "megatron_qwen2.train", "model.num_kv_heads=3", f"hydra.run.dir={run_dir}"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert "model.num_attention_heads=4 is not divisible by model.num_kv_heads=3" in res.stderr
    assert "Traceback" not in res.stderr
    assert not (run_dir / "metrics.jsonl").exists()
