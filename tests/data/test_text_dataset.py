"""The cached token stream (built once, verified, rebuilt when damaged) and the packed, seeded training windows."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from megatron_qwen2.data import PackedDataset, build_packed_dataset, corpus_files, corpus_tokens, load_tokenizer
from megatron_qwen2.data import text_dataset
from megatron_qwen2.errors import DataError

NUM_FILES = 30


class CountingEncoder:
    """Wraps text_dataset._encode_files to count how often the corpus is tokenised."""

    def __init__(self, monkeypatch):
        self.calls = 0
        self._inner = text_dataset._encode_files
        monkeypatch.setattr(text_dataset, "_encode_files", self)

    def __call__(self, *args):
        self.calls += 1
        return self._inner(*args)


def cache_files(cache_dir):
    bins, metas = sorted(cache_dir.glob("*.bin")), sorted(cache_dir.glob("*.json"))
    assert len(bins) == len(metas) == 1
    return bins[0], metas[0]


def test_stream_holds_each_document_then_eod(tmp_path):
    tokens = corpus_tokens("stdlib", cache_dir=tmp_path, max_files=NUM_FILES)
    assert tokens.dtype == np.uint16 and tokens.ndim == 1
    tok = load_tokenizer(None)
    docs = [f.read_text(encoding="utf-8") for f in corpus_files("stdlib", NUM_FILES)]
    docs = [d for d in docs if d.strip()]
    eod_at = np.flatnonzero(tokens == 0)
    assert len(eod_at) == len(docs) and eod_at[-1] == len(tokens) - 1
    assert tok.decode(tokens[:eod_at[0]].tolist()) == docs[0]
    assert tok.decode(tokens[eod_at[-2] + 1:-1].tolist()) == docs[-1]
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))


def test_cache_hit_does_not_retokenise(tmp_path, monkeypatch):
    counter = CountingEncoder(monkeypatch)
    first = np.array(corpus_tokens("stdlib", cache_dir=tmp_path, max_files=NUM_FILES))
    bin_path, _ = cache_files(tmp_path)
    mtime = bin_path.stat().st_mtime_ns
    second = corpus_tokens("stdlib", cache_dir=tmp_path, max_files=NUM_FILES)
    assert counter.calls == 1
    assert bin_path.stat().st_mtime_ns == mtime
    np.testing.assert_array_equal(first, second)
    corpus_tokens("stdlib", cache_dir=tmp_path, max_files=NUM_FILES - 1)  # another file list: another cache
    assert counter.calls == 2 and len(list(tmp_path.glob("*.bin"))) == 2


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "garbage_sidecar", "no_sidecar"])
def test_damaged_cache_is_rebuilt(tmp_path, monkeypatch, damage):
    counter = CountingEncoder(monkeypatch)
    good = np.array(corpus_tokens("stdlib", cache_dir=tmp_path, max_files=NUM_FILES))
    bin_path, meta_path = cache_files(tmp_path)
    data = bin_path.read_bytes()
    if damage == "truncate":
        bin_path.write_bytes(data[: len(data) // 2])
    elif damage == "flip_byte":
        bin_path.write_bytes(data[:100] + bytes([data[100] ^ 0xFF]) + data[101:])
    elif damage == "garbage_sidecar":
        meta_path.write_text("{")
    else:
        meta_path.unlink()
    rebuilt = corpus_tokens("stdlib", cache_dir=tmp_path, max_files=NUM_FILES)
    assert counter.calls == 2
    np.testing.assert_array_equal(rebuilt, good)
    assert json.loads(meta_path.read_text())["num_tokens"] == len(good)
    assert bin_path.stat().st_size == len(good) * 2


def test_special_token_text_inside_a_document_is_plain_text(tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("before <|endoftext|> after\n")
    (tmp_path / "corpus" / "b.txt").write_bytes(b"\xff\xfe not utf-8")
    tokens = corpus_tokens(str(tmp_path / "corpus"), cache_dir=tmp_path / "cache")
    assert (tokens == 0).sum() == 1 and tokens[-1] == 0
    assert load_tokenizer(None).decode(tokens[:-1].tolist()) == "before <|endoftext|> after\n"


def test_missing_tokenizer_and_bad_corpus(tmp_path):
    with pytest.raises(DataError, match="no_tokenizer_here"):
        corpus_tokens("stdlib", tokenizer=str(tmp_path / "no_tokenizer_here"), cache_dir=tmp_path, max_files=2)
    with pytest.raises(ValueError, match="no-such-corpus"):
        corpus_tokens(str(tmp_path / "no-such-corpus"), cache_dir=tmp_path)


def test_build_packed_dataset_from_config(tmp_path):
    cfg = SimpleNamespace(corpus="stdlib", tokenizer=None, cache_dir=str(tmp_path), max_files=NUM_FILES)
    ds = build_packed_dataset(cfg, seq_length=64, seed=7)
    assert ds.vocab_size == 4096 and len(ds) == (len(ds.tokens) - 1) // 64
    batch = ds.global_batch(3, 8)
    assert batch.shape == (8, 65) and batch.dtype == torch.long
    assert torch.equal(batch, build_packed_dataset(cfg, seq_length=64, seed=7).global_batch(3, 8))


# --- PackedDataset on a synthetic stream: token value == position, so windows are easy to check ---

def arange_dataset(n=1001, seq_length=10, seed=0):
    return PackedDataset(np.arange(n, dtype=np.int32), seq_length, seed, vocab_size=n)


def test_windows_are_contiguous_chunks_and_an_epoch_covers_each_once():
    ds = arange_dataset()
    assert len(ds) == 100
    epoch = torch.cat([ds.global_batch(step, 20) for step in range(5)])  # [100, 11]
    assert torch.equal(epoch[:, 1:] - epoch[:, :-1], torch.ones(100, 10, dtype=torch.long))
    starts = epoch[:, 0]
    assert torch.all(starts % 10 == 0)
    assert sorted(starts.tolist()) == list(range(0, 1000, 10))
    assert starts.tolist() != sorted(starts.tolist())  # shuffled


def test_global_batch_is_a_function_of_step_batch_size_and_seed():
    a, b = arange_dataset(seed=3), arange_dataset(seed=3)
    assert torch.equal(a.global_batch(4, 8), b.global_batch(4, 8))
    assert torch.equal(a.global_batch(1, 4), b.global_batch(0, 8)[4:])  # sample indices, not batch shapes
    assert torch.equal(a.global_batch(2, 3)[1], a[7])
    assert not torch.equal(a.global_batch(0, 8), arange_dataset(seed=4).global_batch(0, 8))


def test_later_epochs_reshuffle():
    ds = arange_dataset()
    epoch0 = ds.global_batch(0, 100)[:, 0]
    epoch1 = ds.global_batch(1, 100)[:, 0]
    assert sorted(epoch0.tolist()) == sorted(epoch1.tolist()) and not torch.equal(epoch0, epoch1)
    straddling = ds.global_batch(9, 11)  # samples 99 ... 109: the end of epoch 0 and the start of epoch 1
    assert torch.equal(straddling[0], ds[99]) and torch.equal(straddling[1:], ds.global_batch(1, 100)[:10])
    assert ds.global_batch(10_000, 4).shape == (4, 11)


def test_split_is_disjoint_and_covers_all():
    ds = arange_dataset()
    train, valid = ds.split(0.1)
    assert (len(train), len(valid)) == (90, 10)
    train_starts = set(train.global_batch(0, 90)[:, 0].tolist())
    valid_starts = set(valid.global_batch(0, 10)[:, 0].tolist())
    assert not train_starts & valid_starts
    assert train_starts | valid_starts == set(range(0, 1000, 10))
    assert min(valid_starts) == 900  # the held-out tail of the stream
    with pytest.raises(ValueError, match="valid_fraction"):
        ds.split(1.0)


def test_uint16_stream_and_errors():
    ds = PackedDataset(np.arange(50, dtype=np.uint16), 7, seed=1)
    assert ds.vocab_size == 50 and ds.global_batch(0, 2).dtype == torch.long
    with pytest.raises(ValueError, match="seq_length \\+ 1 = 11"):
        PackedDataset(np.arange(10), 10, seed=0)
    with pytest.raises(ValueError, match="global_batch_size"):
        ds.global_batch(0, 0)
