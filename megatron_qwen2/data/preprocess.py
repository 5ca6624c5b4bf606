"""Tokenise jsonl / Parquet / text files into an indexed PREFIX.bin/.idx pair (`tools/preprocess_data.py`).

The pair is in this project's format (`native`, indexed.py: uint16 or uint32 tokens, checksums)
or in Megatron-LM's (`megatron`, megatron_indexed.py: uint16 or int32 tokens as Megatron-LM's
preprocessing picks them, one sequence per document), which Megatron-LM, NeMo and data.paths read.

A .jsonl (or .json) input holds one document per line, its text under `json_key`; any other file
is one document. A .parquet input holds one document per row, its text in column `json_key`, read
one row group at a time so memory stays flat however large the file. A directory written by
Hugging Face `datasets`' `save_to_disk` (state.json, dataset_info.json and Arrow stream files) is
read the same way, record batch by record batch, with pyarrow alone (`datasets` is not needed).
Null and blank texts are skipped. Each document is tokenised without added special tokens, with special-token
strings inside the text read as plain text (a literal "<|endoftext|>" in a document does not end
it), and followed by the end-of-document token. Workers tokenise batches of documents in parallel;
the output is written in input order, so it is the same for any number of workers. An existing
PREFIX.bin or PREFIX.idx is left as it is unless --overwrite is given.
"""

from __future__ import annotations

import glob
import itertools
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import numpy as np
from tqdm import tqdm

from megatron_qwen2.data.indexed import IndexedDatasetWriter, data_file_paths, index_dtype
from megatron_qwen2.data.megatron_indexed import MegatronIndexedDatasetWriter, megatron_dtype
from megatron_qwen2.data.tokenizer import eod_token_id, load_tokenizer, tokenizer_file
from megatron_qwen2.errors import EXIT_CONFIG, EXIT_IO, ConfigError, DataError, TrainingError

JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIX = ".parquet"
_ARROW_BATCH_ROWS = 1024  # rows read from a Parquet row group at a time
_BATCH_DOCS = 256  # documents per worker task
OUTPUT_FORMATS = ("native", "megatron")


def is_hf_dataset_dir(path: Path) -> bool:
    """True when `path` is a directory written by `datasets.Dataset.save_to_disk`."""
    return path.is_dir() and (path / "state.json").is_file() and (path / "dataset_info.json").is_file()


def _input_entry(path: Path) -> bool:
    if path.is_dir() and (path / "dataset_dict.json").is_file():
        splits = sorted(p.name for p in path.iterdir() if is_hf_dataset_dir(p))
        raise DataError(f"--input {path} is a saved DatasetDict (splits: {', '.join(splits) or 'none'}); give one "
                        f"split's directory, e.g. {path / (splits[0] if splits else 'train')}")
    return path.is_file() or is_hf_dataset_dir(path)


def expand_inputs(patterns: Sequence[str]) -> list[Path]:
    """The inputs that the given paths / glob patterns name, each pattern's matches sorted, duplicates dropped.

    An input is a file or a `save_to_disk` dataset directory.
    """
    files: list[Path] = []
    for pattern in patterns:
        path = Path(os.path.expanduser(pattern))
        matches = [path] if _input_entry(path) else sorted(
            Path(p) for p in glob.glob(os.path.expanduser(pattern), recursive=True) if _input_entry(Path(p)))
        if not matches:
            raise DataError(f"--input {pattern!r} matches no files; give existing files, glob patterns or a "
                            "directory written by datasets' save_to_disk")
        files.extend(m for m in matches if m not in files)
    return files


def _pyarrow(path: Path):
    try:
        import pyarrow
        import pyarrow.ipc  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise DataError(f"--input {path}: reading Parquet / Arrow data needs pyarrow; pip install pyarrow") from None
    return pyarrow


def _arrow_files(path: Path) -> list[Path]:
    """The Arrow stream files of a save_to_disk directory, in the dataset's order."""
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
        names = [entry["filename"] for entry in state["_data_files"]]
    except (ValueError, KeyError, TypeError):
        raise DataError(f"--input {path}: state.json does not list the dataset's files (_data_files); is it a "
                        "directory written by datasets' save_to_disk?") from None
    return [path / name for name in names]


def _text_column(path: Path, schema, json_key: str) -> None:
    """DataError naming the file, the column and the columns there unless `schema` has a text column `json_key`."""
    pa = _pyarrow(path)
    if json_key not in schema.names:
        raise DataError(f"{path}: no column {json_key!r} (columns: {', '.join(schema.names)}); set --json-key to "
                        "the text column")
    column_type = schema.field(json_key).type
    if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
        raise DataError(f"{path}: column {json_key!r} is {column_type}, not text; set --json-key to the text column")


