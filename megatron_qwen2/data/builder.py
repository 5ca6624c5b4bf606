"""The train and valid datasets of a `DataConfig`.

- `data.paths` unset: the text corpus `data.corpus` (the standard library by default), tokenised
  and cached as one stream (text_dataset.py), cut into fixed-length seeded windows; `data.split`
  then splits its windows, not documents.
- `data.format=pretrain`: `data.paths` names PREFIXes of .bin/.idx pairs, this project's
  (tools/preprocess_data.py, indexed.py) or Megatron-LM's (megatron_indexed.py), told apart by the
  index's magic; each split by document and packed (packed.py), blended by weight when there are several.
- `data.format=sft`: `data.paths` names chat jsonl files (sft.py), split by conversation and blended.
- `data.format=preference`: `data.paths` names preference jsonl files (preference.py), split by pair
  and blended.

`data.paths` is `[prefix]`, `[w1, prefix1, w2, prefix2, ...]` (Megatron's form) or a list of
`{path: ..., weight: ...}`; without weights, each dataset weighs as many samples as it holds.
"""

from __future__ import annotations

import os
from numbers import Real
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from megatron_qwen2.data.batch import Batch, documents_from_eod, make_batch
from megatron_qwen2.data.indexed import check_prefix_readable, open_indexed
from megatron_qwen2.data.packed import DocumentPackedDataset, split_documents
from megatron_qwen2.data.preference import PreferenceDataset, load_pairs
from megatron_qwen2.data.sampler import BlendedDataset, SampleDataset
from megatron_qwen2.data.sft import SFTDataset, ensure_chat_tokens, load_conversations
from megatron_qwen2.data.text_dataset import PackedDataset, _corpus_tokens
from megatron_qwen2.data.tokenizer import eod_token_id, load_tokenizer
from megatron_qwen2.errors import DataError

# data.format -> (one of its files, what data.paths names) for messages.
JSONL_FORMATS = {"sft": ("SFT file", "chat jsonl files"), "preference": ("preference file", "preference jsonl files")}


def parse_data_paths(paths: Sequence[Any]) -> list[tuple[Optional[float], str]]:
    """(weight or None, path) pairs of `data.paths` (see the module docstring for the accepted forms)."""
    if not paths:
        raise ValueError("data.paths must name at least one dataset")
    items = list(paths)
    if all(isinstance(p, dict) or hasattr(p, "keys") for p in items):
        out = []
        for p in items:
            if "path" not in p:
                raise ValueError(f"data.paths entry {dict(p)!r} needs a 'path' (and optionally a 'weight')")
            out.append((float(p["weight"]) if p.get("weight") is not None else None, str(p["path"])))
    elif all(isinstance(p, str) for p in items):
        out = [(None, p) for p in items]
    elif len(items) % 2 == 0 and all(isinstance(w, Real) and not isinstance(w, bool) and isinstance(p, str)
                                     for w, p in zip(items[::2], items[1::2])):
        out = [(float(w), p) for w, p in zip(items[::2], items[1::2])]
    else:
        raise ValueError(f"data.paths={items!r}: give [path, ...], [weight, path, weight, path, ...] or "
                         "[{path: ..., weight: ...}, ...]")
    weights = [w for w, _ in out]
    if any(w is None for w in weights) and any(w is not None for w in weights):
        raise ValueError(f"data.paths={items!r}: give a weight for every dataset or for none")
    if any(w is not None and not (np.isfinite(w) and w >= 0) for w in weights) or \
            (weights[0] is not None and sum(weights) <= 0):
        raise ValueError(f"data.paths weights must be finite, >= 0 and not all zero, got {weights}")
    return out


class CorpusDataset(SampleDataset):
    """The cached text corpus's windows (`PackedDataset`) as Batches; document ids come from the EOD tokens."""

    def __init__(self, packed: PackedDataset, eod: int, reset_position_ids: bool, reset_attention_mask: bool,
                 eod_mask_loss: bool):
        self.packed, self.eod, self.seq_length, self.vocab_size = packed, eod, packed.seq_length, packed.vocab_size
        self.reset_position_ids, self.reset_attention_mask = reset_position_ids, reset_attention_mask
        self.eod_mask_loss = eod_mask_loss

    def __len__(self) -> int:
        return len(self.packed)

    def samples(self, indices: np.ndarray) -> Batch:
        tokens = self.packed.samples(indices)
        if not (self.reset_position_ids or self.reset_attention_mask or self.eod_mask_loss):
            return Batch(tokens=tokens)  # the plain windows, no document ids
        rows = tokens.numpy()
        docs = documents_from_eod(rows[:, :-1], self.eod) if self.reset_position_ids or self.reset_attention_mask \
            else None
        mask = (rows[:, :-1] != self.eod).astype(np.float32) if self.eod_mask_loss else None
        return make_batch(rows, docs, mask, self.reset_position_ids, self.reset_attention_mask)


