"""Data faults: a flipped byte or a truncated .bin, a missing prefix / SFT file / corpus, and
tools/preprocess_data.py onto an existing prefix. Each is injected, then the test checks the
message (one line naming the file), the exit code and what is left on disk."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_qwen2 import train as train_module
from megatron_qwen2.config import Config, DataConfig, ModelConfig, OptimConfig, TrainConfig
from megatron_qwen2.data import build_datasets, write_indexed_dataset
from megatron_qwen2.data.preprocess import main as preprocess_main
from megatron_qwen2.errors import EXIT_CONFIG, DataError
from megatron_qwen2.train import train
from tests.distributed import run_distributed

ROOT = Path(__file__).resolve().parents[2]
MODEL = dict(hidden_size=32, num_layers=1, num_attention_heads=4, num_kv_heads=2, ffn_hidden_size=64,
             vocab_size=4096)
SEQ, GBS, CHUNK_BYTES = 32, 4, 64  # a window is 33 uint16 tokens = 66 bytes: each touches 2-3 chunks


def make_prefix(path: Path) -> Path:
    """60 documents of 10..29 tokens below the repo tokenizer's 4096, each ending with EOD (id 0)."""
    rng = np.random.default_rng(0)
    docs = [np.append(rng.integers(3, 4096, size=10 + i % 20), 0) for i in range(60)]
    write_indexed_dataset(path, docs, vocab_size=4096, chunk_bytes=CHUNK_BYTES)
    return path


def config(data: DataConfig, steps: int) -> Config:
    return Config(model=ModelConfig(**MODEL), optim=OptimConfig(lr=1e-3, warmup_steps=1), data=data,
                  train=TrainConfig(steps=steps, micro_batch_size=GBS, global_batch_size=GBS, seq_length=SEQ,
                                    log_interval=1)).validate(1)


