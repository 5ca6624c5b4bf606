"""tools/preprocess_data.py and the .bin/.idx format: round trip, atomic output, corrupt pairs and chunks rejected."""

import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from megatron_qwen2.data import IndexedDataset, load_tokenizer, write_indexed_dataset
from megatron_qwen2.data.indexed import IndexedDatasetWriter, index_dtype
from megatron_qwen2.data.preprocess import preprocess
from megatron_qwen2.errors import DataError

ROOT = Path(__file__).resolve().parents[2]
DOCS = ["def f(x):\n    return x + 1\n", "Hello, world! <|endoftext|> is text here.", "ünïcödé ✓ 123",
        "   ", "last document\n"]


def write_inputs(tmp_path):
    """Two jsonl files (one with a blank line and a blank document) and a text file."""
    (tmp_path / "in").mkdir()
    with open(tmp_path / "in" / "a.jsonl", "w") as f:
        for d in DOCS[:2]:
            f.write(json.dumps({"text": d, "id": 1}) + "\n")
        f.write("\n")
    with open(tmp_path / "in" / "b.jsonl", "w") as f:
        for d in DOCS[2:4]:
            f.write(json.dumps({"text": d}) + "\n")
    (tmp_path / "in" / "c.txt").write_text(DOCS[4])
    return [str(tmp_path / "in" / "*.jsonl"), str(tmp_path / "in" / "c.txt")]


def expected_docs():
    tok = load_tokenizer()
    tok.encode_special_tokens = True
    eod = tok.token_to_id("<|endoftext|>")
    return [tok.encode(d, add_special_tokens=False).ids + [eod] for d in DOCS if d.strip()]


