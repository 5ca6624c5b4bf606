"""Indexed token files: PREFIX.bin (the tokens of every document, back to back) + PREFIX.idx.

PREFIX.bin holds the token ids as raw little-endian uint16 (vocabularies of at most 65,536
tokens) or uint32, document after document; each document ends with its end-of-document token.

PREFIX.idx is a 48-byte little-endian header, the document offsets, then the chunk checksums:

    offset  size  field
    0       8     magic b"MQ2TOKS\\0"
    8       4     version (uint32: 2; version 1 files are read too, see below)
    12      4     token size in bytes (uint32: 2 = uint16, 4 = uint32)
    16      8     number of documents N (uint64)
    24      8     number of tokens T (uint64); PREFIX.bin is exactly T * token size bytes
    32      4     CRC-32 of the whole PREFIX.bin
    36      4     CRC-32 of the offsets array (checked on every open)
    40      4     chunk size C in bytes (uint32, a power of two >= the token size)
    44      4     CRC-32 of the chunk checksum array (checked on every open)
    48      8*(N+1)  offsets (int64): document i is tokens [offsets[i], offsets[i+1]); offsets[0] = 0,
                     offsets[N] = T, non-decreasing
    ...     4*K   chunk checksums (uint32): CRC-32 of bytes [k*C, (k+1)*C) of PREFIX.bin, the last
                  chunk shorter; K = ceil(T * token size / C)

Opening checks the magic, version, token size, the idx file's length, both checksum arrays, the
offsets' order, and that the .bin has exactly T tokens, so a truncated or mismatched pair fails
at once with a DataError naming the file. The tokens themselves are verified lazily: every read
(`windows`, `dataset[i]`) first checks, once per chunk and process, the CRC-32 of each chunk it
touches, so a corrupt byte stops the reader with a DataError naming the .bin before its tokens
are returned. Over an epoch this reads the file once more, spread over the batches that first
touch each chunk (bench/data_verify.py measures it).

A version 1 index (bytes 40..47 zero, no chunk checksums) is read as one chunk covering the whole
.bin: the first read verifies the whole file against its CRC-32. Re-running
tools/preprocess_data.py writes version 2.

Both files are written to temporaries and renamed into place, the .idx last: a crash leaves no
half-written pair behind.

`open_indexed(prefix)` opens a pair of this format or of Megatron-LM's (megatron_indexed.py),
told apart by the index's magic; data.paths reads both through it.
"""

from __future__ import annotations

import contextlib
import os
import struct
import tempfile
import threading
import zlib
from pathlib import Path
from typing import Union

import numpy as np

from megatron_qwen2.errors import DataError

MAGIC = b"MQ2TOKS\0"
MEGATRON_MAGIC = b"MMIDIDX\0\0"  # Megatron-LM's index (megatron_indexed.py), the other format data.paths reads
VERSION = 2
READABLE_VERSIONS = (1, 2)
CHUNK_BYTES = 1 << 14  # default chunk size of the checksums: 4096 uint32 tokens (bench/data_verify.py)
_HEADER = struct.Struct("<8sIIQQIIII")  # 48 bytes
_DTYPES = {2: np.dtype("<u2"), 4: np.dtype("<u4")}
_REMAKE = "re-run tools/preprocess_data.py on its source (with --overwrite)"


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

    def __init__(self, prefix: Union[str, Path], dtype: np.dtype, chunk_bytes: int = CHUNK_BYTES):
        self.dtype = np.dtype(dtype).newbyteorder("<")
        if self.dtype.itemsize not in _DTYPES or self.dtype.kind != "u":
            raise ValueError(f"token dtype must be uint16 or uint32, got {dtype}")
        if chunk_bytes < self.dtype.itemsize or chunk_bytes >= 1 << 32 or chunk_bytes & (chunk_bytes - 1):
            raise ValueError(f"chunk_bytes must be a power of two in [{self.dtype.itemsize}, 2**31], got {chunk_bytes}")
        self.chunk_bytes = chunk_bytes
        self.bin_path, self.idx_path = data_file_paths(prefix)
        self.bin_path.parent.mkdir(parents=True, exist_ok=True)
        self._bin, self._bin_tmp = _temp_beside(self.bin_path)
        self._offsets = [0]
        self._crc = 0
        self._chunk_crcs: list[int] = []  # CRC-32 of every full chunk written so far
        self._chunk_crc, self._chunk_fill = 0, 0  # the chunk being filled
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
        view = memoryview(data)
        while view:
            take = min(len(view), self.chunk_bytes - self._chunk_fill)
            self._chunk_crc = zlib.crc32(view[:take], self._chunk_crc)
            self._chunk_fill += take
            view = view[take:]
            if self._chunk_fill == self.chunk_bytes:
                self._chunk_crcs.append(self._chunk_crc)
                self._chunk_crc, self._chunk_fill = 0, 0
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
            chunk_crcs = self._chunk_crcs + ([self._chunk_crc] if self._chunk_fill else [])
            chunks = np.asarray(chunk_crcs, dtype="<u4").tobytes()
            header = _HEADER.pack(MAGIC, VERSION, self.dtype.itemsize, self.num_documents, self.num_tokens,
                                  self._crc, zlib.crc32(offsets), self.chunk_bytes, zlib.crc32(chunks))
            idx, idx_tmp = _temp_beside(self.idx_path)
            try:
                with idx:
                    idx.write(header)
                    idx.write(offsets)
                    idx.write(chunks)
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


