"""Each data-parallel rank reads only its rows of a global batch, prepared ahead by a thread: the rows
equal the matching slice of the whole global batch for every dataset kind, the thread hands out the
batches of the synchronous read and re-raises its errors, and the step logs the time it waited."""

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_qwen2.config import Config, DataConfig, ModelConfig, OptimConfig, TrainConfig, WandbConfig
from megatron_qwen2.data import BatchPrefetcher, build_datasets, read_on_every_rank, write_indexed_dataset
from megatron_qwen2.errors import DataError
from megatron_qwen2.metrics import MetricsLogger, wandb_name
from megatron_qwen2.train import train
from tests.distributed import run_distributed

CHAT = str(Path(__file__).resolve().parent / "assets" / "chat.jsonl")
SEQ = 16


def prefix(path: Path, seed: int) -> str:
    """Documents of 3..40 random tokens below 4096, each ending with EOD (0)."""
    rng = np.random.default_rng(seed)
    write_indexed_dataset(path, [np.append(rng.integers(3, 4096, int(rng.integers(3, 41))), 0) for _ in range(60)],
                          vocab_size=4096)
    return str(path)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """One training dataset of every kind that build_datasets makes."""
    root = tmp_path_factory.mktemp("local")
    texts = root / "texts"
    texts.mkdir()
    for i in range(4):
        (texts / f"t{i}.txt").write_text(f"text {i}: " + "the quick brown fox jumps over the lazy dog. " * (20 + i))
    a, b = prefix(root / "a", 1), prefix(root / "b", 2)
    masks = dict(reset_position_ids=True, reset_attention_mask=True, eod_mask_loss=True)
    configs = {
        "corpus": DataConfig(corpus=str(texts), cache_dir=str(root / "cache")),
        "corpus_masks": DataConfig(corpus=str(texts), cache_dir=str(root / "cache"), **masks),
        "packed": DataConfig(paths=[a]),
        "packed_masks": DataConfig(paths=[a], **masks),
        "blended_masks": DataConfig(paths=[0.7, a, 0.3, b], **masks),
        "sft": DataConfig(format="sft", paths=[CHAT]),
        "sft_packed": DataConfig(format="sft", paths=[CHAT, CHAT], sft_packing=True),
    }
    return {name: build_datasets(cfg, SEQ, 1234)[0] for name, cfg in configs.items()}


def assert_same_rows(a, b):
    for field in ("tokens", "loss_mask", "position_ids", "document_ids"):
        x, y = getattr(a, field), getattr(b, field)
        assert (x is None) == (y is None), field
        if x is not None:
            assert x.dtype == y.dtype and torch.equal(x, y), field


@pytest.mark.parametrize("kind", ["corpus", "corpus_masks", "packed", "packed_masks", "blended_masks", "sft",
                                  "sft_packed"])
