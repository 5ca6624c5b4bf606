"""Preference pairs for DPO: jsonl in TRL's preference formats, rendered as SFT renders a conversation.

Each line is one pair, in the conversational form

    {"prompt": [messages...], "chosen": [assistant message(s)], "rejected": [assistant message(s)]}

or the plain-string form {"prompt": str, "chosen": str, "rejected": str} (one user turn, one
assistant turn); each field may take either form. The prompt followed by a response is one
conversation, rendered by `sft.render_chat` (Qwen2 chat template, the default system prompt when
the prompt does not start with a system message). A response's log-probability sums the labels
the SFT loss mask counts inside the response: the content of its assistant messages and each one's
closing <|im_end|> (assistant turns of the prompt only condition).

A row of seq_length + 1 tokens holds one pair as two documents, prompt + chosen then prompt +
rejected (attention stays inside each, positions restart at 0), and the end-of-document padding
as a third, never counted; with data.preference_packing=true it holds as many whole pairs as fit,
two documents each. `Batch.pair_side` says for each label which response of which pair it counts
for. A pair that does not fit (2 x prompt + chosen + rejected > seq_length + 1 = W tokens) is cut:
1. the prompt keeps its last tokens, as many as the responses leave room for, but at least W // 4
   (when it is longer than that);
2. the responses then share the rest, R = W - 2 x prompt: a response shorter than R / 2 stays whole
   and the other gets what remains; otherwise each keeps its first R // 2 (the chosen R - R // 2).
A cut response loses its end (and its <|im_end|>); `PreferenceDataset.truncated` counts the cut pairs.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from tokenizers import Tokenizer

from megatron_qwen2.data.batch import Batch, make_batch
from megatron_qwen2.data.sampler import EpochShuffle, SampleDataset, Seed
from megatron_qwen2.data.sft import jsonl_records, pack_conversations, render_chat
from megatron_qwen2.errors import DataError

FORMAT_HINT = ('{"prompt": [messages] or "text", "chosen": [assistant messages] or "text", '
               '"rejected": [assistant messages] or "text"}')


@dataclass(frozen=True)
class Pair:
    """One rendered pair: the prompt's tokens, and each response's tokens with the labels counted for it."""

    prompt: np.ndarray
    chosen: np.ndarray
    chosen_mask: np.ndarray  # bool per token of `chosen`: counted in its log-probability
    rejected: np.ndarray
    rejected_mask: np.ndarray


def _messages(value, role: str, field: str, where: str) -> list:
    """A field as a list of messages: a string is one message of `role`."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: {field!r} must be a string or a non-empty list of messages; expected {FORMAT_HINT}")
    return value


def render_pair(record, tok: Tokenizer, where: str) -> Pair:
    """Render one preference record (see the module docstring); DataError naming `where` for a bad one."""
    if not isinstance(record, dict) or not all(k in record for k in ("prompt", "chosen", "rejected")):
        raise DataError(f"{where}: expected an object {FORMAT_HINT}")
    prompt = _messages(record["prompt"], "user", "prompt", where)
    ids, _ = render_chat(prompt, tok, where=where)
    out = {}
    for field in ("chosen", "rejected"):
        response = _messages(record[field], "assistant", field, where)
        if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in response):
            raise DataError(f"{where}: {field!r} holds no assistant message")
        if all(not (isinstance(m, dict) and isinstance(m.get("content"), str) and m["content"].strip())
               for m in response if isinstance(m, dict) and m.get("role") == "assistant"):
            raise DataError(f"{where}: the {field} response is empty")
        full, mask = render_chat(list(prompt) + list(response), tok, where=where)
        # The prompt renders to the same tokens alone and followed by the response: render_chat joins
        # the messages' renderings, and the system prompt is added (or not) by the prompt's first message.
        out[field] = (full[len(ids):], mask[len(ids):])
    return Pair(ids, out["chosen"][0], out["chosen"][1], out["rejected"][0], out["rejected"][1])


def load_pairs(path: Path, tok: Tokenizer) -> list[Pair]:
    """Every pair of a preference jsonl file, rendered and tokenised, in file order."""
    pairs = [render_pair(record, tok, where) for where, record in jsonl_records(path, "preference file")]
    if not pairs:
        raise DataError(f"{path}: holds no preference pairs")
    return pairs


