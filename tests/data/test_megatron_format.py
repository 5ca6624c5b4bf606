"""Megatron-LM's indexed dataset format: the byte layout, every dtype, multi-sequence documents,
refused pairs (exit 2, the file named), the same batches as the project's format, and
tools/preprocess_data.py --format megatron."""

import struct
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_qwen2 import train as train_module
from megatron_qwen2.config import Config, DataConfig, ModelConfig, OptimConfig, TrainConfig
from megatron_qwen2.data import (DocumentPackedDataset, IndexedDataset, MegatronIndexedDataset, build_datasets,
                                 open_indexed, write_indexed_dataset, write_megatron_dataset)
from megatron_qwen2.data.megatron_indexed import DTYPE_CODES, megatron_dtype
from megatron_qwen2.data.preprocess import preprocess
from megatron_qwen2.errors import EXIT_CONFIG, DataError
from megatron_qwen2.train import train

ROOT = Path(__file__).resolve().parents[2]
EOD, VOCAB = 0, 4096  # the repo tokenizer's <|endoftext|> and vocabulary


def documents(num_docs=50, seed=0, eod=True):
    """Documents of 3..30 tokens in [1, VOCAB), each ending with EOD when `eod`."""
    rng = np.random.default_rng(seed)
    return [np.append(rng.integers(1, VOCAB, size=int(rng.integers(3, 31))), [EOD] if eod else [])
            for _ in range(num_docs)]


def as_sequences(doc, seed):
    """`doc` cut into one to three sequences (Megatron-LM's --split-sentences)."""
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.choice(np.arange(1, len(doc)), size=int(rng.integers(0, 3)), replace=False))
    return np.split(doc, cuts)


def test_header_and_arrays_are_megatron_lms_layout(tmp_path):
    # Two documents: [1, 2, 3] + [4] (two sequences) and [5, 6], int32 tokens.
    write_megatron_dataset(tmp_path / "d", [[[1, 2, 3], [4]], [5, 6]], np.int32)
    expected_idx = (b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", 4)  # magic, version, int32
                    + struct.pack("<Q", 3) + struct.pack("<Q", 3)  # 3 sequences, 3 document indices
                    + struct.pack("<3i", 3, 1, 2)  # sequence lengths
                    + struct.pack("<3q", 0, 12, 16)  # sequence pointers, in bytes
                    + struct.pack("<3q", 0, 2, 3))  # document indices
    assert Path(f"{tmp_path / 'd'}.idx").read_bytes() == expected_idx
    assert Path(f"{tmp_path / 'd'}.bin").read_bytes() == struct.pack("<6i", 1, 2, 3, 4, 5, 6)

    write_megatron_dataset(tmp_path / "u", [[7, 8]], np.uint16)
    assert Path(f"{tmp_path / 'u'}.idx").read_bytes() == (
        b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, 8, 1, 2) + struct.pack("<i", 2) + struct.pack("<q", 0)
        + struct.pack("<2q", 0, 1))
    assert Path(f"{tmp_path / 'u'}.bin").read_bytes() == struct.pack("<2H", 7, 8)
    assert megatron_dtype(VOCAB) == np.uint16 and megatron_dtype(151_646) == np.int32  # Qwen2's vocabulary


@pytest.mark.parametrize("code", sorted(DTYPE_CODES))
def test_every_dtype_round_trips(tmp_path, code):
    dtype = DTYPE_CODES[code]
    low = -100 if dtype.kind in "if" else 0
    rng = np.random.default_rng(code)
    docs = [rng.integers(low, 120, size=n) for n in (5, 1, 0, 9, 4)]  # an empty document too
    write_megatron_dataset(tmp_path / "d", docs, dtype)
    assert Path(f"{tmp_path / 'd'}.idx").read_bytes()[17] == code
    data = open_indexed(tmp_path / "d")
    assert isinstance(data, MegatronIndexedDataset) and data.dtype == dtype
    assert len(data) == 5 and list(data.document_lengths) == [5, 1, 0, 9, 4]
    for i, doc in enumerate(docs):
        assert data[i].dtype == dtype and np.array_equal(data[i], doc)
    flat = np.concatenate(docs)
    assert np.array_equal(data.windows(np.array([0, 3, 11]), 8), np.stack([flat[s:s + 8] for s in (0, 3, 11)]))
    data.verify()


