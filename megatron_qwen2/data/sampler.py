"""Deterministic sample order and blending: sample i is a pure function of (seed, i).

Every dataset here maps a sample index to a sample without any state carried from one batch to
the next, so global batch k (samples k*gbs ... (k+1)*gbs - 1) is the same in every parallel
layout, and a run resumed after c consumed samples continues with sample c exactly. A sample is
also made without looking at the other samples of its batch, so a data-parallel rank reads only
its own rows of a global batch (`local_batch`) and gets exactly those rows of `global_batch`.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from megatron_qwen2.data.batch import Batch

Seed = Union[int, Sequence[int]]


class EpochShuffle:
    """Maps sample index i to an item in [0, n): epoch i // n visits the items in a permutation of (seed, epoch)."""

    def __init__(self, n: int, seed: Seed):
        if n < 1:
            raise ValueError(f"need at least one item to sample from, got {n}")
        self.n = n
        self.seed = [seed] if isinstance(seed, int) else list(seed)
        self._orders: OrderedDict[int, np.ndarray] = OrderedDict()

    def order(self, epoch: int) -> np.ndarray:
        order = self._orders.get(epoch)
        if order is None:
            order = np.random.default_rng(self.seed + [epoch]).permutation(self.n)
            self._orders[epoch] = order
            if len(self._orders) > 4:  # a batch touches at most two epochs; keep a few
                self._orders.popitem(last=False)
        return order

    def __call__(self, indices: np.ndarray) -> np.ndarray:
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and indices.min() < 0:
            raise ValueError(f"sample indices must be >= 0, got {indices.min()}")
        epochs, positions = np.divmod(indices, self.n)
        items = np.empty_like(indices)
        for epoch in np.unique(epochs):
            sel = epochs == epoch
            items[sel] = self.order(int(epoch))[positions[sel]]
        return items


class SampleDataset:
    """Base of the training datasets: `samples(indices) -> Batch`; batches follow from the sample indices."""

    seq_length: int
    vocab_size: int

    def __len__(self) -> int:  # samples per epoch
        raise NotImplementedError

    def samples(self, indices: np.ndarray) -> Batch:
        raise NotImplementedError

    def batch_at(self, consumed_samples: int, num_samples: int) -> Batch:
        """Samples consumed_samples ... consumed_samples + num_samples - 1 (where a resumed run continues)."""
        if consumed_samples < 0 or num_samples < 1:
            raise ValueError(f"need consumed_samples >= 0 and num_samples >= 1, got {consumed_samples}, "
                             f"{num_samples}")
        return self.samples(np.arange(consumed_samples, consumed_samples + num_samples))

    def global_batch(self, step: int, global_batch_size: int) -> Batch:
        """Global batch `step`: samples step*gbs ... (step+1)*gbs - 1, the same in every layout."""
        if step < 0 or global_batch_size < 1:
            raise ValueError(f"need step >= 0 and global_batch_size >= 1, got step={step}, "
                             f"global_batch_size={global_batch_size}")
        return self.batch_at(step * global_batch_size, global_batch_size)

    def local_batch(self, step: int, global_batch_size: int, dp_rank: int, dp: int) -> Batch:
        """Data-parallel rank dp_rank's rows of global batch `step`: rows [dp_rank * n, (dp_rank + 1) * n)
        with n = global_batch_size // dp, equal to those rows of global_batch(step, global_batch_size).
        Only these n samples are read; the other ranks' rows are never touched."""
        if step < 0 or global_batch_size < 1 or dp < 1 or not 0 <= dp_rank < dp or global_batch_size % dp:
            raise ValueError(f"need step >= 0, 0 <= dp_rank < dp and global_batch_size a multiple of dp, got "
                             f"step={step}, global_batch_size={global_batch_size}, dp_rank={dp_rank}, dp={dp}")
        n = global_batch_size // dp
        return self.batch_at(step * global_batch_size + dp_rank * n, n)


