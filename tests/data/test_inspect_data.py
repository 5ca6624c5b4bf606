"""tools/inspect_data.py: the header, a document and a training sample of either format, --json lines,
and bad input refused with one line and exit 2."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_qwen2.config import DataConfig
from megatron_qwen2.data import build_datasets, load_tokenizer, write_indexed_dataset, write_megatron_dataset
from megatron_qwen2.data.inspect import main
from megatron_qwen2.errors import EXIT_CONFIG

ROOT = Path(__file__).resolve().parents[2]
EOD, VOCAB = 0, 4096  # the repo tokenizer's <|endoftext|> and vocabulary


def documents(num_docs=40, seed=0):
    rng = np.random.default_rng(seed)
    return [np.append(rng.integers(3, VOCAB, size=int(rng.integers(3, 31))), [EOD]) for _ in range(num_docs)]


@pytest.fixture
def datasets(tmp_path):
    """{format: (prefix, documents)}: a native pair, and a Megatron-LM one (two sequences a document, no EOD)."""
    docs = documents()
    write_indexed_dataset(tmp_path / "native", docs, VOCAB)
    megatron_docs = [d[:-1] for d in documents(seed=1)]
    write_megatron_dataset(tmp_path / "megatron", [[d[:2], d[2:]] for d in megatron_docs], np.uint16)
    return {"native": (str(tmp_path / "native"), docs), "megatron": (str(tmp_path / "megatron"), megatron_docs)}


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("fmt", ["native", "megatron"])
def test_header_counts(datasets, capsys, fmt):
    prefix, docs = datasets[fmt]
    code, out, _ = run(capsys, prefix, "--json")
    assert code == 0 and len(out.splitlines()) == 1
    info = json.loads(out)
    assert info["format"] == fmt and info["num_documents"] == len(docs)
    assert info["num_tokens"] == sum(len(d) for d in docs) and info["dtype"] == "uint16"
    assert info["version"] == (2 if fmt == "native" else 1)
    if fmt == "native":
        assert info["chunk_bytes"] == 1 << 14
    else:
        assert info["num_sequences"] == 2 * len(docs)
    code, out, _ = run(capsys, prefix)
    assert code == 0 and f"num documents         {len(docs)}" in out and f"format                {fmt}" in out


@pytest.mark.parametrize("fmt", ["native", "megatron"])
def test_document_tokens_and_text(datasets, capsys, fmt):
    prefix, docs = datasets[fmt]
    for n in (0, 7, len(docs) - 1):
        code, out, _ = run(capsys, prefix, "--document", n, "--json")
        assert code == 0 and len(out.splitlines()) == 1
        doc = json.loads(out)
        assert doc["document"] == n and doc["num_tokens"] == len(docs[n]) and doc["tokens"] == docs[n].tolist()
        assert "text" not in doc
    code, out, _ = run(capsys, prefix, "--document", 7, "--tokenizer", ROOT / "megatron_qwen2/data/assets", "--json")
    assert json.loads(out)["text"] == load_tokenizer().decode(docs[7].tolist(), skip_special_tokens=False)
    code, out, _ = run(capsys, prefix, "--document", 7)
    assert code == 0 and " ".join(map(str, docs[7].tolist()[:5])) in out


@pytest.mark.parametrize("fmt", ["native", "megatron"])
@pytest.mark.parametrize("flags", [(), ("--reset-position-ids", "--reset-attention-mask", "--eod-mask-loss")])
def test_sample_is_the_loops(datasets, capsys, fmt, flags):
    prefix, _ = datasets[fmt]
    seq_length, seed, gbs, index = 16, 7, 4, 13
    code, out, _ = run(capsys, prefix, "--sample", index, "--seq-length", seq_length, "--seed", seed,
                       "--split", "9,1", *flags, "--json")
    assert code == 0 and len(out.splitlines()) == 1
    smp = json.loads(out)
    on = bool(flags)
    cfg = DataConfig(paths=[prefix], split=[9, 1], reset_position_ids=on, reset_attention_mask=on, eod_mask_loss=on)
    train_set, _ = build_datasets(cfg, seq_length, seed)
    expected = train_set.samples(np.array([index]))
    row = train_set.global_batch(index // gbs, gbs)[index % gbs:index % gbs + 1]  # the loop's batch, its row
    for batch in (expected, row):
        assert smp["tokens"] == batch.tokens[0].tolist() and smp["num_tokens"] == seq_length + 1
        assert smp["position_ids"] == batch.positions()[0].tolist()
        if on:
            assert smp["loss_mask"] == batch.loss_mask[0].int().tolist()
            assert smp["document_ids"] == batch.document_ids[0].tolist()
        else:
            assert batch.loss_mask is None and batch.document_ids is None
            assert smp["loss_mask"] == [1] * seq_length and smp["document_ids"] == [0] * seq_length
    assert smp["sample"] == index and smp["samples_per_epoch"] == len(train_set)
    if on:
        assert 0 in smp["loss_mask"] and max(smp["document_ids"]) > 0  # 16 tokens cross a document boundary
    code, out, _ = run(capsys, prefix, "--sample", index, "--seq-length", seq_length, "--seed", seed,
                       "--split", "9,1", *flags)
    assert code == 0 and len(out.splitlines()) == seq_length + 2  # summary, column names, one line a position


def test_sample_defaults_are_train_pys(datasets, capsys):
    prefix, _ = datasets["native"]
    code, out, _ = run(capsys, prefix, "--sample", 0, "--seq-length", 32, "--json")
    smp = json.loads(out)
    assert code == 0 and smp["seed"] == 1234 and smp["split"] == [1.0, 0.0]
    assert not (smp["reset_position_ids"] or smp["reset_attention_mask"] or smp["eod_mask_loss"])


def test_bad_input_is_one_line_exit_2(datasets, capsys, tmp_path):
    prefix, docs = datasets["native"]
    for argv, names in [((prefix, "--document", len(docs)), f"--document {len(docs)}"),
                        ((prefix, "--document", -1), "--document -1"),
                        ((datasets["megatron"][0], "--sample", 0, "--seq-length", 10_000), "seq_length"),
                        ((prefix, "--sample", -3), "--sample -3")]:
        code, out, err = run(capsys, *argv)
        assert code == EXIT_CONFIG and out == "" and err.startswith("error: ") and len(err.splitlines()) == 1
        assert names in err
    bad = tmp_path / "bad"
    Path(f"{bad}.bin").write_bytes(b"")
    Path(f"{bad}.idx").write_bytes(b"NOTANIDX" + bytes(40))
    code, _, err = run(capsys, bad)
    assert code == EXIT_CONFIG and "bad magic" in err and len(err.splitlines()) == 1
    Path(f"{tmp_path / 'cut'}.idx").write_bytes(Path(f"{prefix}.idx").read_bytes())
    Path(f"{tmp_path / 'cut'}.bin").write_bytes(Path(f"{prefix}.bin").read_bytes()[:-6])
    code, _, err = run(capsys, tmp_path / "cut")
    assert code == EXIT_CONFIG and "cut.bin" in err and "truncated" in err and len(err.splitlines()) == 1


def test_tool_missing_prefix_is_one_line_without_traceback(tmp_path):
    missing = tmp_path / "nothing"
    res = subprocess.run([sys.executable, "tools/inspect_data.py", str(missing), "--document", "0"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == EXIT_CONFIG and res.stdout == ""
    assert res.stderr.startswith("error: ") and len(res.stderr.splitlines()) == 1 and "Traceback" not in res.stderr
    assert str(missing) in res.stderr and "preprocess_data.py" in res.stderr
