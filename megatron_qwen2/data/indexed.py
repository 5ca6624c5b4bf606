"""Indexed token files: PREFIX.bin (the tokens of every document, back to back) + PREFIX.idx.

PREFIX.bin holds the token ids as raw little-endian uint16 (vocabularies of at most 65,536
tokens) or uint32, document after document; each document ends with its end-of-document token.

PREFIX.idx is a 48-byte little-endian header followed by the document offsets:

    offset  size  field
    0       8     magic b"MQ2TOKS\\0"
    8       4     version (uint32, currently 1)
    12      4     token size in bytes (uint32: 2 = uint16, 4 = uint32)
    16      8     number of documents N (uint64)
    24      8     number of tokens T (uint64); PREFIX.bin is exactly T * token size bytes
    32      4     CRC-32 of PREFIX.bin (checked by `verify()`, which reads the whole file)
    36      4     CRC-32 of the offsets array (checked on every open)
    40      8     reserved, zero
    48      8*(N+1)  offsets (int64): document i is tokens [offsets[i], offsets[i+1]); offsets[0] = 0,
                   offsets[N] = T, non-decreasing

Opening checks the magic, version, token size, the idx file's length, the offsets' checksum and
order, and that the .bin has exactly T tokens, so a truncated, corrupt or mismatched pair fails
at once with a ValueError naming the file. Both files are written to temporaries and renamed into
place, the .idx last: a crash leaves no half-written pair behind.
"""

from __future__ import annotations

import contextlib
import os
import struct
import tempfile
import zlib
from pathlib import Path
from typing import Union

import numpy as np

MAGIC = b"MQ2TOKS\0"
VERSION = 1
_HEADER = struct.Struct("<8sIIQQII8x")  # 48 bytes
_DTYPES = {2: np.dtype("<u2"), 4: np.dtype("<u4")}