def concat_batches(parts: Sequence[Batch]) -> Batch:
    """Rows of several batches, one after the other; a field unset in some parts takes its default there."""
    out = Batch(tokens=torch.cat([p.tokens for p in parts]))
    if any(p.loss_mask is not None for p in parts):
        out.loss_mask = torch.cat([p.loss_mask if p.loss_mask is not None
                                   else torch.ones(p.tokens.shape[0], p.tokens.shape[1] - 1) for p in parts])
    if any(p.position_ids is not None for p in parts):
        out.position_ids = torch.cat([p.positions() for p in parts])
    if any(p.document_ids is not None for p in parts):
        out.document_ids = torch.cat([p.document_ids if p.document_ids is not None
                                      else torch.zeros(p.tokens.shape[0], p.tokens.shape[1] - 1, dtype=torch.long)
                                      for p in parts])
    if all(p.pair_side is not None for p in parts):  # preference rows: slots padded to the most of any part
        slots = max(p.pairs.shape[1] for p in parts)
        out.pair_side = torch.cat([p.pair_side for p in parts])
        out.pairs = torch.cat([F.pad(p.pairs, (0, slots - p.pairs.shape[1])) for p in parts])
        if all(p.reference_logps is not None for p in parts):
            out.reference_logps = torch.cat([F.pad(p.reference_logps, (0, 0, 0, slots - p.pairs.shape[1]))
                                             for p in parts])
    return out


def take_rows(batch: Batch, order: np.ndarray) -> Batch:
    """batch's rows in the order `order` (row k of the result = row order[k])."""
    idx = torch.from_numpy(np.asarray(order, dtype=np.int64))
    return batch._map(lambda t: t[idx])


class BlendedDataset(SampleDataset):
    """Samples drawn from several datasets in proportion to their weights.

    The weights are quantised to a block of `block` samples (counts by largest remainder), and
    one block's pattern interleaves the datasets greedily (each position goes to the dataset
    furthest behind its share, as Megatron's blending does). Every block repeats the pattern, so
    sample i's dataset and its index there are O(1) functions of i: dataset pattern[i % block],
    index (i // block) * count[d] + (how many of the pattern's first i % block went to d).
    """

    def __init__(self, datasets: Sequence[SampleDataset], weights: Sequence[float], block: int = 4096):
        if len(datasets) != len(weights) or not datasets:
            raise ValueError(f"need one weight per dataset, got {len(datasets)} datasets and {len(weights)} weights")
        w = np.asarray(weights, dtype=np.float64)
        if np.any(w < 0) or not np.isfinite(w).all() or w.sum() <= 0:
            raise ValueError(f"data weights must be finite, >= 0 and not all zero, got {list(weights)}")
        if len({d.seq_length for d in datasets}) != 1:
            raise ValueError("blended datasets must share seq_length")
        self.datasets, self.weights = list(datasets), w / w.sum()
        self.seq_length = datasets[0].seq_length
        self.vocab_size = max(d.vocab_size for d in datasets)
        counts = np.floor(self.weights * block).astype(np.int64)
        remainder = self.weights * block - counts
        counts[np.argsort(-remainder, kind="stable")[:block - counts.sum()]] += 1
        self.block, self.counts = block, counts
        pattern = np.empty(block, dtype=np.int64)
        taken = np.zeros(len(datasets), dtype=np.int64)
        share = counts / block
        for i in range(block):
            behind = np.where(taken < counts, share * (i + 1) - taken, -np.inf)
            pattern[i] = d = int(np.argmax(behind))
            taken[d] += 1
        rank = np.zeros(block, dtype=np.int64)  # rank[i]: earlier positions of the pattern with the same dataset
        for d in range(len(datasets)):
            sel = pattern == d
            rank[sel] = np.arange(sel.sum())
        self.pattern, self.rank = pattern, rank

    def __len__(self) -> int:
        return sum(len(d) for d in self.datasets)

    def locate(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(dataset, index within it) of each blended sample index."""
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and indices.min() < 0:
            raise ValueError(f"sample indices must be >= 0, got {indices.min()}")
        blocks, pos = np.divmod(indices, self.block)
        which = self.pattern[pos]
        return which, blocks * self.counts[which] + self.rank[pos]

    def samples(self, indices: np.ndarray) -> Batch:
        which, local = self.locate(indices)
        parts, rows = [], []
        for d in np.unique(which):
            sel = np.flatnonzero(which == d)
            parts.append(self.datasets[d].samples(local[sel]))
            rows.append(sel)
        batch = concat_batches(parts)
        return take_rows(batch, np.argsort(np.concatenate(rows), kind="stable"))
