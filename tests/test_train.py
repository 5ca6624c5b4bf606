"""The CPU training job: loss falls, the run directory holds config, metrics and a loadable checkpoint."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
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


def test_recompute_keeps_losses_and_gradients():
    from megatron_qwen2.model import Qwen2Model

    cfg = ModelConfig(hidden_size=32, num_layers=3, num_attention_heads=4, num_kv_heads=2, ffn_hidden_size=64,
                      vocab_size=256)
    ids = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(0))
    results = {}
    for mode, n in (("none", None), ("selective", None), ("full", None), ("full", 2)):
        model = Qwen2Model(cfg)
        model.init_weights(seed=3)
        model.set_recompute(mode, n)
        loss = model(ids[:, :-1], labels=ids[:, 1:]).token_loss.mean()
        loss.backward()
        results[(mode, n)] = (loss.detach(), [p.grad.clone() for p in model.parameters()])
    ref_loss, ref_grads = results[("none", None)]
    for key, (loss, grads) in results.items():
        assert torch.equal(loss, ref_loss), key
        assert all(torch.equal(a, b) for a, b in zip(grads, ref_grads)), key
    with pytest.raises(ValueError, match="train.recompute must be"):
        TrainConfig(recompute="some").validate()


def test_learning_rate_schedules():
    from megatron_qwen2.lr_schedule import learning_rate

    cos = OptimConfig(lr=1.0, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    assert learning_rate(0, cos, 110) == pytest.approx(0.1)  # linear warm-up
    assert learning_rate(9, cos, 110) == pytest.approx(1.0)
    assert learning_rate(59, cos, 109) == pytest.approx(0.55)  # half-way down the cosine
    assert learning_rate(109, cos, 110) == pytest.approx(0.1)  # the last step
    assert learning_rate(500, cos, 110) == pytest.approx(0.1)  # 10% of peak after the decay
    sft = OptimConfig(lr=7e-6, warmup_steps=0, schedule="linear", min_lr_ratio=0.1)
    assert learning_rate(0, sft, 101) == pytest.approx(7e-6)
    assert learning_rate(100, sft, 101) == pytest.approx(7e-7)
    const = OptimConfig(lr=2e-4, warmup_steps=2, schedule="constant")
    assert [learning_rate(s, const, 10) for s in (0, 1, 5)] == pytest.approx([1e-4, 2e-4, 2e-4])
    d = OptimConfig()
    assert (d.beta1, d.beta2, d.eps, d.weight_decay, d.clip_grad, d.min_lr_ratio) == (0.9, 0.95, 1e-8, 0.1, 1.0, 0.1)


def test_weight_decay_skips_norms_and_biases():
    from megatron_qwen2.engine.distributed_optimizer import MixedPrecisionOptimizer
    from megatron_qwen2.engine.grad_buffer import GradBuffer
    from megatron_qwen2.model import Qwen2Model

    model = Qwen2Model(ModelConfig(hidden_size=32, num_layers=1, num_attention_heads=4, num_kv_heads=2,
                                   ffn_hidden_size=64, vocab_size=256))
    opt = MixedPrecisionOptimizer(GradBuffer(list(model.parameters())), OptimConfig())
    decay_of = {id(m): g["weight_decay"] for g in opt.optimizer.param_groups for m in g["params"]}
    for name, p in model.named_parameters():
        f = next(f for f in opt.fragments if f.param is p)
        want = 0.0 if name.endswith("bias") or "norm" in name else 0.1
        assert decay_of[id(f.master)] == want, name


def test_global_batch_must_be_micro_times_accumulation_times_dp():
    from megatron_qwen2.config import ParallelConfig

    cfg = Config(parallel=ParallelConfig(tp=2), train=TrainConfig(micro_batch_size=4, global_batch_size=12))
    with pytest.raises(ValueError, match=r"global_batch_size=12 is not divisible by train.micro_batch_size=4 x dp=2"):
        cfg.validate(4)
    for field_, value, needle in (("on_nonfinite", "ignore", "train.on_nonfinite"),
                                  ("keep_last", -1, "train.keep_last"), ("recompute", "all", "train.recompute")):
        bad = TrainConfig(**{field_: value})
        with pytest.raises(ValueError, match=needle):
            bad.validate()


def test_metrics_logger_groups_names_and_prints_console_line(tmp_path, capsys):
    from megatron_qwen2.config import WandbConfig
    from megatron_qwen2.metrics import MetricsLogger, wandb_name

    assert [wandb_name(k) for k in ("loss", "tokens_per_s", "mem_peak_gib", "consumed_tokens", "moe_load_max")] == \
        ["train/loss", "perf/tokens_per_s", "mem/peak_gib", "data/consumed_tokens", "moe/load_max"]
    logger = MetricsLogger(tmp_path, WandbConfig(enabled=False), {}, log_interval=5, total_steps=10)
    logger.log({"step": 1, "loss": 2.5, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_s": 1234.0, "mfu": 0.41,
                "mem_peak_gib": 3.2})
    logger.log({"step": 2, "loss": 2.4})
    logger.close()
    out = capsys.readouterr().out.splitlines()
    assert out == ["step 1/10 | loss 2.5000 | lr 1.000e-03 | gnorm 0.500 | 1,234 tok/s | mfu 41.0% | mem 3.2 GiB"]
    assert len(read_metrics(tmp_path)) == 2
