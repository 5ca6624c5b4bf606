"""Packed, blended and split datasets over indexed files; the sampler; position / document ids; data.paths."""

import numpy as np
import pytest
import torch

from megatron_qwen2.config import DataConfig
from megatron_qwen2.data import (BlendedDataset, DocumentPackedDataset, IndexedDataset, build_datasets,
                                 parse_data_paths, write_indexed_dataset)
from megatron_qwen2.data.batch import positions_in_documents
from megatron_qwen2.data.packed import split_documents
from megatron_qwen2.errors import DataError

EOD = 0  # the repo tokenizer's <|endoftext|>


def synthetic_prefix(path, num_docs=40, base=10, seed=0):
    """Documents of 3..20 tokens; document k's tokens are all base + k, then EOD."""
    rng = np.random.default_rng(seed)
    docs = [[base + k] * int(rng.integers(3, 21)) + [EOD] for k in range(num_docs)]
    write_indexed_dataset(path, docs, vocab_size=4096)
    return str(path)


def packed(prefix, seq=16, seed=3, docs=None, **flags):
    data = IndexedDataset(prefix)
    return DocumentPackedDataset(data, docs or (0, len(data)), seq, seed, EOD, 4096, **flags)


def test_samples_are_a_pure_function_of_seed_and_index(tmp_path):
    prefix = synthetic_prefix(tmp_path / "a")
    a, b = packed(prefix), packed(prefix)
    assert torch.equal(a.global_batch(5, 8).tokens, b.global_batch(5, 8).tokens)
    assert not torch.equal(a.global_batch(5, 8).tokens, packed(prefix, seed=4).global_batch(5, 8).tokens)
    # Resume after any consumed-sample count: the rows are those of an uninterrupted read.
    run = torch.cat([a.global_batch(step, 8).tokens for step in range(30)])  # several epochs
    for consumed in (0, 37, 100, 199):
        assert torch.equal(b.batch_at(consumed, 5).tokens, run[consumed:consumed + 5])
    # Every chunk once per epoch, and rows overlap their successor by exactly the one label token.
    epoch = a.batch_at(0, len(a)).tokens
    starts = np.sort(a.window_starts(np.arange(len(a))))
    assert np.array_equal(starts, np.arange(len(a)) * 16)
    assert epoch.shape == (len(a), 17)


def test_blending_follows_weights_and_resumes(tmp_path):
    pa = synthetic_prefix(tmp_path / "a", base=10)
    pb = synthetic_prefix(tmp_path / "b", base=1000, seed=1)
    da, db = packed(pa, seed=1), packed(pb, seed=2)
    blend = BlendedDataset([da, db], [0.3, 0.7])
    n = 2000
    rows = blend.batch_at(0, n).tokens
    from_a = rows.max(dim=1).values < 1000  # a's tokens lie below 1000, b's above
    assert abs(int(from_a.sum()) - 0.3 * n) <= 2
    # Each component is read in its own order, sample after sample, nothing skipped or repeated.
    which, local = blend.locate(np.arange(n))
    for d, ds in enumerate((da, db)):
        assert np.array_equal(local[which == d], np.arange((which == d).sum()))
        assert torch.equal(rows[torch.from_numpy(which == d)], ds.batch_at(0, int((which == d).sum())).tokens)
    assert torch.equal(blend.batch_at(1234, 7).tokens, rows[1234:1241])
    with pytest.raises(ValueError, match="weights"):
        BlendedDataset([da, db], [0, 0])


def test_split_by_document_is_disjoint(tmp_path):
    prefix = synthetic_prefix(tmp_path / "a", num_docs=50)
    assert split_documents(10, [98, 2], "x") == [(0, 9), (9, 10)]
    assert split_documents(10, [1, 0], "x") == [(0, 10), (10, 10)]
    with pytest.raises(ValueError, match="cannot be split"):
        split_documents(1, [1, 1], "x")
    cfg = DataConfig(paths=[prefix], split=[8, 2])
    train, valid = build_datasets(cfg, 16, seed=1)

    def docs(ds):  # document k's tokens are 10 + k
        return set((ds.batch_at(0, len(ds)).tokens.unique() - 10).tolist()) - {EOD - 10}

    train_docs, valid_docs = docs(train), docs(valid)
    assert train_docs and valid_docs and not train_docs & valid_docs
    assert max(train_docs) < min(valid_docs) == 40  # documents 0..39 train, 40..49 valid
    assert build_datasets(DataConfig(paths=[prefix]), 16, seed=1)[1] is None