def cut_lengths(prompt: int, chosen: int, rejected: int, width: int) -> tuple[int, int, int]:
    """(prompt, chosen, rejected) token counts kept of a pair in a row of `width` tokens (module docstring)."""
    if 2 * prompt + chosen + rejected <= width:
        return prompt, chosen, rejected
    p = min(prompt, max(width // 4, (width - chosen - rejected) // 2))
    room = width - 2 * p
    if chosen + rejected <= room:
        return p, chosen, rejected
    c = min(chosen, max(room - room // 2, room - rejected))
    return p, c, min(rejected, room - c)


class PreferenceDataset(SampleDataset):
    """Preference pairs as samples: one pair per row, or with `pack` as many whole pairs per row as fit
    (bins filled in a seeded order as SFT packing fills them; a pair longer than the row gets a row of
    its own and is cut). Epoch e visits the rows in a permutation of (seed, e).

    `reference` ([pairs, 2] float64, set by `attach_reference`) holds the reference model's
    log-probabilities of each pair's chosen and rejected response, by pair index; samples then carry
    theirs in `Batch.reference_logps`."""

    def __init__(self, pairs: Sequence[Pair], seq_length: int, seed: Seed, pad_id: int, vocab_size: int,
                 pack: bool = False, name: str = "preference pairs"):
        if seq_length < 3:
            raise ValueError(f"seq_length must be >= 3 for preference rows, got {seq_length}")
        self.pairs, self.seq_length, self.pad_id, self.vocab_size = list(pairs), seq_length, pad_id, vocab_size
        self.name, self.pack = name, pack
        width = seq_length + 1
        lengths = [2 * len(p.prompt) + len(p.chosen) + len(p.rejected) for p in self.pairs]
        pack_seed = ([seed] if isinstance(seed, int) else list(seed)) + [1]  # not the epochs' permutations
        self.rows = pack_conversations(lengths, width, pack_seed) if pack else [[i] for i in range(len(self.pairs))]
        self.order = EpochShuffle(len(self.rows), seed)
        self.truncated = sum(n > width for n in lengths)
        self.reference: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return len(self.rows)

    def fingerprint(self) -> str:
        """A digest of the pairs' rows (tokens and counted labels of every pair, in order, and the row width)."""
        h = hashlib.sha256(f"{self.seq_length}".encode())
        for p in self.pairs:
            for a in (p.prompt, p.chosen, p.chosen_mask, p.rejected, p.rejected_mask):
                h.update(np.ascontiguousarray(a).tobytes())
                h.update(b"|")
        return h.hexdigest()

    def attach_reference(self, logps: np.ndarray) -> None:
        logps = np.asarray(logps, dtype=np.float64)
        if logps.shape != (len(self.pairs), 2):
            raise ValueError(f"{self.name}: reference log-probabilities of shape {logps.shape}, expected "
                             f"{(len(self.pairs), 2)}")
        self.reference = logps

    def samples(self, indices: np.ndarray) -> Batch:
        return self.make_rows([self.rows[r] for r in self.order(indices)])

    def make_rows(self, rows: Sequence[Sequence[int]]) -> Batch:
        """Rows holding the pairs `rows[j]` (pair indices) each: pair k of a row is its slot k, its chosen
        and rejected documents 2k and 2k + 1; the padding after the last pair is one more document."""
        n, width, slots = len(rows), self.seq_length + 1, max(len(r) for r in rows)
        tokens = np.full((n, width), self.pad_id, dtype=np.int64)
        side = np.zeros((n, width), dtype=np.int64)  # per token: 2k+1 / 2k+2 where it counts for slot k
        documents = np.zeros((n, width), dtype=np.int64)
        present = np.zeros((n, slots), dtype=bool)
        reference = np.zeros((n, slots, 2), dtype=np.float64)
        for row, pair_indices in enumerate(rows):
            at = 0
            for slot, i in enumerate(pair_indices):
                pair = self.pairs[i]
                p, c, r = cut_lengths(len(pair.prompt), len(pair.chosen), len(pair.rejected), width)
                prompt = pair.prompt[len(pair.prompt) - p:]
                for half, (ids, mask, k) in enumerate(((pair.chosen, pair.chosen_mask, c),
                                                       (pair.rejected, pair.rejected_mask, r))):
                    tokens[row, at:at + p] = prompt
                    tokens[row, at + p:at + p + k] = ids[:k]
                    side[row, at + p:at + p + k] = np.where(mask[:k], 2 * slot + half + 1, 0)
                    documents[row, at:at + p + k] = 2 * slot + half
                    at += p + k
                present[row, slot] = True
                if self.reference is not None:
                    reference[row, slot] = self.reference[i]
            documents[row, at:] = 2 * len(pair_indices)  # the padding
        # Label j is token j + 1: it counts for the response that token belongs to.
        batch = make_batch(tokens, documents[:, :-1], (side[:, 1:] > 0).astype(np.float32), True, True)
        batch.pair_side = torch.from_numpy(np.ascontiguousarray(side[:, 1:]))
        batch.pairs = torch.from_numpy(present)
        if self.reference is not None:
            batch.reference_logps = torch.from_numpy(reference)
        return batch


def preference_parts(dataset: Optional[SampleDataset]) -> list[PreferenceDataset]:
    """The PreferenceDatasets a (blended) dataset draws from, in order; [] for None."""
    if dataset is None:
        return []
    parts = getattr(dataset, "datasets", [dataset])
    return [p for p in parts if isinstance(p, PreferenceDataset)]