def check_inputs(files: Sequence[Path], json_key: str = "text") -> None:
    """DataError before any tokenising when a Parquet file or saved dataset lacks the text column `json_key`."""
    for path in files:
        try:
            if path.is_dir():
                pa = _pyarrow(path)
                for arrow_path in _arrow_files(path):
                    with pa.memory_map(str(arrow_path)) as source:
                        _text_column(arrow_path, pa.ipc.open_stream(source).schema, json_key)
            elif path.suffix == PARQUET_SUFFIX:
                pa = _pyarrow(path)
                with pa.parquet.ParquetFile(path) as parquet:
                    _text_column(path, parquet.schema_arrow, json_key)
        except OSError as err:
            raise DataError(f"--input file {getattr(err, 'filename', None) or path} cannot be read "
                            f"({err.strerror or err})") from None
        except _arrow_errors() as err:
            raise DataError(f"--input {path}: not readable as {'a saved dataset' if path.is_dir() else 'Parquet'} "
                            f"({str(err).splitlines()[0]})") from None


def _arrow_errors() -> tuple:
    """pyarrow's exception class when pyarrow is installed (to name the input a read error came from)."""
    try:
        import pyarrow
    except ImportError:
        return ()
    return (pyarrow.ArrowException,)


def iter_documents(files: Sequence[Path], json_key: str = "text") -> Iterator[str]:
    """The text of every document of the input files, in order (blank documents skipped)."""
    for path in files:
        try:
            yield from _file_documents(path, json_key)
        except OSError as err:
            raise DataError(f"--input file {path} cannot be read ({err.strerror or err})") from None
        except UnicodeDecodeError as err:
            raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
        except _arrow_errors() as err:
            raise DataError(f"--input {path}: not readable ({str(err).splitlines()[0]})") from None


def _texts(column) -> Iterator[str]:
    for text in column.to_pylist():
        if text is not None and text.strip():
            yield text


def _parquet_documents(path: Path, json_key: str) -> Iterator[str]:
    pa = _pyarrow(path)
    with pa.parquet.ParquetFile(path) as parquet:
        _text_column(path, parquet.schema_arrow, json_key)
        for row_group in range(parquet.num_row_groups):  # one row group in memory at a time
            for batch in parquet.iter_batches(batch_size=_ARROW_BATCH_ROWS, row_groups=[row_group],
                                              columns=[json_key]):
                yield from _texts(batch.column(0))


def _dataset_documents(path: Path, json_key: str) -> Iterator[str]:
    pa = _pyarrow(path)
    for arrow_path in _arrow_files(path):
        with pa.memory_map(str(arrow_path)) as source:  # mapped, not loaded: pages come and go as batches are read
            reader = pa.ipc.open_stream(source)
            _text_column(arrow_path, reader.schema, json_key)
            for batch in reader:
                yield from _texts(batch.column(json_key))


def _file_documents(path: Path, json_key: str) -> Iterator[str]:
    if path.is_dir():
        yield from _dataset_documents(path, json_key)
    elif path.suffix == PARQUET_SUFFIX:
        yield from _parquet_documents(path, json_key)
    elif path.suffix in JSONL_SUFFIXES:
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}:{line_no}: not valid JSON ({err.msg})") from None
                if not isinstance(record, dict) or not isinstance(record.get(json_key), str):
                    raise DataError(f"{path}:{line_no}: expected an object with a string field {json_key!r} "
                                    "(set --json-key)")
                if record[json_key].strip():
                    yield record[json_key]
    else:
        text = path.read_text(encoding="utf-8")
        if text.strip():
            yield text


_worker_tok = None


def _init_worker(tok_path: str, parallel: bool) -> None:
    global _worker_tok
    if not parallel:  # several worker processes: one thread each, no oversubscription
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_tok = load_tokenizer(tok_path)
    _worker_tok.encode_special_tokens = True  # special-token strings in a document are text


def _encode_batch(texts: list[str]) -> list[list[int]]:
    encode = getattr(_worker_tok, "encode_batch_fast", _worker_tok.encode_batch)  # _fast skips offsets
    return [enc.ids for enc in encode(texts, add_special_tokens=False)]


def _batches(docs: Iterator[str], size: int) -> Iterator[list[str]]:
    while True:
        batch = list(itertools.islice(docs, size))
        if not batch:
            return
        yield batch


def check_output_free(output_prefix: Union[str, Path]) -> None:
    """ConfigError naming the files when output_prefix.bin or .idx already exists."""
    existing = [str(p) for p in data_file_paths(output_prefix) if os.path.lexists(p)]
    if existing:
        raise ConfigError(f"--output-prefix {str(output_prefix)!r}: {' and '.join(existing)} already exist"
                          f"{'s' if len(existing) == 1 else ''}; pass --overwrite to replace "
                          f"{'it' if len(existing) == 1 else 'them'}, or choose another prefix")