def test_position_and_document_ids_restart_at_each_document(tmp_path):
    prefix = synthetic_prefix(tmp_path / "a")
    ds = packed(prefix, reset_position_ids=True, reset_attention_mask=True, eod_mask_loss=True)
    batch = ds.batch_at(0, 20)
    plain = packed(prefix).batch_at(0, 20)
    assert torch.equal(batch.tokens, plain.tokens) and plain.position_ids is None and plain.document_ids is None
    for row in range(20):
        inputs = batch.tokens[row, :-1].tolist()
        doc, pos, want_docs, want_pos = 0, 0, [], []
        for j, t in enumerate(inputs):
            want_docs.append(doc)
            want_pos.append(pos)
            pos += 1
            if t == EOD:  # the EOD token closes its document
                doc, pos = doc + 1, 0
        assert batch.document_ids[row].tolist() == want_docs
        assert batch.position_ids[row].tolist() == want_pos
        assert batch.loss_mask[row].tolist() == [float(t != EOD) for t in inputs]
    only_pos = packed(prefix, reset_position_ids=True).batch_at(0, 20)
    assert only_pos.document_ids is None and torch.equal(only_pos.position_ids, batch.position_ids)
    assert positions_in_documents(np.array([[0, 0, 1, 1, 1, 3]])).tolist() == [[0, 1, 0, 1, 2, 0]]


def test_batch_slicing_keeps_fields_together(tmp_path):
    prefix = synthetic_prefix(tmp_path / "a")
    batch = packed(prefix, reset_position_ids=True, reset_attention_mask=True, eod_mask_loss=True).batch_at(0, 8)
    micro = batch[4:8].split(2)
    assert [len(m) for m in micro] == [2, 2]
    assert torch.equal(micro[1].position_ids, batch.position_ids[6:8])
    assert torch.equal(micro[1].document_ids, batch.document_ids[6:8])
    assert torch.equal(micro[1].loss_mask, batch.loss_mask[6:8])
    assert batch.num_loss_tokens() == int(batch.loss_mask.sum())


def test_corpus_path_keeps_its_windows_and_gains_document_ids(tmp_path):
    (tmp_path / "c").mkdir()
    for i in range(6):
        (tmp_path / "c" / f"{i}.txt").write_text(f"document number {i} " * (5 + i))
    base = dict(corpus=str(tmp_path / "c"), cache_dir=str(tmp_path / "cache"))
    plain, _ = build_datasets(DataConfig(**base), 16, seed=2)
    reset, _ = build_datasets(DataConfig(**base, reset_position_ids=True, reset_attention_mask=True), 16, seed=2)
    a, b = plain.global_batch(1, 4), reset.global_batch(1, 4)
    assert torch.equal(a.tokens, plain.packed.global_batch(1, 4))  # the windows the loop always trained on
    assert a.loss_mask is None and a.position_ids is None and a.document_ids is None
    assert torch.equal(a.tokens, b.tokens)
    eod_rows = (b.tokens[:, :-1] == EOD).any(dim=1)
    assert eod_rows.any()
    assert torch.equal(b.document_ids[:, -1] > 0, eod_rows & (b.tokens[:, :-2] == EOD).any(dim=1))


def test_data_paths_forms_and_errors(tmp_path):
    assert parse_data_paths(["a"]) == [(None, "a")]
    assert parse_data_paths([0.3, "a", 0.7, "b"]) == [(0.3, "a"), (0.7, "b")]
    assert parse_data_paths([{"path": "a", "weight": 2}, {"path": "b", "weight": 1}]) == [(2.0, "a"), (1.0, "b")]
    for bad in ([], [0.3, "a", "b"], ["a", 0.3], [{"weight": 1}], [-1.0, "a"], [{"path": "a", "weight": 1},
                                                                                  {"path": "b"}]):
        with pytest.raises(ValueError, match="data.paths"):
            parse_data_paths(bad)
    with pytest.raises(ValueError, match="data.format"):
        DataConfig(format="chat").validate()
    with pytest.raises(ValueError, match="data.split"):
        DataConfig(split=[0, 1]).validate()
    with pytest.raises(ValueError, match="data.format=sft needs data.paths"):
        DataConfig(format="sft").validate()
    with pytest.raises(ValueError, match="do not apply to data.format=sft"):
        DataConfig(format="sft", paths=["x.jsonl"], reset_attention_mask=True).validate()
    with pytest.raises(DataError, match=rf"no file {tmp_path / 'nope'}.idx; make the pair"):
        build_datasets(DataConfig(paths=[str(tmp_path / "nope")]), 16, 1)
    prefix = synthetic_prefix(tmp_path / "a", num_docs=2)
    with pytest.raises(ValueError, match="fewer than one sample"):
        build_datasets(DataConfig(paths=[prefix]), 4096, 1)