def test_multi_sequence_documents_are_one_document_each(tmp_path):
    docs = documents(20, eod=False)
    write_megatron_dataset(tmp_path / "m", [as_sequences(d, i) for i, d in enumerate(docs)], np.uint16)
    data = open_indexed(tmp_path / "m")
    assert len(data.sequence_lengths) > len(docs) and len(data) == len(docs)
    assert [list(data[i]) for i in range(len(docs))] == [list(d) for d in docs]
    # Positions restart at documents, not at the sequences inside them; no EOD token is needed.
    seq = int(data.num_tokens) - 1
    batch = DocumentPackedDataset(data, (0, len(data)), seq, 0, EOD, VOCAB, reset_position_ids=True,
                                  eod_mask_loss=True).batch_at(0, 1)
    starts = np.asarray(data.offsets[:-1])
    expected = np.arange(seq) - starts[np.searchsorted(starts, np.arange(seq), side="right") - 1]
    assert np.array_equal(batch.position_ids[0].numpy(), expected)
    # eod_mask_loss: no loss on the label after each document's last token (the next document's first).
    assert np.array_equal(np.flatnonzero(batch.loss_mask[0].numpy() == 0), data.offsets[1:-1] - 1)


def flags(**extra):
    return dict(reset_position_ids=True, reset_attention_mask=True, eod_mask_loss=True, **extra)


def assert_same_batches(a, b, steps=6, gbs=8):
    assert len(a) == len(b)
    for step in range(steps):
        x, y = a.global_batch(step, gbs), b.global_batch(step, gbs)
        for f in fields(x):
            u, v = getattr(x, f.name), getattr(y, f.name)
            assert (u is None and v is None) or torch.equal(u, v), (step, f.name)


def test_training_batches_equal_those_of_the_native_format(tmp_path):
    web, code = documents(60, seed=1), documents(40, seed=2, eod=False)
    write_indexed_dataset(tmp_path / "web_native", web, VOCAB)
    write_indexed_dataset(tmp_path / "code_native", code, VOCAB)
    write_megatron_dataset(tmp_path / "web_megatron", web, np.uint16)
    write_megatron_dataset(tmp_path / "code_megatron", [as_sequences(d, i) for i, d in enumerate(code)], np.int32)
    for paths in (["web"], [0.3, "code", 0.7, "web"]):
        for extra in ({}, flags()):
            native, megatron = (
                build_datasets(DataConfig(paths=[f"{tmp_path / p}_{fmt}" if isinstance(p, str) else p for p in paths],
                                          split=[80, 20], **extra), 16, seed=3) for fmt in ("native", "megatron"))
            assert_same_batches(native[0], megatron[0])  # train
            assert_same_batches(native[1], megatron[1], steps=2)  # valid


def test_float_and_negative_token_ids_stop_the_reader(tmp_path):
    write_megatron_dataset(tmp_path / "f", [[1.0, 2.5, 3.0, 4.0]], np.float32)
    with pytest.raises(DataError, match=rf"{tmp_path / 'f'}.bin: token 2.5 is not an integer id"):
        open_indexed(tmp_path / "f").windows(np.array([0]), 3)
    write_megatron_dataset(tmp_path / "n", [[1, 2, -3, 4, 5]], np.int8)
    data = open_indexed(tmp_path / "n")
    with pytest.raises(DataError, match=rf"{tmp_path / 'n'}.bin: token id -3 is outside the tokenizer's"):
        DocumentPackedDataset(data, (0, 1), 4, 0, EOD, VOCAB).batch_at(0, 1)


def config(prefix: Path) -> Config:
    model = ModelConfig(hidden_size=32, num_layers=1, num_attention_heads=4, num_kv_heads=2, ffn_hidden_size=64,
                        vocab_size=VOCAB)
    return Config(model=model, optim=OptimConfig(lr=1e-3, warmup_steps=1), data=DataConfig(paths=[str(prefix)]),
                  train=TrainConfig(steps=1, micro_batch_size=2, global_batch_size=2, seq_length=16)).validate(1)