def chunks_read(data_cfg: DataConfig, step: int) -> set[int]:
    """The chunks of the .bin that global batch `step` reads."""
    dataset, _ = build_datasets(data_cfg, SEQ, TrainConfig().seed)
    starts = dataset.window_starts(np.arange(step * GBS, (step + 1) * GBS))
    return {int(k) for s in starts for k in range(s * 2 // CHUNK_BYTES, ((s + SEQ + 1) * 2 - 1) // CHUNK_BYTES + 1)}


def flip_bit(path: Path, at: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[at] ^= 0x04
    path.write_bytes(bytes(raw))


def one_line_error(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr and len(lines) == 1, stderr
    return lines[0]


def test_flipped_byte_stops_the_run_before_its_tokens_are_trained_on(tmp_path):
    prefix = make_prefix(tmp_path / "d")
    bin_path = Path(f"{prefix}.bin")
    data = DataConfig(paths=[str(prefix)])
    earlier = chunks_read(data, 0) | chunks_read(data, 1)
    corrupt = min(chunks_read(data, 2) - earlier)  # first read by step 3's batch
    flip_bit(bin_path, corrupt * CHUNK_BYTES + 1)
    started = []
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with pytest.raises(DataError) as err:
        train(config(data, steps=5), run_dir, on_step_start=started.append)
    assert str(err.value).startswith(f"{bin_path}: bytes [{corrupt * CHUNK_BYTES}, {(corrupt + 1) * CHUNK_BYTES}) "
                                     "fail their checksum")
    assert "\n" not in str(err.value)
    assert started == [0, 1, 2]  # steps 1 and 2 trained; step 3 stopped while reading its batch
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2


def _read_on_rank(rank, world_size, prefix, run_dir):
    cfg = config(DataConfig(paths=[str(prefix)]), steps=2)
    cfg.train.micro_batch_size = GBS // world_size
    try:
        train(cfg, run_dir)
    except DataError as err:
        return str(err)
    return None


def test_every_data_parallel_rank_detects_the_corrupt_chunk(tmp_path):
    prefix = make_prefix(tmp_path / "d")
    data = DataConfig(paths=[str(prefix)])
    flip_bit(Path(f"{prefix}.bin"), min(chunks_read(data, 0)) * CHUNK_BYTES)
    (tmp_path / "run").mkdir()
    messages = run_distributed(_read_on_rank, 2, prefix, tmp_path / "run")
    assert all(m is not None and m.startswith(f"{prefix}.bin: bytes") for m in messages), messages


def test_command_line_exits_2_with_one_line(tmp_path):
    prefix = make_prefix(tmp_path / "d")
    data = DataConfig(paths=[str(prefix)])
    flip_bit(Path(f"{prefix}.bin"), min(chunks_read(data, 0)) * CHUNK_BYTES + 3)
    base = [sys.executable, "-m", "megatron_qwen2.train", "model=tiny", "model.num_layers=1", "train.steps=2",
            f"train.seq_length={SEQ}", f"train.global_batch_size={GBS}", f"train.micro_batch_size={GBS}"]
    res = subprocess.run(base + [f"data.paths=['{prefix}']", f"hydra.run.dir={tmp_path / 'run'}"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == EXIT_CONFIG, res.stderr
    assert f"{prefix}.bin: bytes" in one_line_error(res.stderr) and "fail their checksum" in res.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()

    missing = tmp_path / "nowhere" / "corpus"
    res = subprocess.run(base + [f"data.paths=['{missing}']", f"hydra.run.dir={tmp_path / 'run2'}"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == EXIT_CONFIG, res.stderr
    assert f"no file {missing}.idx; make the pair with tools/preprocess_data.py" in one_line_error(res.stderr)


@pytest.fixture
def no_model(monkeypatch):
    """Building the model fails the test: data errors must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was built before the data was checked")
    monkeypatch.setattr(train_module, "TrainingStep", refuse)


def expect_data_error(data: DataConfig, run_dir: Path, match: str) -> str:
    run_dir.mkdir()
    with pytest.raises(DataError, match=match) as err:
        train(config(data, steps=1), run_dir)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_truncated_bin_is_refused_before_the_model_is_built(tmp_path, no_model):
    prefix = make_prefix(tmp_path / "d")
    bin_path = Path(f"{prefix}.bin")
    raw = bin_path.read_bytes()
    bin_path.write_bytes(raw[:-100])
    expect_data_error(DataConfig(paths=[str(prefix)]), tmp_path / "run",
                      rf"{bin_path}: {len(raw) - 100} bytes, but .* = {len(raw)} bytes \(truncated")
    assert bin_path.read_bytes() == raw[:-100]  # the reader never writes


def test_missing_inputs_are_named_before_the_model_is_built(tmp_path, no_model):
    prefix = make_prefix(tmp_path / "d")
    expect_data_error(DataConfig(paths=[str(prefix), str(tmp_path / "gone")]), tmp_path / "r1",
                      rf"data prefix '{tmp_path / 'gone'}': no file {tmp_path / 'gone'}.idx")
    expect_data_error(DataConfig(paths=[f"{prefix}.bin"]), tmp_path / "r2",
                      rf"data.paths takes the prefix without its suffix: '{prefix}'")
    expect_data_error(DataConfig(format="sft", paths=[str(tmp_path / "chat.jsonl")]), tmp_path / "r3",
                      rf"no SFT file {tmp_path / 'chat.jsonl'}")
    expect_data_error(DataConfig(corpus=str(tmp_path / "texts" / "*.txt")), tmp_path / "r4",
                      rf"data.corpus='{tmp_path / 'texts' / '[*]'}.txt' matches no files")


def test_preprocess_refuses_an_existing_prefix_unless_overwrite(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("first corpus " * 200)
    (tmp_path / "b.txt").write_text("second, shorter corpus")
    prefix = tmp_path / "out" / "corpus"
    assert preprocess_main(["--input", str(tmp_path / "a.txt"), "--output-prefix", str(prefix), "--quiet"]) == 0
    files = [Path(f"{prefix}.bin"), Path(f"{prefix}.idx")]
    before = [(p.read_bytes(), p.stat().st_mtime_ns) for p in files]

    res = subprocess.run([sys.executable, "tools/preprocess_data.py", "--input", str(tmp_path / "b.txt"),
                          "--output-prefix", str(prefix)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == EXIT_CONFIG
    assert f"{files[0]} and {files[1]} already exist; pass --overwrite" in one_line_error(res.stderr)
    assert [(p.read_bytes(), p.stat().st_mtime_ns) for p in files] == before
    assert sorted(p.name for p in prefix.parent.iterdir()) == ["corpus.bin", "corpus.idx"]  # no temporaries

    files[0].unlink()  # either file alone blocks the prefix too
    assert preprocess_main(["--input", str(tmp_path / "b.txt"), "--output-prefix", str(prefix), "--quiet"]) == 2
    assert f"{files[1]} already exists; pass --overwrite" in one_line_error(capsys.readouterr().err)
    assert files[1].read_bytes() == before[1][0]

    assert preprocess_main(["--input", str(tmp_path / "b.txt"), "--output-prefix", str(prefix), "--quiet",
                            "--overwrite"]) == 0
    assert files[0].stat().st_size < len(before[0][0]) and files[1].read_bytes() != before[1][0]
    data = build_datasets(DataConfig(paths=[str(prefix)]), 2, 1)[0]  # the replacement pair reads back whole
    data.data.verify()