def _writer(output_prefix: Union[str, Path], output_format: str, vocab_size: int):
    if output_format == "megatron":
        return MegatronIndexedDatasetWriter(output_prefix, megatron_dtype(vocab_size))
    return IndexedDatasetWriter(output_prefix, index_dtype(vocab_size))


def preprocess(inputs: Sequence[str], tokenizer: Union[str, Path, None], output_prefix: Union[str, Path],
               workers: int = 1, json_key: str = "text", progress: bool = True, overwrite: bool = False,
               output_format: str = "native") -> dict:
    """Tokenise `inputs` (paths / globs) into output_prefix.bin/.idx in `output_format`; returns counts and timing.

    An existing output_prefix.bin or .idx is kept (ConfigError) unless `overwrite`; with it, the
    pair is replaced only once the new one is complete.
    """
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    if output_format not in OUTPUT_FORMATS:
        raise ConfigError(f"--format {output_format!r}: choose one of {', '.join(OUTPUT_FORMATS)}")
    if not overwrite:
        check_output_free(output_prefix)
    files = expand_inputs(inputs)
    check_inputs(files, json_key)
    tok_path = str(tokenizer_file(tokenizer))
    tok = load_tokenizer(tok_path)
    eod = eod_token_id(tok)
    vocab_size = tok.get_vocab_size()
    start = time.perf_counter()
    docs = iter_documents(files, json_key)
    bar = tqdm(unit=" docs", disable=not progress, file=sys.stderr, desc="tokenising")
    pool = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn").Pool(
        workers, _init_worker, (tok_path, False)) if workers > 1 else None
    if pool is None:
        _init_worker(tok_path, True)
    try:
        with _writer(output_prefix, output_format, vocab_size) as writer:
            batches = _batches(docs, _BATCH_DOCS)
            while True:
                # A bounded window of batches at a time: memory stays flat however large the input.
                window = list(itertools.islice(batches, 4 * workers))
                if not window:
                    break
                encoded = pool.map(_encode_batch, window) if pool is not None else map(_encode_batch, window)
                for ids_list in encoded:
                    for ids in ids_list:
                        writer.add_document(np.append(np.asarray(ids, dtype=np.int64), eod))
                    bar.update(len(ids_list))
                    elapsed = max(time.perf_counter() - start, 1e-9)
                    bar.set_postfix_str(f"{writer.num_tokens / elapsed:,.0f} tokens/s", refresh=False)
            if writer.num_documents == 0:
                raise DataError(f"inputs {list(inputs)} hold no non-empty documents")
            stats = {"files": len(files), "documents": writer.num_documents, "tokens": writer.num_tokens}
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
    elapsed = max(time.perf_counter() - start, 1e-9)
    stats.update(seconds=elapsed, tokens_per_s=stats["tokens"] / elapsed, vocab_size=vocab_size,
                 format=output_format)
    bin_path, idx_path = data_file_paths(output_prefix)
    if progress:
        print(f"wrote {stats['documents']:,} documents, {stats['tokens']:,} tokens from {len(files)} files in "
              f"{elapsed:.1f}s ({stats['tokens_per_s']:,.0f} tokens/s) to {bin_path} + {idx_path} "
              f"({output_format} format)", file=sys.stderr)
    return stats


def main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Tokenise jsonl / Parquet / text files or a saved "
                                     "Hugging Face dataset into PREFIX.bin + PREFIX.idx.")
    parser.add_argument("--input", nargs="+", required=True, help="files or glob patterns (.jsonl: one document per "
                        "line; .parquet: one per row; any other file: one document), or directories written by "
                        "datasets' save_to_disk (one document per row)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer.json or a directory holding one (default: the "
                        "repository's tokenizer)")
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    parser.add_argument("--workers", type=int, default=1, help="tokenising processes (default 1)")
    parser.add_argument("--json-key", default="text", help="field holding the text in .jsonl records, or "
                        "the text column of Parquet files and saved datasets (default: text)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing PREFIX.bin / PREFIX.idx "
                        "(without it the tool refuses to write onto them)")
    parser.add_argument("--format", choices=OUTPUT_FORMATS, default="native", help="native: this project's "
                        "format, with checksums (default); megatron: Megatron-LM's indexed dataset (MMIDIDX), read "
                        "by Megatron-LM and NeMo too")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    args = parser.parse_args(argv)
    try:
        preprocess(args.input, args.tokenizer, args.output_prefix, args.workers, args.json_key,
                   progress=not args.quiet, overwrite=args.overwrite, output_format=args.format)
    except TrainingError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as err:  # writing the output: the inputs' read errors are DataErrors
        print(f"error: cannot write {err.filename or args.output_prefix} ({err.strerror or err}); choose a "
              "writable --output-prefix with space", file=sys.stderr)
        return EXIT_IO
    return 0
