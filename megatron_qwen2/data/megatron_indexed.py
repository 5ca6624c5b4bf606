"""Megatron-LM's indexed datasets: PREFIX.bin + PREFIX.idx as megatron/core/datasets/indexed_dataset.py
writes them (the pairs that Megatron-LM's, NeMo's and Pai-Megatron-Patch's preprocessing produce).

PREFIX.bin holds the tokens of every sequence back to back, in the dtype of the index, little-endian.

PREFIX.idx is a 34-byte little-endian header followed by three arrays:

    offset  size  field
    0       9     magic b"MMIDIDX\\0\\0"
    9       8     version (uint64: 1)
    17      1     dtype code (uint8): 1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64,
                  7 float32, 8 uint16
    18      8     number of sequences S (uint64)
    26      8     number of document indices D (uint64): D - 1 documents
    34      4*S   sequence lengths in tokens (int32)
    ...     8*S   sequence pointers: byte offset of each sequence in PREFIX.bin (int64)
    ...     8*D   document indices (int64): document i is sequences [d[i], d[i+1]); d[0] = 0, d[-1] = S

A multimodal index carries one more array, a mode (int8) per sequence; it is refused here, as
this loop trains on text only.

Sequences and documents: Megatron-LM's tokenizer writes one sequence per document, or one per
sentence with --split-sentences. Here a document is what the document indices delimit: the
tokens of its sequences, concatenated. Opening checks the magic, version and dtype code, that
the .idx is exactly as long as its header says, that the sequence pointers follow the lengths
with neither gap nor overlap (so the .bin is one run of tokens), that the document indices run
from 0 to S without going back, and that the .bin holds exactly the sum of the lengths times the
dtype's size; a truncated or mismatched pair fails there with a DataError naming the file. The
document offsets (in tokens, 8 bytes per document) are computed in memory when opening.

The format has no checksums: a corrupt byte of the .bin that keeps its size is not detected.
`verify_tokens` does nothing and `verify` checks the .bin's size again; they exist so that this
reader serves wherever the project's own `IndexedDataset` does.

Documents without an end-of-document token: Megatron-LM's --append-eod is optional, so a
document may end without EOD. The packer (packed.py) concatenates documents as they are and cuts
the run into windows of seq_length + 1 tokens, so a window may hold the end of one document and
the start of the next with no token between them. The boundaries come from this index, not from
EOD tokens: with data.reset_position_ids positions restart at each document, with
data.reset_attention_mask attention stays inside it, and data.eod_mask_loss takes no loss on the
label that follows a document's last token (or an EOD token), whether or not that last token is
EOD. Without these flags the last token of a document is trained to predict the first token of
the next one, as in Megatron-LM.

Token ids are read as int64. Signed dtypes may hold negative values and the float dtypes
non-integral ones: a window holding one stops the reader with a DataError naming the .bin (the
packer checks every batch against the tokenizer's vocabulary as well).
"""

from __future__ import annotations

import contextlib
import os
import struct
from array import array
from pathlib import Path
from typing import Union

import numpy as np

from megatron_qwen2.data.indexed import (MEGATRON_MAGIC, _temp_beside, bad_magic, check_prefix_readable,
                                         data_file_paths)
from megatron_qwen2.errors import DataError

MEGATRON_VERSION = 1
DTYPE_CODES = {1: np.dtype("u1"), 2: np.dtype("i1"), 3: np.dtype("<i2"), 4: np.dtype("<i4"), 5: np.dtype("<i8"),
               6: np.dtype("<f8"), 7: np.dtype("<f4"), 8: np.dtype("<u2")}
_CODE_OF_DTYPE = {dtype: code for code, dtype in DTYPE_CODES.items()}
_HEADER = struct.Struct("<9sQBQQ")  # 34 bytes
_CHECK_BLOCK = 1 << 22  # sequences checked at a time when opening: memory stays flat on large indexes
_REMAKE = "re-run the preprocessing that wrote it (tools/preprocess_data.py --format megatron, or Megatron-LM's)"