def test_local_rows_are_the_matching_slice_of_the_global_batch(datasets, kind):
    ds = datasets[kind]
    gbs = 8
    for step in (0, 3, 2 * len(ds) // gbs + 1):  # the last one lies in a later epoch
        whole = ds.global_batch(step, gbs)
        for dp in (1, 2, 4, 8):
            n = gbs // dp
            parts = [ds.local_batch(step, gbs, rank, dp) for rank in range(dp)]
            for rank, part in enumerate(parts):
                assert_same_rows(part, whole[rank * n:(rank + 1) * n])
            assert sum(p.num_loss_tokens() for p in parts) == whole.num_loss_tokens()


def recording(read, log: list, tag):
    """`read` (a dataset's samples method) that first logs (tag, index) for each sample index asked for."""
    def samples(indices):
        log.extend((tag, int(i)) for i in indices)
        return read(indices)
    return samples


def test_local_rows_read_only_their_samples(datasets):
    ds = datasets["packed"]
    asked = []
    ds.samples = recording(ds.samples, asked, 0)
    try:
        ds.local_batch(5, 16, 3, 4)
    finally:
        del ds.samples
    assert asked == [(0, 5 * 16 + 12), (0, 5 * 16 + 13), (0, 5 * 16 + 14), (0, 5 * 16 + 15)]
    blended, asked = datasets["blended_masks"], []  # its datasets are asked only for these rows' samples
    for d, inner in enumerate(blended.datasets):
        inner.samples = recording(inner.samples, asked, d)
    try:
        blended.local_batch(5, 16, 3, 4)
    finally:
        for inner in blended.datasets:
            del inner.samples
    which, index = blended.locate(np.arange(5 * 16 + 12, 5 * 16 + 16))
    assert sorted(asked) == sorted(zip(which.tolist(), index.tolist()))
    with pytest.raises(ValueError, match="multiple of dp"):
        ds.local_batch(0, 6, 0, 4)
    with pytest.raises(ValueError, match="dp_rank"):
        ds.local_batch(0, 8, 4, 4)


class FailingAt:
    """A dataset whose read of global batch `bad` raises a DataError; counts the reads per thread."""

    def __init__(self, inner, bad=None):
        self.inner, self.bad, self.threads = inner, bad, set()

    def local_batch(self, step, gbs, dp_rank, dp):
        self.threads.add(threading.current_thread().name)
        if step == self.bad:
            raise DataError(f"corrupt.bin: bytes [0, 64) fail their checksum (batch {step})")
        return self.inner.local_batch(step, gbs, dp_rank, dp)


def test_the_prefetcher_yields_the_batches_of_the_synchronous_read(datasets):
    ds = datasets["packed_masks"]
    source = FailingAt(ds)
    steps = range(3, 11)  # a resumed run: from step 3 on
    with BatchPrefetcher(source, 8, 1, 2, steps, depth=2) as batches:
        got = [batches.get(step) for step in steps]
        with pytest.raises(ValueError, match="order"):
            batches.get(11)
    for step, batch in zip(steps, got):
        assert_same_rows(batch, ds.local_batch(step, 8, 1, 2))
    assert source.threads == {"batch-prefetch-dp1"}


def test_the_prefetcher_re_raises_the_error_of_its_thread_at_that_step(datasets):
    batches = BatchPrefetcher(FailingAt(datasets["packed"], bad=2), 4, 0, 1, range(0, 5))
    seen = []
    with pytest.raises(DataError, match=r"^corrupt.bin: bytes \[0, 64\) fail their checksum \(batch 2\)$"):
        for step in batches.steps_then_close():
            seen.append(len(batches.get(step)))
    assert seen == [4, 4]  # steps 0 and 1 were trained on; step 2 stopped while reading its batch
    assert not batches._thread.is_alive()


def test_the_prefetcher_stops_when_the_loop_ends_early(datasets):
    batches = BatchPrefetcher(datasets["packed"], 4, 0, 1, range(0, 1000), depth=2)
    time.sleep(0.2)  # the thread has filled the queue and waits on it
    for step in batches.steps_then_close():
        batches.get(step)
        if step == 1:
            break
    assert not batches._thread.is_alive()
    with pytest.raises(RuntimeError, match="closed"):
        batches.get(2)


CHUNK_BYTES, GBS = 64, 4  # a sample of SEQ + 1 uint16 tokens (34 bytes) touches one or two chunks


def chunks_of(dataset, indices) -> set[int]:
    """The chunks of the .bin that the samples `indices` read."""
    starts = dataset.window_starts(np.asarray(indices))
    return {int(k) for s in starts for k in range(s * 2 // CHUNK_BYTES, ((s + SEQ + 1) * 2 - 1) // CHUNK_BYTES + 1)}


def _read_on_two_ranks(rank, world_size, prefix, run_dir):
    """read_on_every_rank when nothing fails and when rank 0 fails with another error than a DataError;
    then train() on `prefix`, whose rank-1 rows of global batch 1 read a corrupt chunk."""
    def read(error=None):
        if error is not None and rank == 0:
            raise error
        return rank
    group, cpu = torch.distributed.group.WORLD, torch.device("cpu")
    ok = read_on_every_rank(read, group, cpu)
    try:
        read_on_every_rank(lambda: read(ValueError("row 3 is\nmalformed")), group, cpu)
    except (ValueError, RuntimeError) as err:
        other = (type(err).__name__, str(err))
    cfg = Config(model=ModelConfig(hidden_size=32, num_layers=1, num_attention_heads=4, num_kv_heads=2,
                                   ffn_hidden_size=64, vocab_size=4096),
                 optim=OptimConfig(lr=1e-3, warmup_steps=1), data=DataConfig(paths=[prefix]),
                 train=TrainConfig(steps=4, micro_batch_size=GBS // 2, global_batch_size=GBS, seq_length=SEQ,
                                   log_interval=1)).validate(world_size)
    started = []
    try:
        train(cfg, run_dir, on_step_start=started.append)
    except DataError as err:
        return ok, other, started, str(err)
    return ok, other, started, None


def test_a_read_that_fails_on_one_dp_rank_stops_every_rank_with_its_message(tmp_path):
    rng = np.random.default_rng(3)
    prefix = str(tmp_path / "d")
    write_indexed_dataset(prefix, [np.append(rng.integers(3, 4096, 10 + i % 20), 0) for i in range(60)],
                          vocab_size=4096, chunk_bytes=CHUNK_BYTES)
    dataset = build_datasets(DataConfig(paths=[prefix]), SEQ, TrainConfig().seed)[0]
    rank1_step1 = chunks_of(dataset, range(GBS + GBS // 2, 2 * GBS))
    read_before = chunks_of(dataset, range(0, GBS + GBS // 2))  # step 0 on both ranks, rank 0's rows of step 1
    corrupt = min(rank1_step1 - read_before)
    raw = bytearray(Path(f"{prefix}.bin").read_bytes())
    raw[corrupt * CHUNK_BYTES] ^= 0x04
    Path(f"{prefix}.bin").write_bytes(bytes(raw))
    (tmp_path / "run").mkdir()
    results = run_distributed(_read_on_two_ranks, 2, prefix, tmp_path / "run")
    assert [r[0] for r in results] == [0, 1]
    assert [r[1] for r in results] == [("ValueError", "row 3 is\nmalformed"),
                                       ("RuntimeError", "data-parallel rank 0 failed to read its rows: row 3 is; "
                                                        "malformed")]
    messages = [r[3] for r in results]
    assert messages[0] == messages[1]
    assert messages[0].startswith(f"{prefix}.bin: bytes [{corrupt * CHUNK_BYTES}, {(corrupt + 1) * CHUNK_BYTES}) "
                                  "fail their checksum")
    assert [r[2] for r in results] == [[0, 1], [0, 1]]  # both trained step 1 and stopped reading step 2's rows
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 1


def test_data_time_is_logged_each_step(tmp_path, capsys):
    text = tmp_path / "texts"
    text.mkdir()
    (text / "a.txt").write_text("some text to train on, repeated. " * 200)
    cfg = Config(model=ModelConfig(hidden_size=32, num_layers=1, num_attention_heads=4, num_kv_heads=2,
                                   ffn_hidden_size=64, vocab_size=4096),
                 optim=OptimConfig(lr=1e-3, warmup_steps=1),
                 data=DataConfig(corpus=str(text), cache_dir=str(tmp_path / "cache")),
                 train=TrainConfig(steps=3, micro_batch_size=2, global_batch_size=4, seq_length=SEQ,
                                   log_interval=1)).validate(1)
    (tmp_path / "run").mkdir()
    train(cfg, tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(0 <= r["data_time_s"] <= r["step_time_s"] for r in rows)
    assert sum(" | data " in line for line in capsys.readouterr().out.splitlines()) == 3
    assert wandb_name("data_time_s") == "perf/data_time_s"
    console = MetricsLogger(tmp_path / "off", WandbConfig(), {}, enabled=False)
    assert "data 0.250s" in console.console_line({"step": 1, "data_time_s": 0.25})