def test_preprocess_tool_round_trip_with_workers(tmp_path):
    inputs = write_inputs(tmp_path)
    prefix = tmp_path / "out" / "corpus"
    res = subprocess.run([sys.executable, "tools/preprocess_data.py", "--input", *inputs, "--output-prefix",
                          str(prefix), "--workers", "2"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "tokens/s" in res.stderr and "4 documents" in res.stderr
    data = IndexedDataset(prefix)
    data.verify()
    want = expected_docs()
    assert len(data) == 4 and data.dtype == np.dtype("<u2")
    assert [data[i].tolist() for i in range(len(data))] == want
    assert data.num_tokens == sum(map(len, want)) == prefix.with_suffix(".bin").stat().st_size // 2
    # One worker writes the same bytes as two.
    preprocess(inputs, None, tmp_path / "one", workers=1, progress=False)
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"one{suffix}").read_bytes() == Path(str(prefix) + suffix).read_bytes()


def test_preprocess_failure_leaves_no_files(tmp_path):
    inputs = write_inputs(tmp_path)
    with open(tmp_path / "in" / "b.jsonl", "a") as f:
        f.write("{not json\n")
    with pytest.raises(ValueError, match=r"b\.jsonl:3: not valid JSON"):
        preprocess(inputs, None, tmp_path / "out", workers=1, progress=False)
    with pytest.raises(ValueError, match="string field 'body'"):
        preprocess(inputs[:1], None, tmp_path / "out", json_key="body", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]  # neither the pair nor temporaries


def test_uint32_for_large_vocabularies(tmp_path):
    assert index_dtype(65536) == np.uint16 and index_dtype(65537) == np.uint32
    write_indexed_dataset(tmp_path / "big", [[70000, 1], [5]], vocab_size=151936)
    data = IndexedDataset(tmp_path / "big")
    assert data.dtype == np.dtype("<u4") and data[0].tolist() == [70000, 1] and data[-1].tolist() == [5]


@pytest.fixture
def pair(tmp_path):
    prefix = tmp_path / "d"
    write_indexed_dataset(prefix, [[1, 2, 3], [4, 5], [6]], vocab_size=100)
    return prefix, Path(f"{prefix}.bin"), Path(f"{prefix}.idx")


def test_corrupt_pairs_are_rejected_naming_the_file(pair, tmp_path):
    prefix, bin_path, idx_path = pair
    good_idx, good_bin = idx_path.read_bytes(), bin_path.read_bytes()
    assert len(good_idx) == 48 + 8 * 4 + 4  # header, 4 offsets, one chunk checksum

    idx_path.write_bytes(b"XXXXXXXX" + good_idx[8:])
    with pytest.raises(DataError, match=rf"{idx_path}: bad magic"):
        IndexedDataset(prefix)
    idx_path.write_bytes(good_idx[:20])
    with pytest.raises(DataError, match=rf"{idx_path}: 20 bytes, too short"):
        IndexedDataset(prefix)
    idx_path.write_bytes(good_idx[:-4])
    with pytest.raises(DataError, match=rf"{idx_path}: 80 bytes, but .* needs 84"):
        IndexedDataset(prefix)
    offsets = good_idx[48:80]
    idx_path.write_bytes(good_idx[:48] + offsets[:8] + struct.pack("<q", 2) + offsets[16:] + good_idx[80:])
    with pytest.raises(DataError, match="offsets fail their checksum"):
        IndexedDataset(prefix)
    idx_path.write_bytes(good_idx[:80] + b"\0\0\0\0")
    with pytest.raises(DataError, match="chunk checksums fail their checksum"):
        IndexedDataset(prefix)
    idx_path.write_bytes(good_idx)

    bin_path.write_bytes(good_bin[:-2])  # truncated .bin
    with pytest.raises(DataError, match=rf"{bin_path}: 10 bytes, but .* 6 tokens"):
        IndexedDataset(prefix)
    write_indexed_dataset(tmp_path / "other", [[1, 2, 3, 4]], vocab_size=100)  # .bin of another pair
    bin_path.write_bytes(Path(f"{tmp_path / 'other'}.bin").read_bytes())
    with pytest.raises(DataError, match="bytes, but"):
        IndexedDataset(prefix)
    bin_path.write_bytes(good_bin[:-2] + b"\x07\x00")  # right size, wrong content
    data = IndexedDataset(prefix)  # opening reads no tokens
    with pytest.raises(DataError, match=rf"{bin_path}: bytes \[0, 12\) fail their checksum"):
        data[0]
    with pytest.raises(DataError, match=rf"{bin_path}: bytes"):
        data.verify()
    bin_path.unlink()
    with pytest.raises(DataError, match=rf"no file {bin_path}; make the pair with tools/preprocess_data.py"):
        IndexedDataset(prefix)


def write_version_1(prefix: Path) -> None:
    """Rewrite PREFIX.idx as a version 1 index: no chunk size, no chunk checksums."""
    idx_path = Path(f"{prefix}.idx")
    raw = idx_path.read_bytes()
    magic, _, itemsize, num_docs, num_tokens, bin_crc, offsets_crc, _, _ = struct.unpack("<8sIIQQIIII", raw[:48])
    header = struct.pack("<8sIIQQII8x", magic, 1, itemsize, num_docs, num_tokens, bin_crc, offsets_crc)
    idx_path.write_bytes(header + raw[48:48 + 8 * (num_docs + 1)])


def test_chunks_are_verified_when_first_read(tmp_path):
    docs = [np.arange(i, i + 5 + i % 7) % 100 for i in range(40)]  # 315 tokens, documents across chunks
    prefix = tmp_path / "d"
    write_indexed_dataset(prefix, docs, vocab_size=100, chunk_bytes=64)  # 32 tokens a chunk
    bin_path = Path(f"{prefix}.bin")
    raw = bin_path.read_bytes()
    data = IndexedDataset(prefix)
    assert data.chunk_bytes == 64 and len(data.chunk_crc32) == -(-len(raw) // 64) == 10
    assert [int(c) for c in data.chunk_crc32] == [zlib.crc32(raw[i:i + 64]) for i in range(0, len(raw), 64)]
    assert [data[i].tolist() for i in range(len(data))] == [d.tolist() for d in docs]
    assert data.chunk_verified.all()

    flipped = bytearray(raw)
    flipped[5 * 64 + 3] ^= 0x10  # a bit in chunk 5 (tokens 160..191)
    bin_path.write_bytes(bytes(flipped))
    data = IndexedDataset(prefix)
    assert data.windows(np.array([0, 80]), 80).shape == (2, 80)  # tokens 0..159: chunks 0-4
    assert data.chunk_verified.tolist() == [True] * 5 + [False] * 5
    with pytest.raises(DataError, match=rf"{bin_path}: bytes \[320, 384\) fail their checksum"):
        data.windows(np.array([150]), 20)  # reaches into chunk 5
    assert not data.chunk_verified[5]
    with pytest.raises(DataError, match="fail their checksum"):
        data.windows(np.array([150]), 20)  # still refused: a failed chunk is never marked verified


def test_version_1_index_is_read_and_verified_whole(pair):
    prefix, bin_path, _ = pair
    write_version_1(prefix)
    data = IndexedDataset(prefix)
    assert data.chunk_bytes == 12 and len(data.chunk_crc32) == 1
    assert [data[i].tolist() for i in range(3)] == [[1, 2, 3], [4, 5], [6]]
    bin_path.write_bytes(bin_path.read_bytes()[:-2] + b"\x07\x00")
    with pytest.raises(DataError, match=rf"{bin_path}: bytes \[0, 12\) fail their checksum"):
        IndexedDataset(prefix)[0]  # document 0 is intact, but the one chunk is the whole file


def test_writer_abort_keeps_previous_pair(pair):
    prefix, bin_path, idx_path = pair
    before = bin_path.read_bytes(), idx_path.read_bytes()
    with pytest.raises(RuntimeError):
        with IndexedDatasetWriter(prefix, np.uint16) as w:
            w.add_document([9, 9, 9])
            raise RuntimeError("interrupted")
    assert (bin_path.read_bytes(), idx_path.read_bytes()) == before
    assert sorted(p.name for p in bin_path.parent.iterdir()) == ["d.bin", "d.idx"]
    with pytest.raises(ValueError, match="token ids must lie"):
        with IndexedDatasetWriter(prefix, np.uint16) as w:
            w.add_document([70000])