def megatron_dtype(vocab_size: int) -> np.dtype:
    """The token dtype Megatron-LM's preprocessing picks: uint16 when every id fits in it, else int32."""
    if vocab_size <= 0 or vocab_size > 1 << 31:
        raise ValueError(f"vocab_size must lie in [1, 2**31], got {vocab_size}")
    return DTYPE_CODES[8] if vocab_size <= 1 << 16 else DTYPE_CODES[4]


class MegatronIndexedDatasetWriter:
    """Appends sequences and documents to PREFIX.bin/.idx temporaries; `close()` renames them into place.

    `add_document(tokens)` writes a document of one sequence; `add_sequence` then `end_document`
    writes a document of several. Used as a context manager: leaving the block by an exception
    removes the temporaries and leaves any earlier PREFIX.bin/.idx untouched.
    """

    def __init__(self, prefix: Union[str, Path], dtype: np.dtype):
        self.dtype = np.dtype(dtype).newbyteorder("<")
        if self.dtype not in _CODE_OF_DTYPE:
            raise ValueError(f"Megatron-LM's format stores {sorted(d.name for d in _CODE_OF_DTYPE)}, not {dtype}")
        self.bin_path, self.idx_path = data_file_paths(prefix)
        self.bin_path.parent.mkdir(parents=True, exist_ok=True)
        self._bin, self._bin_tmp = _temp_beside(self.bin_path)
        self._sequence_lengths = array("i")  # int32, as the index stores them
        self._document_indices = array("q", [0])
        self.num_tokens = 0
        self._closed = False

    def add_sequence(self, tokens) -> None:
        """Append one sequence to the open document."""
        arr = np.asarray(tokens)
        if arr.ndim != 1:
            raise ValueError(f"a sequence is a flat array of token ids, got shape {arr.shape}")
        if arr.size >= 1 << 31:
            raise ValueError(f"a sequence holds at most 2**31 - 1 tokens (int32 lengths), got {arr.size}")
        if arr.size and self.dtype.kind in "iu" and (arr.min() < np.iinfo(self.dtype).min
                                                      or arr.max() > np.iinfo(self.dtype).max):
            raise ValueError(f"token ids must lie in [{np.iinfo(self.dtype).min}, {np.iinfo(self.dtype).max}] for "
                             f"{self.dtype.name}, got [{arr.min()}, {arr.max()}]")
        self._bin.write(arr.astype(self.dtype, copy=False).tobytes())
        self._sequence_lengths.append(arr.size)
        self.num_tokens += arr.size

    def end_document(self) -> None:
        """Close the open document: it holds the sequences added since the previous one."""
        self._document_indices.append(len(self._sequence_lengths))

    def add_document(self, tokens) -> None:
        """Append a document of one sequence."""
        self.add_sequence(tokens)
        self.end_document()

    @property
    def num_documents(self) -> int:
        return len(self._document_indices) - 1

    def close(self) -> None:
        """Write the index and make the pair visible (.bin first, .idx last)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._bin.flush()
            os.fsync(self._bin.fileno())
            self._bin.close()
            lengths = np.frombuffer(self._sequence_lengths, dtype=np.int32).astype("<i4")
            pointers = np.zeros(len(lengths), dtype="<i8")
            np.cumsum(lengths[:-1], dtype=np.int64, out=pointers[1:])
            pointers *= self.dtype.itemsize
            header = _HEADER.pack(MEGATRON_MAGIC, MEGATRON_VERSION, _CODE_OF_DTYPE[self.dtype], len(lengths),
                                  len(self._document_indices))
            idx, idx_tmp = _temp_beside(self.idx_path)
            try:
                with idx:
                    idx.write(header)
                    idx.write(lengths.tobytes())
                    idx.write(pointers.tobytes())
                    idx.write(np.frombuffer(self._document_indices, dtype=np.int64).astype("<i8").tobytes())
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

    def __enter__(self) -> "MegatronIndexedDatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_megatron_dataset(prefix: Union[str, Path], documents, dtype: np.dtype) -> None:
    """Write every document of an iterable as PREFIX.bin/.idx in Megatron-LM's format.

    A document is a sequence of token ids, or a list of such sequences (a document of several).
    """
    with MegatronIndexedDatasetWriter(prefix, dtype) as writer:
        for doc in documents:
            if len(doc) and not np.isscalar(doc[0]):
                for sequence in doc:
                    writer.add_sequence(sequence)
                writer.end_document()
            else:
                writer.add_document(doc)


class MegatronIndexedDataset:
    """A memory-mapped Megatron-LM PREFIX.bin/.idx pair, read through the interface of `IndexedDataset`.

    `offsets` [N + 1] are the documents' boundaries in tokens; `dataset[i]` is document i's tokens
    (its sequences, back to back) and `windows(starts, length)` the token windows the packer reads.
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
            raise DataError(f"{self.idx_path}: {idx_size} bytes, too short for the {_HEADER.size}-byte header of a "
                            f"Megatron-LM index (truncated); {_REMAKE}")
        with open(self.idx_path, "rb") as f:
            magic, version, code, num_sequences, num_document_indices = _HEADER.unpack(f.read(_HEADER.size))
        if magic != MEGATRON_MAGIC:
            raise bad_magic(self.idx_path, magic)
        if version != MEGATRON_VERSION:
            raise DataError(f"{self.idx_path}: Megatron-LM index version {version}, this reader knows "
                            f"{MEGATRON_VERSION}; {_REMAKE}")
        if code not in DTYPE_CODES:
            raise DataError(f"{self.idx_path}: unknown dtype code {code} (Megatron-LM writes "
                            f"{', '.join(f'{c} {d.name}' for c, d in DTYPE_CODES.items())}); corrupt index, {_REMAKE}")
        self.dtype = DTYPE_CODES[code]
        itemsize = self.dtype.itemsize
        lengths_at = _HEADER.size
        pointers_at = lengths_at + 4 * num_sequences
        documents_at = pointers_at + 8 * num_sequences
        expected = documents_at + 8 * num_document_indices
        if idx_size == expected + num_sequences and num_sequences:
            raise DataError(f"{self.idx_path}: holds a mode per sequence (a multimodal Megatron-LM dataset); "
                            "data.paths reads text datasets only")
        if idx_size != expected:
            raise DataError(f"{self.idx_path}: {idx_size} bytes, but a header for {num_sequences} sequences and "
                            f"{num_document_indices} document indices needs {expected} "
                            f"({'truncated' if idx_size < expected else 'corrupt'}); {_REMAKE}")
        if num_document_indices < 1:
            raise DataError(f"{self.idx_path}: no document indices (corrupt index); {_REMAKE}")
        self.sequence_lengths = _map(self.idx_path, "<i4", lengths_at, num_sequences)
        self.sequence_pointers = _map(self.idx_path, "<i8", pointers_at, num_sequences)
        self.document_indices = _map(self.idx_path, "<i8", documents_at, num_document_indices)
        num_bytes = self._check_sequences(itemsize)
        d = self.document_indices
        if d[0] != 0 or d[-1] != num_sequences or np.any(np.diff(d) < 0):
            raise DataError(f"{self.idx_path}: document indices are not a non-decreasing run from 0 to "
                            f"{num_sequences} sequences (corrupt index); {_REMAKE}")
        self.num_tokens = num_bytes // itemsize
        self.num_bytes = num_bytes
        self.offsets = np.full(num_document_indices, self.num_tokens, dtype=np.int64)
        starting = d < num_sequences  # documents that start at a sequence (not the empty ones at the end)
        self.offsets[starting] = self.sequence_pointers[d[starting]] // itemsize
        self._check_bin_size()
        # np.memmap refuses empty files; an empty dataset has no tokens to map.
        self._tokens = (np.memmap(self.bin_path, dtype=self.dtype, mode="r", shape=(self.num_tokens,))
                        if self.num_tokens else np.empty(0, dtype=self.dtype))

    def _check_sequences(self, itemsize: int) -> int:
        """Bytes of .bin the sequences cover, after checking that each starts where the previous one ends."""
        lengths, pointers = self.sequence_lengths, self.sequence_pointers
        end = 0  # where the next sequence must start
        for lo in range(0, len(lengths), _CHECK_BLOCK):
            block = lengths[lo:lo + _CHECK_BLOCK].astype(np.int64)
            if block.min() < 0:
                j = lo + int(np.argmax(block < 0))
                raise DataError(f"{self.idx_path}: sequence {j} has length {int(lengths[j])} (corrupt index); "
                                f"{_REMAKE}")
            starts = end + np.concatenate([[0], np.cumsum(block[:-1] * itemsize)])
            wrong = np.flatnonzero(pointers[lo:lo + len(block)] != starts)
            if wrong.size:
                j = lo + int(wrong[0])
                raise DataError(f"{self.idx_path}: sequence {j} starts at byte {int(pointers[j])} of the .bin, but "
                                f"the lengths before it end at byte {int(starts[wrong[0]])} (corrupt index); "
                                f"{_REMAKE}")
            end = int(starts[-1] + block[-1] * itemsize)
        return end

    def _check_bin_size(self) -> None:
        bin_size = self.bin_path.stat().st_size
        if bin_size != self.num_bytes:
            raise DataError(f"{self.bin_path}: {bin_size} bytes, but {self.idx_path} describes {self.num_tokens} "
                            f"tokens of {self.dtype.itemsize} bytes ({self.dtype.name}) = {self.num_bytes} bytes "
                            f"(truncated, or .bin and .idx are from different runs); {_REMAKE}")

    def __len__(self) -> int:
        """Number of documents."""
        return len(self.offsets) - 1

    @property
    def document_lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __getitem__(self, i: int) -> np.ndarray:
        """Document i's tokens (a read-only view in the file's dtype): its sequences, concatenated."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"document {i} out of range for {len(self)} documents in {self.prefix}")
        i %= len(self)
        return self._tokens[int(self.offsets[i]):int(self.offsets[i + 1])]

    def windows(self, starts: np.ndarray, length: int) -> np.ndarray:
        """Tokens [start, start + length) for each start: an int64 array [len(starts), length]."""
        starts = np.asarray(starts, dtype=np.int64)
        if starts.size and (starts.min() < 0 or starts.max() + length > self.num_tokens):
            raise IndexError(f"windows of {length} tokens from [{starts.min()}, {starts.max()}] go beyond the "
                             f"{self.num_tokens} tokens of {self.bin_path}")
        tokens = self._tokens[starts[:, None] + np.arange(length)]
        if self.dtype.kind == "f" and not np.all(np.mod(tokens, 1) == 0):
            bad = tokens[np.mod(tokens, 1) != 0][0]
            raise DataError(f"{self.bin_path}: token {float(bad)} is not an integer id ({self.dtype.name} tokens); "
                            f"{_REMAKE}")
        return tokens.astype(np.int64)

    def verify_tokens(self, lo: np.ndarray, hi: np.ndarray) -> None:
        """Nothing to check: the format has no checksums."""

    def verify(self) -> None:
        """Check that the .bin still has the size its index describes (the format has no checksums)."""
        self._check_bin_size()


def _map(path: Path, dtype: str, offset: int, count: int) -> np.ndarray:
    """`count` items of `dtype` at byte `offset` of `path`, memory-mapped (np.memmap refuses empty maps)."""
    if count == 0:
        return np.empty(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(count,))
