"""`Batch`: token rows plus what the loss and the attention need to know about them.

A row holds s + 1 tokens: the model reads tokens[:, :-1] and predicts tokens[:, 1:]. The
optional fields are per input position ([b, s]; `reference_logps` per row); None means the plain case (every label counts,
positions 0..s-1, one causal sequence per row): a batch of bare token rows is that plain case.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Optional

import numpy as np
import torch


@dataclass
class Batch:
    tokens: torch.Tensor  # [b, s+1] int64
    loss_mask: Optional[torch.Tensor] = None  # [b, s] float, 1 where label tokens[:, j+1] counts; None: all
    position_ids: Optional[torch.Tensor] = None  # [b, s] int64; None: 0..s-1 in every row
    document_ids: Optional[torch.Tensor] = None  # [b, s] int64, row-local; attention stays inside a document
    # Preference rows (data/preference.py, engine/dpo.py) hold pairs in K slots: `pairs` [b, K] bool,
    # slot k of the row holds a pair; `pair_side` [b, s] int64, per label 2k+1 where it counts for the
    # chosen response of slot k, 2k+2 for the rejected one, 0 elsewhere; `reference_logps` [b, K, 2]
    # float64, the reference model's log-probabilities of each slot's chosen and rejected response.
    pairs: Optional[torch.Tensor] = None
    pair_side: Optional[torch.Tensor] = None
    reference_logps: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def _map(self, fn) -> "Batch":
        return replace(self, **{f.name: fn(getattr(self, f.name)) for f in fields(self)
                                if getattr(self, f.name) is not None})

    def __getitem__(self, rows: slice) -> "Batch":
        """The rows `rows` (a slice) of every field."""
        return self._map(lambda t: t[rows])

    def to(self, device) -> "Batch":
        return self._map(lambda t: t.to(device))

    def split(self, micro_batch_size: int) -> list["Batch"]:
        """Consecutive micro-batches of `micro_batch_size` rows."""
        return [self[i:i + micro_batch_size] for i in range(0, len(self), micro_batch_size)]

    def num_loss_tokens(self) -> int:
        """Labels that count in the loss."""
        if self.loss_mask is None:
            return self.tokens.shape[0] * (self.tokens.shape[1] - 1)
        return int(self.loss_mask.sum().item())

    def positions(self) -> torch.Tensor:
        """position_ids, or 0..s-1 for every row when unset."""
        if self.position_ids is not None:
            return self.position_ids
        b, s = self.tokens.shape[0], self.tokens.shape[1] - 1
        return torch.arange(s, device=self.tokens.device).expand(b, s)


def as_batch(rows) -> Batch:
    """A Batch from a Batch or from bare token rows [b, s+1]."""
    return rows if isinstance(rows, Batch) else Batch(tokens=rows)


def positions_in_documents(document_ids: np.ndarray) -> np.ndarray:
    """Position of each token within its document, counted from the row start: [b, s] -> [b, s].

    Rows hold non-decreasing document ids; a document cut by the row start begins at 0, as in
    Megatron's reset_position_ids.
    """
    b, s = document_ids.shape
    flat = (document_ids + np.arange(b)[:, None] * (s + 1) * 2).ravel()  # rows never collide
    first = np.searchsorted(flat, flat, side="left").reshape(b, s)  # flat index of each document's first token
    return np.arange(s)[None, :] - (first - np.arange(b)[:, None] * s)


def documents_from_eod(inputs: np.ndarray, eod: int) -> np.ndarray:
    """Row-local document ids [b, s] of input tokens [b, s]: a document ends with (and includes) its EOD token."""
    ends = inputs == eod
    return np.concatenate([np.zeros((inputs.shape[0], 1), dtype=np.int64),
                           np.cumsum(ends[:, :-1], axis=1, dtype=np.int64)], axis=1)


def make_batch(tokens: np.ndarray, document_ids: Optional[np.ndarray], loss_mask: Optional[np.ndarray],
               reset_position_ids: bool, reset_attention_mask: bool) -> Batch:
    """A Batch from numpy rows [b, s+1], row-local document ids of the inputs [b, s] and a label mask [b, s]."""
    batch = Batch(tokens=torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.int64)))
    if loss_mask is not None:
        batch.loss_mask = torch.from_numpy(np.ascontiguousarray(loss_mask, dtype=np.float32))
    if document_ids is not None:
        document_ids = np.asarray(document_ids, dtype=np.int64)
        document_ids = document_ids - document_ids[:, :1]  # row-local: 0 for the first document of each row
        if reset_position_ids:
            batch.position_ids = torch.from_numpy(positions_in_documents(document_ids))
        if reset_attention_mask:
            batch.document_ids = torch.from_numpy(document_ids)
    return batch
