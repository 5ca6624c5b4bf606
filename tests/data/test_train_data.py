"""The training loop on preprocessed and SFT data: the loss is the mean over the global batch's counted labels,
however micro-batches and data-parallel ranks cut the batch."""

import json
from pathlib import Path

import pytest
import torch

from megatron_qwen2.config import Config, DataConfig, ModelConfig, OptimConfig, TrainConfig
from megatron_qwen2.data import build_datasets
from megatron_qwen2.data.preprocess import preprocess
from megatron_qwen2.model import Qwen2Model
from megatron_qwen2.train import train
from tests.distributed import run_distributed

CHAT = str(Path(__file__).resolve().parent / "assets" / "chat.jsonl")
MODEL = dict(hidden_size=32, num_layers=1, num_attention_heads=4, num_kv_heads=2, ffn_hidden_size=64,
             vocab_size=4096)


def config(data: DataConfig, steps=2, mbs=1, gbs=4, seq=48) -> Config:
    return Config(model=ModelConfig(**MODEL), optim=OptimConfig(lr=1e-3, warmup_steps=1), data=data,
                  train=TrainConfig(steps=steps, micro_batch_size=mbs, global_batch_size=gbs, seq_length=seq,
                                    log_interval=1))


def _worker(rank, world_size, cfg, run_dir):
    train(cfg, run_dir)
    return rank


def run(cfg, run_dir):
    run_dir.mkdir()
    train(cfg.validate(1), run_dir)
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_train_on_preprocessed_blend_with_document_masks(tmp_path):
    texts = [f"def f{i}(x):\n    return x * {i}\n" * (1 + i % 4) for i in range(30)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    for i in range(3):
        (tmp_path / f"b{i}.txt").write_text(f"plain text document {i}. " * 60)
    preprocess([str(tmp_path / "a.jsonl")], None, tmp_path / "a", workers=1, progress=False)
    preprocess([str(tmp_path / "b*.txt")], None, tmp_path / "b", workers=1, progress=False)
    data = DataConfig(paths=[0.6, str(tmp_path / "a"), 0.4, str(tmp_path / "b")], split=[9, 1],
                      reset_position_ids=True, reset_attention_mask=True, eod_mask_loss=True)
    cfg = config(data, steps=3)
    cfg.model.num_layers = 2
    rows = run(cfg, tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(7.0 < r["loss"] < 9.5 for r in rows)  # about ln(4096) = 8.3 at the start
    # Two pipeline stages: both get each micro-batch's positions, document ids and loss mask.
    cfg.parallel.pp = 2
    (tmp_path / "pp2").mkdir()
    run_distributed(_worker, 2, cfg, tmp_path / "pp2")
    pp = [json.loads(line) for line in (tmp_path / "pp2" / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(pp, rows):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


def reference_loss(cfg: Config) -> tuple[float, float]:
    """(loss of global batch 0 at the initial weights, mean of per-micro-batch means) computed directly."""
    batch = build_datasets(cfg.data, cfg.train.seq_length, cfg.train.seed)[0].global_batch(0, 4)
    model = Qwen2Model(cfg.model)
    model.init_weights(cfg.train.seed)
    with torch.no_grad():
        token_loss = model(batch.tokens[:, :-1], labels=batch.tokens[:, 1:]).token_loss  # [4, s]
    mask = batch.loss_mask
    per_row = (token_loss * mask).sum(1) / mask.sum(1)
    return float((token_loss * mask).sum() / mask.sum()), float(per_row.mean())


def test_sft_loss_is_normalised_over_the_global_batch(tmp_path):
    data = DataConfig(format="sft", paths=[CHAT])
    one = run(config(data, mbs=4), tmp_path / "mbs4")
    four = run(config(data, mbs=1), tmp_path / "mbs1")
    want, mean_of_means = reference_loss(config(data))
    assert one[0]["loss"] == pytest.approx(want, rel=1e-5)
    assert abs(want - mean_of_means) > 1e-3  # the rows' label counts differ: the normalisation matters
    for a, b in zip(one, four):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    # Two data-parallel ranks, each with its own share of the counted labels, train the same model.
    (tmp_path / "dp2").mkdir()
    run_distributed(_worker, 2, config(data, mbs=1), tmp_path / "dp2")
    dp = [json.loads(line) for line in (tmp_path / "dp2" / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(dp, four):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
