"""Training checkpoints: exact resume after SIGTERM, resume under another layout, HF import -> train
-> HF export, corrupt checkpoints refused, keep-last rotation, non-finite steps."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megatron_qwen2.checkpoint import load_model, load_model_config
from megatron_qwen2.checkpoint.distributed import CheckpointError, find_resume_checkpoint, verify_checkpoint
from megatron_qwen2.config import Config, DataConfig, ModelConfig, OptimConfig, ParallelConfig, TrainConfig
from megatron_qwen2.engine.distributed_optimizer import MixedPrecisionOptimizer
from megatron_qwen2.train import EXIT_PREEMPTED, NonFiniteError, train
from tests.distributed import run_distributed

ROOT = Path(__file__).resolve().parents[2]
MODEL = dict(hidden_size=32, num_layers=4, num_attention_heads=4, num_kv_heads=2, ffn_hidden_size=64,
             vocab_size=4096, tie_word_embeddings=True)
MOE = dict(MODEL, num_experts=4, moe_top_k=2, moe_ffn_hidden_size=16, shared_expert_ffn_hidden_size=32)
STEPS, STOP_AT = 4, 2


def make_config(cache_dir, steps=STEPS, model=None, **parallel) -> Config:
    return Config(
        model=ModelConfig(**(model or MODEL)),
        parallel=ParallelConfig(bucket_size=3000, **parallel),
        optim=OptimConfig(lr=3e-3, warmup_steps=1, clip_grad=0.5, decay_steps=3),  # lr independent of train.steps
        data=DataConfig(max_files=20, cache_dir=str(cache_dir), split=[0.9, 0.1]),
        train=TrainConfig(steps=steps, micro_batch_size=1, global_batch_size=4, seq_length=16, log_interval=100,
                          eval_interval=2, eval_iters=1),
    )


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(rows) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in rows}


def sigterm_at(step_to_stop: int, only_rank0: bool = True):
    """A train() hook that sends this process SIGTERM during step `step_to_stop` (1-based)."""
    def hook(step):  # step: 0-based index of the step starting now
        if step + 1 == step_to_stop and (not only_rank0 or int(os.environ.get("RANK", "0")) == 0):
            os.kill(os.getpid(), signal.SIGTERM)
    return hook


def _train_worker(rank, world_size, cfg, run_dir, stop_at):
    return train(cfg.validate(world_size), run_dir, on_step_start=sigterm_at(stop_at) if stop_at else None)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


_references: dict = {}


def reference_run(cache, tmp_root, model=None) -> list[dict]:
    """One uninterrupted single-process run per model."""
    key = "moe" if model else "dense"
    if key not in _references:
        run_dir = tmp_root / f"reference-{key}"
        train(make_config(cache, model=model).validate(1), run_dir)
        _references[key] = read_metrics(run_dir)
    return _references[key]


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory):
    return tmp_path_factory.mktemp("references")


@pytest.fixture(scope="module")
def reference(cache, tmp_root):
    return reference_run(cache, tmp_root)


def test_sigterm_then_resume_is_bitwise_identical(tmp_path, cache, reference):
    run_dir = tmp_path / "run"
    result = train(make_config(cache).validate(1), run_dir, on_step_start=sigterm_at(STOP_AT))
    assert result["status"] == "preempted" and result["step"] == STOP_AT
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{STOP_AT:06d}"
    state = json.loads((run_dir / "checkpoints" / f"step_{STOP_AT:06d}" / "train_state.json").read_text())
    assert state["consumed_samples"] == STOP_AT * 4 and state["optimizer_step"] == STOP_AT
    assert train(make_config(cache).validate(1), run_dir)["status"] == "completed"
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # appended across the restart
    for mine, ref in zip(rows, reference):
        assert mine["loss"] == ref["loss"] and mine["grad_norm"] == ref["grad_norm"], (mine, ref)
        assert mine.get("val_loss") == ref.get("val_loss")
    assert "val_loss" in rows[1] and "val_loss" not in rows[0]


@pytest.mark.parametrize("model, world, first, second", [
    (None, 4, dict(tp=2, pp=2, async_save=True), dict()),  # tp 2 x pp 2 -> one process
    (None, 4, dict(), dict(tp=2, pp=2)),  # and the reverse
    (None, 4, dict(pp=2, distributed_optimizer=True), dict()),  # pp 2 x dp 2, masters and Adam state sharded
    (None, 4, dict(tp=4), dict()),  # 2 kv heads replicated over 4 tp ranks: each written once
    (MOE, 2, dict(ep=2, distributed_optimizer=True), dict()),  # experts sharded over ep 2
    # Parallel folding: etp 2 over the tp pair x ep 2 over dp -> ep 4 over tp 2 x dp 2, and ep 4 over
    # cp 2 x dp 2 -> one process (master weights and Adam state of experts split over etp and ep)
    (MOE, 4, dict(tp=2, ep=2, etp=2, distributed_optimizer=True), dict(tp=2, ep=4, sequence_parallel=False)),
    (MOE, 4, dict(cp=2, ep=4, distributed_optimizer=True), dict()),
])
def test_resume_under_another_layout(tmp_path, cache, tmp_root, model, world, first, second):
    reference = reference_run(cache, tmp_root, model)
    run_dir = tmp_path / "run"
    for i, par in enumerate((first, second)):
        par = dict(par)
        async_save = par.pop("async_save", False)
        cfg = make_config(cache, model=model, **par)
        if async_save:  # a background save after step 1, then the blocking one at the stop
            cfg.train.async_save, cfg.train.save_interval, cfg.train.keep_last = True, 1, 0
        procs = world if par else 1
        stop_at = STOP_AT if i == 0 else None
        if procs == 1:
            train(cfg.validate(1), run_dir, on_step_start=sigterm_at(stop_at) if stop_at else None)
        else:
            results = run_distributed(_train_worker, procs, cfg, run_dir, stop_at)
            assert {r["status"] for r in results} == {"preempted" if i == 0 else "completed"}
    if first.get("async_save"):
        assert (run_dir / "checkpoints" / "step_000001" / "manifest.json").is_file()
    rows = losses(read_metrics(run_dir))
    ref = losses(reference)
    assert sorted(rows) == list(range(1, STEPS + 1))
    for step in rows:
        assert rows[step] == pytest.approx(ref[step], abs=1e-5), step
    val = [r["val_loss"] for r in read_metrics(run_dir) if "val_loss" in r]
    assert val == pytest.approx([r["val_loss"] for r in reference if "val_loss" in r], abs=1e-5)


def _hf_worker(rank, world_size, cfg, run_dir):
    return train(cfg.validate(world_size), run_dir)


def test_hf_to_native_train_tp2_pp2_export_to_hf(tmp_path, cache):
    transformers = pytest.importorskip("transformers")
    from megatron_qwen2.checkpoint.convert import hf_to_native_dir, native_to_hf_dir

    torch.manual_seed(0)
    hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=4096, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, tie_word_embeddings=True, max_position_embeddings=256))
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    hf.save_pretrained(tmp_path / "hf")
    native = hf_to_native_dir(tmp_path / "hf", tmp_path / "native")
    model_cfg = load_model_config(native)

    def config(**par):
        cfg = make_config(cache, steps=1, **par)
        cfg.model = dataclasses.replace(model_cfg)
        cfg.train.init_from = str(native)
        cfg.train.eval_interval = 0
        return cfg

    run_dir = tmp_path / "run"
    run_distributed(_hf_worker, 4, config(tp=2, pp=2), run_dir)
    native_to_hf_dir(run_dir / "checkpoints", tmp_path / "hf_out")
    single_dir = tmp_path / "single"
    train(config().validate(1), single_dir)  # the same step in one process
    in_memory = load_model(single_dir / "checkpoints")

    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf_out").eval()
    ids = torch.randint(0, 4096, (2, 12))
    with torch.no_grad():
        got = exported(ids).logits
        want = in_memory(ids)
        before = hf.eval()(ids).logits
    assert (got - before).abs().max() > 1e-4  # the step changed the model
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_corrupt_checkpoint_is_refused_and_previous_used(tmp_path, cache, reference):
    run_dir = tmp_path / "run"
    cfg = make_config(cache, steps=3)
    cfg.train.save_interval = 1
    cfg.train.keep_last = 2
    train(cfg.validate(1), run_dir)
    ckpts = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == ["step_000002", "step_000003"]  # keep-last 2
    # Truncate a shard of the newest: refused with a reason, the previous one is used instead.
    shard = next((ckpts / "step_000003" / "optim").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-7])
    with pytest.raises(CheckpointError, match="optim/.*has .* bytes, the manifest says"):
        verify_checkpoint(ckpts / "step_000003")
    said = []
    assert find_resume_checkpoint(ckpts, log=said.append) == ckpts / "step_000002"
    assert "refusing" in said[0] and "step_000003" in said[0]
    # A half-written directory (no manifest) is refused too.
    (ckpts / "step_000002" / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        verify_checkpoint(ckpts / "step_000002")
    (ckpts / "step_000003").rename(ckpts / "broken")
    (ckpts / "latest").write_text("step_000003\n")
    assert find_resume_checkpoint(ckpts, log=said.append) is None
    with pytest.raises(CheckpointError, match="none is usable"):  # never silently start afresh over them
        train(cfg.validate(1), run_dir)


def test_corrupt_latest_resumes_from_previous_with_same_losses(tmp_path, cache, reference):
    run_dir = tmp_path / "run"
    cfg = make_config(cache, steps=3)
    cfg.train.save_interval = 2
    train(cfg.validate(1), run_dir)  # saves step 2 and step 3
    (run_dir / "checkpoints" / "step_000003" / "model" / ".metadata").write_bytes(b"garbage")
    cfg.train.steps = STEPS
    train(cfg.validate(1), run_dir)  # resumes from step 2
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 3, 4]
    assert [r["loss"] for r in rows[3:]] == [r["loss"] for r in reference[2:STEPS]]


def test_command_line_sigterm_exits_75_and_resumes(tmp_path):
    run_dir = tmp_path / "cli"
    cmd = [sys.executable, "-m", "megatron_qwen2.train", "model=tiny", "model.num_layers=1", "model.hidden_size=32",
           "model.ffn_hidden_size=32", "train.steps=3000", "train.seq_length=16", "train.micro_batch_size=2",
           "train.global_batch_size=2", f"data.cache_dir={tmp_path / 'cache'}", "data.max_files=5",
           "train.log_interval=1000", f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        if (run_dir / "metrics.jsonl").exists() and len(read_metrics(run_dir)) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, err
    assert "SIGTERM received: saved checkpoint" in out
    stopped = len(read_metrics(run_dir))
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{stopped:06d}"
    more = cmd[:-1] + [f"train.steps={stopped + 2}", f"hydra.run.dir={run_dir}"]
    res = subprocess.run([c for c in more if c != "train.steps=3000"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{stopped:06d}'}" in res.stdout
    assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, stopped + 3))


def test_nonfinite_grad_skips_without_touching_state_or_stops(tmp_path, cache, monkeypatch):
    seen = []
    original = MixedPrecisionOptimizer.grad_norm

    def poisoned(self):
        seen.append([t.clone() for f in self.fragments for t in (f.master, *self.optimizer.state[f.master].values())]
                    if self.optimizer.state else None)
        return float("nan") if len(seen) == 2 else original(self)

    monkeypatch.setattr(MixedPrecisionOptimizer, "grad_norm", poisoned)
    cfg = make_config(cache, steps=3)
    cfg.train.eval_interval = 0
    run_dir = tmp_path / "skip"
    train(cfg.validate(1), run_dir)
    rows = read_metrics(run_dir)
    assert rows[1].get("skipped") and not rows[0].get("skipped") and not rows[2].get("skipped")
    for a, b in zip(seen[1], seen[2]):  # masters and Adam state before and after the skipped step
        assert torch.equal(a, b)
    seen.clear()
    cfg.train.on_nonfinite = "stop"
    with pytest.raises(NonFiniteError, match="step 2: non-finite"):
        train(cfg.validate(1), tmp_path / "stop")


def test_flat_ranges_cut_into_boxes_placed_globally():
    from megatron_qwen2.checkpoint.sharding import Region, ShardSpec, flat_pieces

    # A [6, 4] local tensor whose rows 0-2 sit at global rows 10-12 and rows 3-5 at 0-2 (written elsewhere).
    spec = ShardSpec((20, 4), (Region((0, 0), (3, 4), (10, 0), True), Region((3, 0), (3, 4), (0, 0), False)))
    local = torch.arange(24.0).view(6, 4)
    for start in range(24):
        for end in range(start + 1, 25):
            flat = local.flatten()[start:end].clone()  # a distributed-optimizer fragment
            glob = torch.full((20, 4), -1.0)
            pieces = flat_pieces(spec, (6, 4), start, end)
            for pc in pieces:
                box = tuple(slice(o, o + n) for o, n in zip(pc.global_offsets, pc.sizes))
                assert (glob[box] == -1).all()  # no overlap
                glob[box] = pc.view(flat, start)
                assert pc.writer == (pc.global_offsets[0] >= 10)
            assert sum(pc.view(flat, start).numel() for pc in pieces) == end - start
            for i in range(start, end):
                r, c = divmod(i, 4)
                assert glob[r + 10 if r < 3 else r - 3, c] == i