def _blend(parts: list[SampleDataset], weights: list[Optional[float]]) -> SampleDataset:
    if len(parts) == 1:
        return parts[0]
    if weights[0] is None:  # unweighted: as if the datasets were concatenated
        weights = [len(p) for p in parts]
    keep = [(p, w) for p, w in zip(parts, weights) if w > 0]
    return BlendedDataset([p for p, _ in keep], [w for _, w in keep])


def check_data_path(path: str, data_format: str) -> None:
    """DataError naming `path` when the data it names (a .bin/.idx prefix, a jsonl file) cannot be read."""
    if data_format not in JSONL_FORMATS:
        check_prefix_readable(path)
        return
    what, hint = JSONL_FORMATS[data_format]
    file = Path(path).expanduser()
    if not file.exists():
        raise DataError(f"data.paths: no {what} {file}; give {hint} (data.format={data_format})")
    if not file.is_file():
        raise DataError(f"data.paths: {what} {file} is not a file; give {hint} (data.format={data_format})")
    if not os.access(file, os.R_OK):
        raise DataError(f"data.paths: {what} {file} cannot be read (permission denied); fix its permissions")


def build_datasets(data_cfg, seq_length: int, seed: int) -> tuple[SampleDataset, Optional[SampleDataset]]:
    """(train, valid) datasets of a DataConfig; valid is None when data.split gives it no share."""
    split = list(data_cfg.split)
    has_valid = len(split) > 1 and split[1] > 0
    if data_cfg.paths is None:
        tokens, tok = _corpus_tokens(data_cfg.corpus, data_cfg.tokenizer, data_cfg.cache_dir, data_cfg.max_files)
        packed = PackedDataset(tokens, seq_length, seed, vocab_size=tok.get_vocab_size())
        parts = packed.split(split[1] / sum(split)) if has_valid else (packed, None)
        flags = (data_cfg.reset_position_ids, data_cfg.reset_attention_mask, data_cfg.eod_mask_loss)
        eod = eod_token_id(tok)
        return tuple(CorpusDataset(p, eod, *flags) if p is not None else None for p in parts)

    entries = parse_data_paths(data_cfg.paths)
    for _, path in entries:  # every path, before reading any of them
        check_data_path(path, data_cfg.format)
    tok = load_tokenizer(data_cfg.tokenizer)
    if data_cfg.format in JSONL_FORMATS:
        ensure_chat_tokens(tok)
    eod, vocab_size = eod_token_id(tok), tok.get_vocab_size()
    train_parts, valid_parts = [], []
    for i, (_, path) in enumerate(entries):
        if data_cfg.format == "sft":
            convs = load_conversations(Path(path).expanduser(), tok)
            ranges = split_documents(len(convs), split, path)
            make = lambda r, k: SFTDataset(convs[r[0]:r[1]], seq_length, [seed, i, k], eod, vocab_size,  # noqa: E731
                                           pack=data_cfg.sft_packing)
        elif data_cfg.format == "preference":
            pairs = load_pairs(Path(path).expanduser(), tok)
            ranges = split_documents(len(pairs), split, path)
            make = lambda r, k: PreferenceDataset(pairs[r[0]:r[1]], seq_length, [seed, i, k], eod,  # noqa: E731
                                                  vocab_size, pack=data_cfg.preference_packing,
                                                  name=f"{path} ({('train', 'valid')[k]})")
        else:
            data = open_indexed(path)
            ranges = split_documents(len(data), split, path)
            make = lambda r, k: DocumentPackedDataset(  # noqa: E731
                data, r, seq_length, [seed, i, k], eod, vocab_size, data_cfg.reset_position_ids,
                data_cfg.reset_attention_mask, data_cfg.eod_mask_loss, name=f"{path} ({('train', 'valid')[k]})")
        train_parts.append(make(ranges[0], 0))
        if has_valid:
            valid_parts.append(make(ranges[1], 1))
    weights = [w for w, _ in entries]
    return _blend(train_parts, weights), (_blend(valid_parts, weights) if has_valid else None)