def write_indexed_dataset(prefix: Union[str, Path], documents, vocab_size: int, chunk_bytes: int = CHUNK_BYTES) -> None:
    """Write every document of an iterable of token-id sequences as PREFIX.bin/.idx."""
    with IndexedDatasetWriter(prefix, index_dtype(vocab_size), chunk_bytes) as writer:
        for doc in documents:
            writer.add_document(doc)


def check_prefix_readable(prefix: Union[str, Path]) -> None:
    """DataError naming the file when PREFIX.idx or PREFIX.bin is missing, not a file or unreadable."""
    stem = str(prefix)
    for path in data_file_paths(prefix)[::-1]:
        if not path.exists():
            if stem.endswith((".bin", ".idx")) and all(p.is_file() for p in data_file_paths(stem[:-4])):
                fix = f"data.paths takes the prefix without its suffix: {stem[:-4]!r}"
            else:
                fix = f"make the pair with tools/preprocess_data.py --output-prefix {stem}, or correct data.paths"
            raise DataError(f"data prefix {stem!r}: no file {path}; {fix}")
        if not path.is_file():
            raise DataError(f"data prefix {stem!r}: {path} is not a file; correct data.paths")
        if not os.access(path, os.R_OK):
            raise DataError(f"data prefix {stem!r}: {path} cannot be read (permission denied); fix its permissions")


def bad_magic(idx_path: Path, magic: bytes) -> DataError:
    """The error for an index that starts with neither accepted magic."""
    return DataError(f"{idx_path}: bad magic {magic!r} (expected {MAGIC!r}, this project's format, or "
                     f"{MEGATRON_MAGIC!r}, Megatron-LM's); not an index file; {_REMAKE}")


def open_indexed(prefix: Union[str, Path]):
    """The reader of PREFIX.bin/.idx for the format its index's magic names.

    An `IndexedDataset` for this project's format (MQ2TOKS), a `MegatronIndexedDataset` for
    Megatron-LM's (MMIDIDX); a DataError naming the file for anything else.
    """
    from megatron_qwen2.data.megatron_indexed import MegatronIndexedDataset  # it imports this module

    check_prefix_readable(prefix)
    idx_path = data_file_paths(prefix)[1]
    try:
        with open(idx_path, "rb") as f:
            head = f.read(len(MEGATRON_MAGIC))
    except OSError as err:
        raise DataError(f"data prefix {str(prefix)!r}: cannot read {idx_path} ({err.strerror or err})") from err
    if head.startswith(MAGIC):
        return IndexedDataset(prefix)
    if head == MEGATRON_MAGIC:
        return MegatronIndexedDataset(prefix)
    raise bad_magic(idx_path, head)