def test_bad_pairs_are_refused_naming_the_file(tmp_path, monkeypatch):
    prefix = tmp_path / "d"
    write_megatron_dataset(prefix, [[[1, 2, 3], [4]], [5, 6]], np.int32)  # 3 sequences, 3 document indices
    bin_path, idx_path = Path(f"{prefix}.bin"), Path(f"{prefix}.idx")
    good_idx, good_bin = idx_path.read_bytes(), bin_path.read_bytes()
    assert len(good_idx) == 34 + 3 * 4 + 3 * 8 + 3 * 8 == 94
    seq_pointers_at = 34 + 12

    def refused(idx: bytes, bin_: bytes, match: str) -> None:
        idx_path.write_bytes(idx)
        bin_path.write_bytes(bin_)
        with pytest.raises(DataError, match=match) as err:
            build_datasets(DataConfig(paths=[str(prefix)]), 2, seed=0)
        assert err.value.exit_code == EXIT_CONFIG and "\n" not in str(err.value)
        assert idx_path.read_bytes() == idx and bin_path.read_bytes() == bin_  # the reader never writes

    refused(good_idx, good_bin[:-4], rf"{bin_path}: 20 bytes, but {idx_path} describes 6 tokens of 4 bytes \(int32\) "
            r"= 24 bytes \(truncated")
    refused(good_idx, good_bin + good_bin, rf"{bin_path}: 48 bytes, but")  # the .bin of another pair
    refused(good_idx[:-8], good_bin, rf"{idx_path}: 86 bytes, but a header for 3 sequences and 3 document "
            r"indices needs 94 \(truncated\)")
    refused(good_idx[:20], good_bin, rf"{idx_path}: 20 bytes, too short for the 34-byte header")
    refused(good_idx + b"\0" * 3, good_bin, rf"{idx_path}: holds a mode per sequence \(a multimodal")
    refused(good_idx[:9] + struct.pack("<Q", 2) + good_idx[17:], good_bin, rf"{idx_path}: Megatron-LM index "
            "version 2")
    refused(good_idx[:17] + b"\x09" + good_idx[18:], good_bin, rf"{idx_path}: unknown dtype code 9")
    gap = good_idx[:seq_pointers_at + 8] + struct.pack("<q", 16) + good_idx[seq_pointers_at + 16:]
    refused(gap, good_bin, rf"{idx_path}: sequence 1 starts at byte 16 of the .bin, but the lengths before it end "
            "at byte 12")
    backwards = good_idx[:-24] + struct.pack("<3q", 0, 3, 2)
    refused(backwards, good_bin, rf"{idx_path}: document indices are not a non-decreasing run")
    refused(b"MMIDIDX\x00\x01" + good_idx[9:], good_bin, rf"{idx_path}: bad magic b'MMIDIDX\\x00\\x01' \(expected "
            r"b'MQ2TOKS\\x00', this project's format, or b'MMIDIDX\\x00\\x00', Megatron-LM's\)")

    # Through train(): refused with exit 2 before the model is built.
    idx_path.write_bytes(good_idx)
    bin_path.write_bytes(good_bin[:-1])

    def refuse(*args, **kwargs):
        raise AssertionError("the model was built before the data was checked")
    monkeypatch.setattr(train_module, "TrainingStep", refuse)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with pytest.raises(DataError, match=rf"{bin_path}: 23 bytes, but") as err:
        train(config(prefix), run_dir)
    assert err.value.exit_code == EXIT_CONFIG


def test_native_reader_refuses_a_megatron_index_listing_both_magics(tmp_path):
    write_megatron_dataset(tmp_path / "d", [[1, 2]], np.uint16)
    with pytest.raises(DataError, match=r"bad magic b'MMIDIDX\\x00' \(expected b'MQ2TOKS\\x00', this project's "
                       r"format, or b'MMIDIDX\\x00\\x00', Megatron-LM's\)"):
        IndexedDataset(tmp_path / "d")
    assert isinstance(open_indexed(tmp_path / "d"), MegatronIndexedDataset)


def test_preprocess_tool_writes_a_megatron_pair(tmp_path):
    inputs = tmp_path / "docs.jsonl"
    inputs.write_text("".join(f'{{"text": "document {i}: {"some words " * (i + 1)}"}}\n' for i in range(30)))
    res = subprocess.run([sys.executable, "tools/preprocess_data.py", "--input", str(inputs), "--output-prefix",
                          str(tmp_path / "meg"), "--format", "megatron"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert "tokens/s" in res.stderr and "(megatron format)" in res.stderr
    preprocess([str(inputs)], None, tmp_path / "nat", progress=False)
    megatron, native = open_indexed(tmp_path / "meg"), open_indexed(tmp_path / "nat")
    assert isinstance(megatron, MegatronIndexedDataset) and isinstance(native, IndexedDataset)
    assert megatron.dtype == np.uint16 and len(megatron) == len(native) == 30
    assert all(np.array_equal(megatron[i], native[i]) and megatron[i][-1] == EOD for i in range(30))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl", "meg.bin", "meg.idx", "nat.bin", "nat.idx"]