def index_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id of a vocabulary of `vocab_size` tokens fits in it, else uint32."""
    if vocab_size <= 0 or vocab_size > 1 << 32:
        raise ValueError(f"vocab_size must lie in [1, 2**32], got {vocab_size}")
    return _DTYPES[2] if vocab_size <= 1 << 16 else _DTYPES[4]


def data_file_paths(prefix: Union[str, Path]) -> tuple[Path, Path]:
    """(PREFIX.bin, PREFIX.idx)."""
    prefix = str(Path(prefix).expanduser())
    return Path(prefix + ".bin"), Path(prefix + ".idx")


def _temp_beside(path: Path):
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, 0o644)  # mkstemp makes 0600; data files are usually shared
    return os.fdopen(fd, "wb"), Path(tmp)


class IndexedDatasetWriter:
    """Appends documents to PREFIX.bin/.idx temporaries; `close()` renames them into place.

    Used as a context manager: leaving the block by an exception removes the temporaries and
    leaves any earlier PREFIX.bin/.idx untouched.
    """

    def __init__(self, prefix: Union[str, Path], dtype: np.dtype):
        self.dtype = np.dtype(dtype).newbyteorder("<")
        if self.dtype.itemsize not in _DTYPES or self.dtype.kind != "u":
            raise ValueError(f"token dtype must be uint16 or uint32, got {dtype}")
        self.bin_path, self.idx_path = data_file_paths(prefix)
        self.bin_path.parent.mkdir(parents=True, exist_ok=True)
        self._bin, self._bin_tmp = _temp_beside(self.bin_path)
        self._offsets = [0]
        self._crc = 0
        self._closed = False

    def add_document(self, tokens) -> None:
        """Append one document (its ids, end-of-document token included)."""
        arr = np.asarray(tokens)
        if arr.ndim != 1:
            raise ValueError(f"a document is a flat array of token ids, got shape {arr.shape}")
        if arr.size and (arr.min() < 0 or arr.max() > np.iinfo(self.dtype).max):
            raise ValueError(f"token ids must lie in [0, {np.iinfo(self.dtype).max}] for {self.dtype.name}, got "
                             f"[{arr.min()}, {arr.max()}]")
        data = arr.astype(self.dtype, copy=False).tobytes()
        self._bin.write(data)
        self._crc = zlib.crc32(data, self._crc)
        self._offsets.append(self._offsets[-1] + arr.size)

    @property
    def num_documents(self) -> int:
        return len(self._offsets) - 1

    @property
    def num_tokens(self) -> int:
        return self._offsets[-1]

    def close(self) -> None:
        """Write the index and make the pair visible (.bin first, .idx last)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._bin.flush()
            os.fsync(self._bin.fileno())
            self._bin.close()
            offsets = np.asarray(self._offsets, dtype="<i8").tobytes()
            header = _HEADER.pack(MAGIC, VERSION, self.dtype.itemsize, self.num_documents, self.num_tokens,
                                  self._crc, zlib.crc32(offsets))
            idx, idx_tmp = _temp_beside(self.idx_path)
            try:
                with idx:
                    idx.write(header)
                    idx.write(offsets)
                    idx.flush()
                    os.fsync(idx.fileno())
                os.replace(self._bin_tmp, self.bin_path)
                os.replace(idx_tmp, self.idx_path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(idx_tmp)
                raise
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Drop the temporaries; nothing becomes visible."""
        self._closed = True
        with contextlib.suppress(OSError):
            self._bin.close()
        with contextlib.suppress(OSError):
            os.unlink(self._bin_tmp)

    def __enter__(self) -> "IndexedDatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_indexed_dataset(prefix: Union[str, Path], documents, vocab_size: int) -> None:
    """Write every document of an iterable of token-id sequences as PREFIX.bin/.idx."""
    with IndexedDatasetWriter(prefix, index_dtype(vocab_size)) as writer:
        for doc in documents:
            writer.add_document(doc)


class IndexedDataset:
    """A memory-mapped PREFIX.bin/.idx pair: `tokens` (all of them, flat) and `offsets` [N + 1]."""

    def __init__(self, prefix: Union[str, Path]):
        self.prefix = str(prefix)
        self.bin_path, self.idx_path = data_file_paths(prefix)
        for path in (self.idx_path, self.bin_path):
            if not path.is_file():
                raise FileNotFoundError(f"data prefix {self.prefix!r}: missing {path} (make the pair with "
                                        "tools/preprocess_data.py)")
        idx_size = self.idx_path.stat().st_size
        if idx_size < _HEADER.size:
            raise ValueError(f"{self.idx_path}: {idx_size} bytes, too short for the {_HEADER.size}-byte header "
                             "(truncated or not an index file)")
        with open(self.idx_path, "rb") as f:
            magic, version, itemsize, num_docs, num_tokens, self.bin_crc32, offsets_crc = \
                _HEADER.unpack(f.read(_HEADER.size))
        if magic != MAGIC:
            raise ValueError(f"{self.idx_path}: bad magic {magic!r} (expected {MAGIC!r}); not an index file of "
                             "this format")
        if version != VERSION:
            raise ValueError(f"{self.idx_path}: format version {version}, this reader knows {VERSION}")
        if itemsize not in _DTYPES:
            raise ValueError(f"{self.idx_path}: token size {itemsize} bytes; expected 2 (uint16) or 4 (uint32)")
        self.dtype = _DTYPES[itemsize]
        expected = _HEADER.size + 8 * (num_docs + 1)
        if idx_size != expected:
            raise ValueError(f"{self.idx_path}: {idx_size} bytes, but a header for {num_docs} documents needs "
                             f"{expected} (truncated or corrupt)")
        self.offsets = np.memmap(self.idx_path, dtype="<i8", mode="r", offset=_HEADER.size, shape=(num_docs + 1,))
        if zlib.crc32(self.offsets.tobytes()) != offsets_crc:
            raise ValueError(f"{self.idx_path}: the document offsets fail their checksum (corrupt index)")
        if self.offsets[0] != 0 or self.offsets[-1] != num_tokens or np.any(np.diff(self.offsets) < 0):
            raise ValueError(f"{self.idx_path}: document offsets are not a non-decreasing run from 0 to "
                             f"{num_tokens} tokens (corrupt index)")
        bin_size = self.bin_path.stat().st_size
        if bin_size != num_tokens * itemsize:
            raise ValueError(f"{self.bin_path}: {bin_size} bytes, but {self.idx_path} describes {num_tokens} tokens "
                             f"of {itemsize} bytes = {num_tokens * itemsize} bytes (truncated, or .bin and .idx "
                             "are from different runs)")
        self.num_tokens = int(num_tokens)
        # np.memmap refuses empty files; an empty dataset has no tokens to map.
        self.tokens = (np.memmap(self.bin_path, dtype=self.dtype, mode="r", shape=(self.num_tokens,))
                       if self.num_tokens else np.empty(0, dtype=self.dtype))

    def __len__(self) -> int:
        """Number of documents."""
        return len(self.offsets) - 1

    @property
    def document_lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __getitem__(self, i: int) -> np.ndarray:
        """Document i's tokens (a read-only view)."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"document {i} out of range for {len(self)} documents in {self.prefix}")
        i %= len(self)
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]

    def verify(self) -> None:
        """Read the whole .bin and check it against the index's CRC-32 (ValueError naming the file if not)."""
        crc = 0
        with open(self.bin_path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                crc = zlib.crc32(block, crc)
        if crc != self.bin_crc32:
            raise ValueError(f"{self.bin_path}: checksum {crc:#010x} differs from {self.bin_crc32:#010x} recorded in "
                             f"{self.idx_path} (corrupt, or .bin and .idx are from different runs)")