class IndexedDataset:
    """A memory-mapped PREFIX.bin/.idx pair whose token reads are checked against the chunk checksums.

    `windows(starts, length)` and `dataset[i]` return tokens after verifying the chunks they
    touch (each chunk once); `verify()` checks all of them. `offsets` [N + 1] are the documents'
    boundaries, checked when opening.
    """

    def __init__(self, prefix: Union[str, Path]):
        self.prefix = str(prefix)
        self.bin_path, self.idx_path = data_file_paths(prefix)
        check_prefix_readable(prefix)
        try:
            self._open()
        except OSError as err:  # removed or made unreadable between the check and the read
            raise DataError(f"data prefix {self.prefix!r}: cannot read {err.filename or self.idx_path} "
                            f"({err.strerror or err})") from err

    def _open(self) -> None:
        idx_size = self.idx_path.stat().st_size
        if idx_size < _HEADER.size:
            raise DataError(f"{self.idx_path}: {idx_size} bytes, too short for the {_HEADER.size}-byte header "
                            f"(truncated or not an index file); {_REMAKE}")
        with open(self.idx_path, "rb") as f:
            magic, version, itemsize, num_docs, num_tokens, self.bin_crc32, offsets_crc, chunk_bytes, chunks_crc = \
                _HEADER.unpack(f.read(_HEADER.size))
        if magic != MAGIC:
            raise bad_magic(self.idx_path, magic)
        if version not in READABLE_VERSIONS:
            raise DataError(f"{self.idx_path}: format version {version}, this reader knows {READABLE_VERSIONS}; "
                            f"{_REMAKE}")
        if itemsize not in _DTYPES:
            raise DataError(f"{self.idx_path}: token size {itemsize} bytes; expected 2 (uint16) or 4 (uint32)")
        self.dtype = _DTYPES[itemsize]
        self.num_tokens = int(num_tokens)
        self.num_bytes = self.num_tokens * itemsize
        if version == 1:  # one chunk: the whole .bin, checked against its CRC-32 on the first read
            chunk_bytes, num_chunks = max(self.num_bytes, 1), int(self.num_bytes > 0)
        elif chunk_bytes < itemsize or chunk_bytes & (chunk_bytes - 1):
            raise DataError(f"{self.idx_path}: chunk size {chunk_bytes} is not a power of two >= {itemsize} "
                            f"(corrupt index); {_REMAKE}")
        else:
            num_chunks = -(-self.num_bytes // chunk_bytes)
        self.chunk_bytes = int(chunk_bytes)
        offsets_at = _HEADER.size
        chunks_at = offsets_at + 8 * (num_docs + 1)
        expected = chunks_at + (4 * num_chunks if version > 1 else 0)
        if idx_size != expected:
            raise DataError(f"{self.idx_path}: {idx_size} bytes, but a header for {num_docs} documents and "
                            f"{self.num_tokens} tokens needs {expected} (truncated or corrupt); {_REMAKE}")
        self.offsets = np.memmap(self.idx_path, dtype="<i8", mode="r", offset=offsets_at, shape=(num_docs + 1,))
        if zlib.crc32(self.offsets) != offsets_crc:
            raise DataError(f"{self.idx_path}: the document offsets fail their checksum (corrupt index); {_REMAKE}")
        if self.offsets[0] != 0 or self.offsets[-1] != num_tokens or np.any(np.diff(self.offsets) < 0):
            raise DataError(f"{self.idx_path}: document offsets are not a non-decreasing run from 0 to "
                            f"{num_tokens} tokens (corrupt index); {_REMAKE}")
        if version == 1:
            self.chunk_crc32 = np.full(num_chunks, self.bin_crc32, dtype="<u4")
        else:
            self.chunk_crc32 = (np.memmap(self.idx_path, dtype="<u4", mode="r", offset=chunks_at, shape=(num_chunks,))
                                if num_chunks else np.empty(0, dtype="<u4"))
            if zlib.crc32(self.chunk_crc32) != chunks_crc:
                raise DataError(f"{self.idx_path}: the chunk checksums fail their checksum (corrupt index); "
                                f"{_REMAKE}")
        bin_size = self.bin_path.stat().st_size
        if bin_size != self.num_bytes:
            raise DataError(f"{self.bin_path}: {bin_size} bytes, but {self.idx_path} describes {num_tokens} tokens "
                            f"of {itemsize} bytes = {self.num_bytes} bytes (truncated, or .bin and .idx are from "
                            f"different runs); {_REMAKE}")
        # np.memmap refuses empty files; an empty dataset has no tokens to map.
        self._tokens = (np.memmap(self.bin_path, dtype=self.dtype, mode="r", shape=(self.num_tokens,))
                        if self.num_tokens else np.empty(0, dtype=self.dtype))
        self._bin_bytes = memoryview(self._tokens).cast("B")  # what the chunk checksums cover
        self.chunk_verified = np.zeros(num_chunks, dtype=bool)  # this process has checked chunk k
        self._unverified = num_chunks
        self._verifying = threading.Lock()  # the train and valid splits may be read on two threads

    def __len__(self) -> int:
        """Number of documents."""
        return len(self.offsets) - 1

    @property
    def document_lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __getitem__(self, i: int) -> np.ndarray:
        """Document i's tokens (a read-only view), its chunks verified."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"document {i} out of range for {len(self)} documents in {self.prefix}")
        i %= len(self)
        lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
        if hi > lo:
            self.verify_tokens(np.array([lo]), np.array([hi]))
        return self._tokens[lo:hi]

    def windows(self, starts: np.ndarray, length: int) -> np.ndarray:
        """Tokens [start, start + length) for each start: an int64 array [len(starts), length], its chunks verified."""
        starts = np.asarray(starts, dtype=np.int64)
        if starts.size and (starts.min() < 0 or starts.max() + length > self.num_tokens):
            raise IndexError(f"windows of {length} tokens from [{starts.min()}, {starts.max()}] go beyond the "
                             f"{self.num_tokens} tokens of {self.bin_path}")
        self.verify_tokens(starts, starts + length)
        return self._tokens[starts[:, None] + np.arange(length)].astype(np.int64)

    def verify_tokens(self, lo: np.ndarray, hi: np.ndarray) -> None:
        """Check every not yet verified chunk that overlaps a token range [lo[j], hi[j]) (hi > lo)."""
        if self._unverified == 0 or len(lo) == 0:
            return
        itemsize, c = self.dtype.itemsize, self.chunk_bytes
        first = np.asarray(lo, dtype=np.int64) * itemsize // c
        last = (np.asarray(hi, dtype=np.int64) * itemsize - 1) // c
        span = np.arange(int((last - first).max()) + 1)
        ids = first[:, None] + span
        self._check_chunks(np.unique(ids[ids <= last[:, None]]))

    def verify(self) -> None:
        """Check every chunk of the .bin (one read of the file); DataError naming the file at the first mismatch."""
        self._check_chunks(np.flatnonzero(~self.chunk_verified))

    def _check_chunks(self, chunk_ids: np.ndarray) -> None:
        """Check those of `chunk_ids` not yet verified, marking each good one (one thread at a time)."""
        with self._verifying:
            self._check_unverified(chunk_ids[~self.chunk_verified[chunk_ids]])

    def _check_unverified(self, chunk_ids: np.ndarray) -> None:
        if len(chunk_ids) == 0:
            return
        c, data = self.chunk_bytes, self._bin_bytes
        crcs = np.fromiter((zlib.crc32(data[k * c:(k + 1) * c]) for k in chunk_ids.tolist()), dtype=np.uint32,
                           count=len(chunk_ids))
        bad = np.flatnonzero(crcs != self.chunk_crc32[chunk_ids])
        good = chunk_ids[:bad[0]] if bad.size else chunk_ids
        self.chunk_verified[good] = True
        self._unverified -= len(good)
        if bad.size:
            k = int(chunk_ids[bad[0]])
            first, end = k * c, min((k + 1) * c, self.num_bytes)
            raise DataError(f"{self.bin_path}: bytes [{first}, {end}) fail their checksum ({int(crcs[bad[0]]):#010x}, "
                            f"{self.idx_path} records {int(self.chunk_crc32[k]):#010x}): the file is corrupt or was "
                            f"changed after its index was written; restore it or {_REMAKE}")
