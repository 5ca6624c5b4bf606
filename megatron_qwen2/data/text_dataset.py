"""A tokenised text corpus as one flat token stream, cut into seeded fixed-length training windows.

The corpus is tokenised once (each document followed by `<|endoftext|>`) and cached on disk as
`<name>-<key>.bin` (raw tokens) plus `<name>-<key>.json` (count, dtype, sha256). The key hashes
the tokenizer file and the corpus files' paths, sizes and mtimes, so a change to either makes a
new cache. Both files are written to temporaries and renamed into place, the sidecar last; a
cache whose size or checksum disagrees with its sidecar is rebuilt.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from tokenizers import Tokenizer

from megatron_qwen2.data.corpus import corpus_files, read_document
from megatron_qwen2.data.sampler import EpochShuffle
from megatron_qwen2.data.tokenizer import eod_token_id, load_tokenizer, tokenizer_file
from megatron_qwen2.errors import DataError

try:
    import fcntl
except ImportError:  # not on Windows: ranks that race simply tokenise the corpus twice
    fcntl = None

DEFAULT_CACHE_DIR = "~/.cache/megatron_qwen2"
_CACHE_FORMAT = 1
_BATCH_CHARS = 4_000_000  # characters per encode_batch call: bounds the memory the Encodings take


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits in it, else int32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


def corpus_tokens(spec: str, tokenizer: Union[str, Path, None] = None, cache_dir: Union[str, Path, None] = None,
                  max_files: Optional[int] = None) -> np.ndarray:
    """The corpus as one flat token array (read-only, memory-mapped), tokenising it unless cached."""
    tokens, _ = _corpus_tokens(spec, tokenizer, cache_dir, max_files)
    return tokens


def build_packed_dataset(data_cfg, seq_length: int, seed: int) -> "PackedDataset":
    """The training dataset of a `DataConfig` (corpus, tokenizer, cache_dir, max_files)."""
    tokens, tok = _corpus_tokens(data_cfg.corpus, data_cfg.tokenizer, data_cfg.cache_dir, data_cfg.max_files)
    return PackedDataset(tokens, seq_length, seed, vocab_size=tok.get_vocab_size())


def _corpus_tokens(spec, tokenizer, cache_dir, max_files) -> tuple[np.ndarray, Tokenizer]:
    files = corpus_files(spec, max_files)
    tok_file = tokenizer_file(tokenizer)
    tok = load_tokenizer(tok_file)
    eod = eod_token_id(tok)
    key = _cache_key(tok_file, files)
    root = Path(os.path.expanduser(cache_dir if cache_dir is not None else DEFAULT_CACHE_DIR))
    stem = f"{_slug(spec)}-{key}"
    bin_path, meta_path = root / f"{stem}.bin", root / f"{stem}.json"
    try:
        root.mkdir(parents=True, exist_ok=True)
        with _exclusive(root / f"{stem}.lock"):  # one process tokenises; the others then find the cache
            tokens = _load_cache(bin_path, meta_path, key)
            if tokens is None:
                tokens = _build_cache(files, tok, eod, key, bin_path, meta_path, spec)
    except OSError as err:
        raise DataError(f"data.cache_dir={str(root)!r}: cannot hold the tokenised corpus ({err.strerror or err}); "
                        "set data.cache_dir to a writable directory with space") from None
    return tokens, tok


def _slug(spec: str) -> str:
    name = Path(spec.rstrip("/*")).name or "corpus"
    return re.sub(r"[^A-Za-z0-9_.]+", "_", name)[:40]


def _cache_key(tok_file: Path, files: Sequence[Path]) -> str:
    h = hashlib.sha256()
    h.update(f"format {_CACHE_FORMAT}\n".encode())
    h.update(hashlib.sha256(tok_file.read_bytes()).digest())
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:24]


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _load_cache(bin_path: Path, meta_path: Path, key: str) -> Optional[np.ndarray]:
    """The cached tokens, or None when the cache is missing, partial or corrupt."""
    try:
        meta = json.loads(meta_path.read_text())
        if meta["format"] != _CACHE_FORMAT or meta["key"] != key:
            return None
        dtype, n = np.dtype(meta["dtype"]), int(meta["num_tokens"])
        if n <= 0 or bin_path.stat().st_size != n * dtype.itemsize or _file_sha256(bin_path) != meta["sha256"]:
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return np.memmap(bin_path, dtype=dtype, mode="r", shape=(n,))


def _build_cache(files: Sequence[Path], tok: Tokenizer, eod: int, key: str, bin_path: Path, meta_path: Path,
                 spec: str) -> np.ndarray:
    start = time.perf_counter()
    dtype = token_dtype(tok.get_vocab_size())
    tokens, num_docs, not_utf8 = _encode_files(files, tok, eod, dtype)
    elapsed = time.perf_counter() - start
    if tokens.size == 0:
        raise DataError(f"corpus {spec!r}: its {len(files)} files hold no UTF-8 text to train on")

    _write_atomic(bin_path, tokens.tobytes())
    meta = {"format": _CACHE_FORMAT, "key": key, "corpus": spec, "num_files": len(files), "num_documents": num_docs,
            "num_tokens": int(tokens.size), "dtype": dtype.name, "eod_id": eod,
            "tokenizer": getattr(tok, "source_path", None), "sha256": _file_sha256(bin_path)}
    _write_atomic(meta_path, (json.dumps(meta, indent=1) + "\n").encode())  # the sidecar commits the cache
    skipped = f", {not_utf8} files skipped as not UTF-8" if not_utf8 else ""
    print(f"tokenised corpus {spec!r}: {num_docs} documents from {len(files)} files{skipped}, {tokens.size:,} tokens "
          f"in {elapsed:.1f}s ({tokens.size / elapsed:,.0f} tokens/s); cached at {bin_path}", flush=True)
    return np.memmap(bin_path, dtype=dtype, mode="r", shape=(tokens.size,))


def _encode_files(files: Sequence[Path], tok: Tokenizer, eod: int, dtype: np.dtype) -> tuple[np.ndarray, int, int]:
    """Tokenise each non-empty file as one document followed by EOD; returns (tokens, documents, files not UTF-8)."""
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # _fast skips character offsets
    eod_arr = np.array([eod], dtype=dtype)
    pieces: list[np.ndarray] = []
    batch: list[str] = []
    batch_chars = num_docs = not_utf8 = 0

    def flush():
        for enc in encode(batch, add_special_tokens=False):
            pieces.append(np.asarray(enc.ids, dtype=dtype))
            pieces.append(eod_arr)
        batch.clear()

    # Special-token strings inside a document (say, a literal "<|endoftext|>") are text, not control tokens.
    parse_special = tok.encode_special_tokens
    tok.encode_special_tokens = True
    try:
        for f in files:
            text = read_document(f)
            if text is None:
                not_utf8 += 1
            elif text.strip():
                batch.append(text)
                batch_chars += len(text)
                num_docs += 1
                if batch_chars >= _BATCH_CHARS:
                    flush()
                    batch_chars = 0
        if batch:
            flush()
    finally:
        tok.encode_special_tokens = parse_special
    tokens = np.concatenate(pieces) if pieces else np.empty(0, dtype=dtype)
    return tokens, num_docs, not_utf8


def _write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, then rename it over `path`."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; the cache may be shared
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _exclusive(lock_path: Path):
    if fcntl is None:
        yield
        return
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class PackedDataset:
    """Fixed-length windows over a flat token stream, in a seeded order that depends only on the sample index.

    The stream is cut into chunks of seq_length tokens; sample i is one chunk plus the next token
    (seq_length + 1 tokens: inputs [:-1], labels [1:]), so every token is a label exactly once per
    epoch. Epoch e visits the chunks in a permutation drawn from seed and e; sample i lies in
    epoch i // len(self), so any index is valid.
    """

    def __init__(self, tokens: np.ndarray, seq_length: int, seed: int, vocab_size: Optional[int] = None,
                 chunks: Optional[np.ndarray] = None):
        if seq_length < 1:
            raise ValueError(f"seq_length must be >= 1, got {seq_length}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        tokens = np.asarray(tokens)
        if tokens.ndim != 1:
            raise ValueError(f"tokens must be one flat stream, got shape {tuple(tokens.shape)}")
        num_chunks = (len(tokens) - 1) // seq_length if len(tokens) else 0
        if chunks is None:
            chunks = np.arange(num_chunks, dtype=np.int64)
        chunks = np.asarray(chunks, dtype=np.int64)
        if len(chunks) == 0:
            raise ValueError(f"{len(tokens)} tokens hold no training window of seq_length + 1 = {seq_length + 1} "
                             "tokens; use a larger corpus or a shorter seq_length")
        if chunks.min() < 0 or chunks.max() >= num_chunks:
            raise ValueError(f"chunk ids must lie in [0, {num_chunks}), got [{chunks.min()}, {chunks.max()}]")
        self.tokens = tokens
        self.seq_length = seq_length
        self.seed = seed
        self.chunks = chunks  # ids of the chunks this dataset draws from; chunk c starts at token c * seq_length
        self.vocab_size = int(vocab_size) if vocab_size is not None else int(tokens.max()) + 1
        self.order = EpochShuffle(len(chunks), seed)  # sample index -> position in self.chunks

    def __len__(self) -> int:
        """Samples per epoch (= chunks)."""
        return len(self.chunks)

    def window_starts(self, indices: np.ndarray) -> np.ndarray:
        """Token offset in the stream of each sample's window."""
        return self.chunks[self.order(indices)] * self.seq_length

    def samples(self, indices: np.ndarray) -> torch.Tensor:
        """The windows of the given sample indices: LongTensor [len(indices), seq_length + 1]."""
        starts = self.window_starts(indices)
        windows = self.tokens[starts[:, None] + np.arange(self.seq_length + 1)]
        return torch.from_numpy(windows.astype(np.int64))

    def __getitem__(self, index: int) -> torch.Tensor:
        """Sample `index`: LongTensor [seq_length + 1]."""
        return self.samples(np.array([index]))[0]

    def global_batch(self, step: int, global_batch_size: int) -> torch.Tensor:
        """Samples step*gbs ... (step+1)*gbs - 1: LongTensor [gbs, seq_length + 1], the same in every layout."""
        if step < 0 or global_batch_size < 1:
            raise ValueError(f"need step >= 0 and global_batch_size >= 1, got step={step}, "
                             f"global_batch_size={global_batch_size}")
        return self.samples(np.arange(step * global_batch_size, (step + 1) * global_batch_size))

    def split(self, valid_fraction: float) -> tuple["PackedDataset", "PackedDataset"]:
        """(train, valid) over disjoint chunks: valid takes the last `valid_fraction` of this dataset's stream."""
        if not 0 < valid_fraction < 1:
            raise ValueError(f"valid_fraction must lie in (0, 1), got {valid_fraction}")
        num_valid = max(1, round(len(self.chunks) * valid_fraction))
        if num_valid >= len(self.chunks):
            raise ValueError(f"valid_fraction={valid_fraction} leaves no training chunks out of {len(self.chunks)}")
        chunks = np.sort(self.chunks)

        def part(ids):
            return PackedDataset(self.tokens, self.seq_length, self.seed, self.vocab_size, ids)

        return part(chunks[:-num_valid]), part(chunks[-num_valid:])
