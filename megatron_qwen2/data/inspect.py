"""Look inside an indexed dataset (this project's format or Megatron-LM's): its header, a document,
or a training sample as the loop builds it.

    python tools/inspect_data.py PREFIX                          # header and counts
    python tools/inspect_data.py PREFIX --document N [--tokenizer DIR]
    python tools/inspect_data.py PREFIX --sample I --seq-length L [--seed S] [--split 98,2] \
        [--reset-position-ids] [--reset-attention-mask] [--eod-mask-loss] [--tokenizer DIR]

`--json` prints one JSON object per line instead. A sample is built by `build_datasets` for a
DataConfig with `paths=[PREFIX]` and the given split and flags (the defaults are train.py's), so
sample I is row I of the run's sample stream: row I - k * gbs of global batch k.

Neither format records the tokenizer that made it, nor its vocabulary size (this project's
format records only the token size): text is shown when `--tokenizer` is given.
"""

from __future__ import annotations

import json
import os
import struct
import sys
import textwrap
from dataclasses import fields
from typing import Optional, Sequence

import numpy as np

from megatron_qwen2.config import DataConfig, TrainConfig
from megatron_qwen2.data.indexed import IndexedDataset, data_file_paths, open_indexed
from megatron_qwen2.errors import EXIT_CONFIG, ConfigError, TrainingError

_DATA_DEFAULTS = {f.name: f.default for f in fields(DataConfig) if f.name in (
    "reset_position_ids", "reset_attention_mask", "eod_mask_loss")}
_DATA_DEFAULTS["split"] = DataConfig().split
_TRAIN_DEFAULTS = TrainConfig()


def _version(idx_path, native: bool) -> int:
    """The version field of an index the reader has already accepted."""
    with open(idx_path, "rb") as f:
        head = f.read(17)
    return struct.unpack_from("<I", head, 8)[0] if native else struct.unpack_from("<Q", head, 9)[0]


def header(data) -> dict:
    """The header fields and counts of an opened dataset (`open_indexed`)."""
    native = isinstance(data, IndexedDataset)
    bin_path, idx_path = data_file_paths(data.prefix)
    lengths = data.document_lengths
    info = {
        "prefix": data.prefix,
        "format": "native" if native else "megatron",
        "magic": "MQ2TOKS" if native else "MMIDIDX",
        "version": _version(idx_path, native),
        "dtype": data.dtype.name,
        "vocab_size": None,  # neither format records it, nor the tokenizer
        "tokenizer": None,
        "num_documents": len(data),
    }
    if not native:
        info["num_sequences"] = len(data.sequence_lengths)
    info["num_tokens"] = int(data.num_tokens)
    if native:
        info["chunk_bytes"] = data.chunk_bytes
        info["num_chunks"] = len(data.chunk_crc32)
        info["bin_crc32"] = f"{data.bin_crc32:#010x}"
    info.update(
        min_document_tokens=int(lengths.min()) if len(lengths) else 0,
        max_document_tokens=int(lengths.max()) if len(lengths) else 0,
        mean_document_tokens=round(float(lengths.mean()), 2) if len(lengths) else 0.0,
        bin_path=str(bin_path), bin_bytes=os.path.getsize(bin_path),
        idx_path=str(idx_path), idx_bytes=os.path.getsize(idx_path),
    )
    return info


def document(data, n: int, tokenizer=None) -> dict:
    """Document n's tokens (and text, with a tokenizer)."""
    if not 0 <= n < len(data):
        raise ConfigError(f"--document {n} is out of range: {data.prefix} holds {len(data)} documents; give "
                          f"--document from 0 to {len(data) - 1}" if len(data) else
                          f"--document {n}: {data.prefix} holds no documents")
    tokens = np.asarray(data[n]).astype(np.int64).tolist()
    out = {"document": n, "num_tokens": len(tokens), "start": int(data.offsets[n]), "tokens": tokens}
    if tokenizer is not None:
        out["text"] = tokenizer.decode(tokens, skip_special_tokens=False)
    return out


def sample(prefix: str, index: int, seq_length: int, seed: int, split: Sequence[float], reset_position_ids: bool,
           reset_attention_mask: bool, eod_mask_loss: bool, tokenizer_path: Optional[str] = None,
           with_text: bool = False) -> dict:
    """Training sample `index` of `data.paths=[prefix]`, built by build_datasets as train.py builds it."""
    from megatron_qwen2.data.builder import build_datasets
    from megatron_qwen2.data.packed import DocumentPackedDataset
    from megatron_qwen2.data.tokenizer import load_tokenizer

    if index < 0:
        raise ConfigError(f"--sample {index} is negative; give a sample index >= 0")
    if seq_length < 1:
        raise ConfigError(f"--seq-length {seq_length} must be >= 1")
    cfg = DataConfig(tokenizer=tokenizer_path, paths=[prefix], split=list(split),
                     reset_position_ids=reset_position_ids, reset_attention_mask=reset_attention_mask,
                     eod_mask_loss=eod_mask_loss).validate()
    train_set, _ = build_datasets(cfg, seq_length, seed)
    batch = train_set.samples(np.array([index]))
    s = batch.tokens.shape[1] - 1
    tokens = batch.tokens[0].tolist()
    out = {
        "sample": index,
        "num_tokens": len(tokens),
        "samples_per_epoch": len(train_set),
        "epoch": index // len(train_set),
        "seq_length": seq_length,
        "seed": seed,
        "split": [float(w) for w in split],
        "reset_position_ids": reset_position_ids,
        "reset_attention_mask": reset_attention_mask,
        "eod_mask_loss": eod_mask_loss,
    }
    if isinstance(train_set, DocumentPackedDataset):
        start = int(train_set.window_starts(np.array([index]))[0])
        out["start"] = start
        out["first_document"] = int(np.searchsorted(train_set.data.offsets, start, side="right") - 1)
    out.update(
        tokens=tokens,
        loss_mask=batch.loss_mask[0].int().tolist() if batch.loss_mask is not None else [1] * s,
        position_ids=batch.positions()[0].tolist(),
        document_ids=batch.document_ids[0].tolist() if batch.document_ids is not None else [0] * s,
    )
    if with_text:
        out["text"] = load_tokenizer(tokenizer_path).decode(tokens, skip_special_tokens=False)
    return out


