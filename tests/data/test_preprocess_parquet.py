"""tools/preprocess_data.py on Parquet files and save_to_disk directories: same tokens as jsonl, streamed."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from megatron_qwen2.data.indexed import data_file_paths  # noqa: E402
from megatron_qwen2.data.preprocess import main, preprocess  # noqa: E402

TEXTS = [f"document {i}: def f(x):\n    return x + {i}\n" for i in range(10)] + [
    "Hello, world! <|endoftext|> is text here.", "ünïcödé ✓ 123", "   ", "last document\n"]


def table():
    return pa.table({"id": list(range(len(TEXTS))), "text": TEXTS, "score": [0.5] * len(TEXTS)})


def write_jsonl(path: Path) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return path


def write_parquet(path: Path, row_group_size: int = 4) -> Path:
    pq.write_table(table(), path, row_group_size=row_group_size)
    return path


def write_saved_dataset(root: Path, shards: int = 2) -> Path:
    """A directory laid out as datasets' Dataset.save_to_disk writes it: Arrow stream shards + json files."""
    root.mkdir()
    t = table()
    per_shard = -(-t.num_rows // shards)
    names = []
    for shard in range(shards):
        name = f"data-{shard:05d}-of-{shards:05d}.arrow"
        with pa.OSFile(str(root / name), "wb") as sink, pa.ipc.new_stream(sink, t.schema) as writer:
            for batch in t.slice(shard * per_shard, per_shard).to_batches(max_chunksize=3):
                writer.write_batch(batch)
        names.append(name)
    (root / "state.json").write_text(json.dumps({
        "_data_files": [{"filename": n} for n in names], "_fingerprint": "0123456789abcdef",
        "_format_columns": None, "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False,
        "_split": None}))
    (root / "dataset_info.json").write_text(json.dumps({
        "citation": "", "description": "", "homepage": "", "license": "",
        "features": {"id": {"dtype": "int64", "_type": "Value"}, "text": {"dtype": "string", "_type": "Value"},
                     "score": {"dtype": "float64", "_type": "Value"}}}))
    return root


def pair_bytes(prefix: Path) -> tuple:
    return tuple(p.read_bytes() for p in data_file_paths(prefix))


@pytest.mark.parametrize("output_format", ["native", "megatron"])
def test_parquet_and_saved_dataset_match_jsonl(tmp_path, output_format):
    jsonl = write_jsonl(tmp_path / "docs.jsonl")
    parquet = write_parquet(tmp_path / "docs.parquet")
    assert pq.ParquetFile(parquet).num_row_groups == 4
    saved = write_saved_dataset(tmp_path / "saved")
    expected = preprocess([str(jsonl)], None, tmp_path / "jsonl", progress=False, output_format=output_format)
    from_parquet = preprocess([str(tmp_path / "*.parquet")], None, tmp_path / "parquet", workers=2,
                              progress=False, output_format=output_format)
    from_saved = preprocess([str(saved)], None, tmp_path / "saved_out", progress=False,
                            output_format=output_format)
    assert expected["documents"] == len(TEXTS) - 1  # the blank one is skipped
    for stats, prefix in ((from_parquet, "parquet"), (from_saved, "saved_out")):
        assert (stats["documents"], stats["tokens"]) == (expected["documents"], expected["tokens"])
        assert pair_bytes(tmp_path / prefix) == pair_bytes(tmp_path / "jsonl")


def test_tool_reads_parquet_with_progress(tmp_path):
    parquet = write_parquet(tmp_path / "docs.parquet")
    res = subprocess.run([sys.executable, "tools/preprocess_data.py", "--input", str(parquet), "--output-prefix",
                          str(tmp_path / "out")], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert res.returncode == 0, res.stderr
    assert "tokens/s" in res.stderr and f"wrote {len(TEXTS) - 1} documents" in res.stderr


@pytest.mark.parametrize("kind", ["parquet", "saved"])
def test_missing_column_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys, kind):
    path = write_parquet(tmp_path / "docs.parquet") if kind == "parquet" else write_saved_dataset(tmp_path / "s")
    prefix = tmp_path / "out"
    assert main(["--input", str(path), "--output-prefix", str(prefix), "--json-key", "body", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "'body'" in err and "id, text, score" in err and "--json-key" in err
    assert str(path if kind == "parquet" else path / "data-00000-of-00002.arrow") in err
    assert list(tmp_path.glob("out*")) == []


def test_non_text_column_is_refused(tmp_path, capsys):
    path = write_parquet(tmp_path / "docs.parquet")
    assert main(["--input", str(path), "--output-prefix", str(tmp_path / "out"), "--json-key", "id",
                 "--quiet"]) == 2
    assert "column 'id' is int64, not text" in capsys.readouterr().err
    assert list(tmp_path.glob("out*")) == []


def test_parquet_is_read_one_row_group_at_a_time(tmp_path, monkeypatch):
    parquet = write_parquet(tmp_path / "docs.parquet", row_group_size=3)
    calls = []
    batch_rows = []
    real = pq.ParquetFile.iter_batches

    def counting(self, *args, **kwargs):
        calls.append((tuple(kwargs.get("row_groups") or ()), tuple(kwargs.get("columns") or ())))
        for batch in real(self, *args, **kwargs):
            batch_rows.append(batch.num_rows)
            assert batch.schema.names == ["text"]  # only the text column is read
            yield batch

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", counting)
    stats = preprocess([str(parquet)], None, tmp_path / "out", progress=False)
    assert stats["documents"] == len(TEXTS) - 1
    assert calls == [((i,), ("text",)) for i in range(5)]
    assert batch_rows == [3, 3, 3, 3, 2]


def test_saved_dataset_dict_and_plain_directory_are_refused(tmp_path, capsys):
    root = tmp_path / "dd"
    root.mkdir()
    write_saved_dataset(root / "train")
    (root / "dataset_dict.json").write_text(json.dumps({"splits": ["train"]}))
    assert main(["--input", str(root), "--output-prefix", str(tmp_path / "out"), "--quiet"]) == 2
    assert f"give one split's directory, e.g. {root / 'train'}" in capsys.readouterr().err
    (tmp_path / "plain").mkdir()
    assert main(["--input", str(tmp_path / "plain"), "--output-prefix", str(tmp_path / "out"), "--quiet"]) == 2
    assert "matches no files" in capsys.readouterr().err


def test_parquet_without_pyarrow_is_one_clear_line(tmp_path, monkeypatch, capsys):
    parquet = write_parquet(tmp_path / "docs.parquet")
    for name in ("pyarrow", "pyarrow.parquet", "pyarrow.ipc"):
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
    assert main(["--input", str(parquet), "--output-prefix", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(parquet) in err and "pip install pyarrow" in err
