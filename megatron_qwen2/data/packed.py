"""Fixed-length training samples packed across the documents of an indexed token file.

The documents of a range (a train or valid split) lie back to back in the .bin, as they are:
tools/preprocess_data.py ends each with its end-of-document token, a Megatron-LM dataset made
without --append-eod does not. The range's tokens are cut into chunks of seq_length; sample i is
one chunk plus the next token, the chunks visited in a seeded order per epoch. A sample may span
several documents: their boundaries come from the index, not from EOD tokens, so positions can
restart at each document (`reset_position_ids`), attention can stay inside it
(`reset_attention_mask`, as row-local document ids for a block-diagonal causal mask), and
`eod_mask_loss` takes no loss on the label after an EOD token or after a document's last token
(the first token of the next document), with or without EOD at the documents' ends.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from megatron_qwen2.data.batch import Batch, make_batch
from megatron_qwen2.data.indexed import IndexedDataset
from megatron_qwen2.data.megatron_indexed import MegatronIndexedDataset
from megatron_qwen2.data.sampler import EpochShuffle, SampleDataset, Seed
from megatron_qwen2.errors import DataError


def split_documents(num_documents: int, split: Sequence[float], name: str) -> list[tuple[int, int]]:
    """Contiguous document ranges [lo, hi) for the parts of `split` (weights, e.g. [98, 2] for train/valid).

    Documents go to the parts in file order; a part with a positive weight gets at least one document.
    """
    w = np.asarray(split, dtype=np.float64)
    if w.ndim != 1 or len(w) < 1 or np.any(w < 0) or w.sum() <= 0 or w[0] <= 0:
        raise ValueError(f"data.split={list(split)} must be non-negative weights with a positive first (train) part")
    cum = np.cumsum(w) / w.sum()
    bounds, lo = [], 0
    for i, part in enumerate(w):
        later = int(np.count_nonzero(w[i + 1:]))  # parts after this one that need a document each
        hi = num_documents if i == len(w) - 1 else int(round(cum[i] * num_documents))
        hi = min(max(hi, lo + (part > 0)), num_documents - later)
        if part > 0 and hi <= lo:
            raise ValueError(f"{name}: {num_documents} documents cannot be split as data.split={list(split)} "
                             "(each part with a positive weight needs at least one document)")
        bounds.append((lo, max(hi, lo)))
        lo = max(hi, lo)
    return bounds


class DocumentPackedDataset(SampleDataset):
    """Packed samples of seq_length + 1 tokens over documents [lo, hi) of an indexed dataset (open_indexed)."""

    def __init__(self, data: IndexedDataset | MegatronIndexedDataset, documents: tuple[int, int], seq_length: int,
                 seed: Seed, eod: int, vocab_size: int, reset_position_ids: bool = False, reset_attention_mask: bool = False,
                 eod_mask_loss: bool = False, name: Optional[str] = None):
        if seq_length < 1:
            raise ValueError(f"seq_length must be >= 1, got {seq_length}")
        lo, hi = documents
        if not 0 <= lo < hi <= len(data):
            raise ValueError(f"document range [{lo}, {hi}) is empty or outside the {len(data)} documents of "
                             f"{data.prefix}")
        self.data, self.seq_length, self.eod, self.vocab_size = data, seq_length, eod, vocab_size
        self.reset_position_ids, self.reset_attention_mask = reset_position_ids, reset_attention_mask
        self.eod_mask_loss = eod_mask_loss
        self.documents = (lo, hi)
        self.start, end = int(data.offsets[lo]), int(data.offsets[hi])
        num_chunks = (end - self.start - 1) // seq_length
        if num_chunks < 1:
            raise DataError(f"{name or data.prefix}: documents [{lo}, {hi}) hold {end - self.start} tokens, fewer "
                             f"than one sample of seq_length + 1 = {seq_length + 1}; use more data or a shorter "
                             "seq_length")
        self.order = EpochShuffle(num_chunks, seed)

    def __len__(self) -> int:
        return self.order.n

    def window_starts(self, indices: np.ndarray) -> np.ndarray:
        """Token offset in the .bin of each sample's first token."""
        return self.start + self.order(indices) * self.seq_length

    def samples(self, indices: np.ndarray) -> Batch:
        starts = self.window_starts(indices)
        tokens = self.data.windows(starts, self.seq_length + 1)  # [n, s+1], checked against the chunk checksums
        if tokens.max() >= self.vocab_size or tokens.min() < 0:  # per batch: scanning a large .bin at start is slow
            bad = tokens.max() if tokens.max() >= self.vocab_size else tokens.min()
            raise DataError(f"{self.data.bin_path}: token id {bad} is outside the tokenizer's {self.vocab_size} "
                             "tokens (the data was made with another tokenizer)")
        docs = loss_mask = None
        if self.reset_position_ids or self.reset_attention_mask or self.eod_mask_loss:
            pos = starts[:, None] + np.arange(self.seq_length)  # [n, s]: the input tokens
            docs = np.searchsorted(self.data.offsets, pos, side="right") - 1  # document of each input token
        if self.eod_mask_loss:
            ends_document = pos + 1 == self.data.offsets[docs + 1]  # its label is the next document's first token
            loss_mask = ~((tokens[:, :-1] == self.eod) | ends_document)
        return make_batch(tokens, docs if self.reset_position_ids or self.reset_attention_mask else None,
                          loss_mask, self.reset_position_ids, self.reset_attention_mask)