def _wrapped(values) -> str:
    return textwrap.fill(" ".join(str(v) for v in values), width=100, initial_indent="  ", subsequent_indent="  ")


def format_header(info: dict) -> str:
    width = max(len(k) for k in info)
    lines = []
    for k, v in info.items():
        if v is None:
            v = "not recorded"
        elif isinstance(v, int) and k != "version":
            v = f"{v:,}"
        lines.append(f"{k.replace('_', ' '):<{width}}  {v}")
    return "\n".join(lines)


def format_document(doc: dict, prefix: str) -> str:
    lines = [f"document {doc['document']} of {prefix}: {doc['num_tokens']:,} tokens "
             f"(tokens [{doc['start']:,}, {doc['start'] + doc['num_tokens']:,}) of the .bin)", "tokens:",
             _wrapped(doc["tokens"])]
    if "text" in doc:
        lines += ["text:", doc["text"]]
    return "\n".join(lines)


def format_sample(smp: dict, prefix: str) -> str:
    flags = [f for f in ("reset_position_ids", "reset_attention_mask", "eod_mask_loss") if smp[f]]
    where = ""
    if "start" in smp:
        where = f"; from token {smp['start']:,} of the .bin (document {smp['first_document']:,})"
    lines = [f"sample {smp['sample']:,} of {prefix} (train split, {smp['samples_per_epoch']:,} samples per epoch, "
             f"epoch {smp['epoch']}): seq_length {smp['seq_length']}, seed {smp['seed']}, split {smp['split']}, "
             f"flags {', '.join(flags) or 'none'}{where}",
             f"{'j':>6} {'input':>8} {'label':>8} {'loss_mask':>9} {'position':>8} {'document':>8}"]
    for j in range(smp["num_tokens"] - 1):
        lines.append(f"{j:>6} {smp['tokens'][j]:>8} {smp['tokens'][j + 1]:>8} {smp['loss_mask'][j]:>9} "
                     f"{smp['position_ids'][j]:>8} {smp['document_ids'][j]:>8}")
    if "text" in smp:
        lines += ["text:", smp["text"]]
    return "\n".join(lines)


def _split(text: str) -> list[float]:
    parts = text.strip().strip("[]").replace(",", " ").split()
    try:
        return [float(p) for p in parts]
    except ValueError:
        raise ConfigError(f"--split {text!r}: give train,valid weights, e.g. --split 98,2") from None


def run(args) -> None:
    """Print what `args` asks for; DataError / ConfigError on bad input."""
    from megatron_qwen2.data.tokenizer import load_tokenizer

    if args.sample is not None:
        out = sample(args.prefix, args.sample, args.seq_length, args.seed, _split(args.split), args.reset_position_ids,
                     args.reset_attention_mask, args.eod_mask_loss, args.tokenizer,
                     with_text=args.tokenizer is not None)
        print(json.dumps(out) if args.json else format_sample(out, args.prefix))
        return
    data = open_indexed(args.prefix)
    if args.document is not None:
        tok = load_tokenizer(args.tokenizer) if args.tokenizer is not None else None
        out = document(data, args.document, tok)
        print(json.dumps(out) if args.json else format_document(out, args.prefix))
        return
    info = header(data)
    print(json.dumps(info) if args.json else format_header(info))


def main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Show the header, a document or a training sample of an indexed "
                                     "dataset (PREFIX.bin + PREFIX.idx, this project's format or Megatron-LM's).")
    parser.add_argument("prefix", help="the dataset's prefix, as in data.paths (PREFIX.bin + PREFIX.idx)")
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--document", type=int, metavar="N", help="show document N's tokens (0-based)")
    what.add_argument("--sample", type=int, metavar="I", help="show training sample I as the loop builds it for "
                      "data.paths=[PREFIX] (needs the tokenizer the loop would use: --tokenizer)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer.json or a directory holding one: shows text, "
                        "and is data.tokenizer for --sample (default there: the repository's tokenizer)")
    parser.add_argument("--seq-length", type=int, default=_TRAIN_DEFAULTS.seq_length,
                        help=f"train.seq_length for --sample (default {_TRAIN_DEFAULTS.seq_length})")
    parser.add_argument("--seed", type=int, default=_TRAIN_DEFAULTS.seed,
                        help=f"train.seed for --sample (default {_TRAIN_DEFAULTS.seed})")
    parser.add_argument("--split", default=",".join(f"{w:g}" for w in _DATA_DEFAULTS["split"]),
                        help="data.split for --sample as train,valid weights (default "
                        f"{','.join(f'{w:g}' for w in _DATA_DEFAULTS['split'])}); the sample is from the train part")
    for flag in ("reset_position_ids", "reset_attention_mask", "eod_mask_loss"):
        parser.add_argument(f"--{flag.replace('_', '-')}", action="store_true", default=_DATA_DEFAULTS[flag],
                            help=f"data.{flag}=true for --sample")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    args = parser.parse_args(argv)
    try:
        run(args)
    except TrainingError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    except BrokenPipeError:  # output piped into `head`
        sys.stdout = open(os.devnull, "w")
    return 0
