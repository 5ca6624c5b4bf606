"""Supervised fine-tuning data: chat jsonl rendered with the Qwen2 chat template, loss on assistant turns.

Each line of the file is {"messages": [{"role": ..., "content": ...}, ...]}. A conversation is
rendered as Qwen2's template does it (with its default system prompt when the first message is
not a system message):

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n<|im_start|>user\\n...<|im_end|>\\n
    <|im_start|>assistant\\n...<|im_end|>\\n

The loss counts the tokens of each assistant message's content and its closing <|im_end|>;
everything else (system and user turns, role headers, the newline after <|im_end|>) only
conditions. By default samples are padded: one conversation per row, cut to seq_length + 1
tokens when longer, filled up with the end-of-document token, which the loss mask excludes; rows
then need neither a document mask nor position resets. With packing (`data.sft_packing=true`)
a row holds as many whole conversations as fit (filled in a seeded order, each bin closed when the
next conversation does not fit); every conversation is its own document (attention stays inside it,
positions restart at 0) and the padding after the last one is one more, masked, document. A label
never crosses conversations in the loss: the first token of a conversation (<|im_start|>) never counts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
from tokenizers import AddedToken, Tokenizer

from megatron_qwen2.data.batch import Batch, make_batch
from megatron_qwen2.data.sampler import EpochShuffle, SampleDataset, Seed
from megatron_qwen2.errors import DataError

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
ROLES = ("system", "user", "assistant", "tool")


def ensure_chat_tokens(tok: Tokenizer) -> Tokenizer:
    """Add <|im_start|> and <|im_end|> as special tokens where the tokenizer lacks them (the vocabulary grows)."""
    missing = [t for t in (IM_START, IM_END) if tok.token_to_id(t) is None]
    if missing:
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
    return tok


def render_chat(messages: Sequence[dict], tok: Tokenizer, system_prompt: Optional[str] = DEFAULT_SYSTEM_PROMPT,
                where: str = "conversation") -> tuple[np.ndarray, np.ndarray]:
    """Token ids of the rendered conversation and a bool mask of the tokens the loss counts."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list")
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: each message needs a role in {ROLES} and a string content, got {m!r}")
    if messages[0]["role"] != "system" and system_prompt is not None:
        messages = [{"role": "system", "content": system_prompt}] + list(messages)
    start, end = tok.token_to_id(IM_START), tok.token_to_id(IM_END)
    if start is None or end is None:
        raise ValueError(f"tokenizer lacks {IM_START}/{IM_END}; call ensure_chat_tokens first")
    ids: list[int] = []
    mask: list[bool] = []

    def text(s: str, counts: bool) -> None:
        piece = tok.encode(s, add_special_tokens=False).ids
        ids.extend(piece)
        mask.extend([counts] * len(piece))

    parse_special = tok.encode_special_tokens
    tok.encode_special_tokens = True  # "<|im_end|>" typed inside a message is text, not a turn boundary
    try:
        for m in messages:
            learn = m["role"] == "assistant"
            ids.append(start)
            mask.append(False)
            text(m["role"] + "\n", False)
            text(m["content"], learn)
            ids.append(end)
            mask.append(learn)
            text("\n", False)
    finally:
        tok.encode_special_tokens = parse_special
    return np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=bool)


def jsonl_records(path: Path, what: str) -> Iterator[tuple[str, object]]:
    """(where, record) of each non-blank line of a jsonl file, where = "PATH:LINE"; a DataError names
    the line that is not JSON, or the file (`what`: "SFT file", ...) when it cannot be read as text."""
    try:
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{line_no}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{where}: not valid JSON ({err.msg})") from None
                yield where, record
    except OSError as err:
        raise DataError(f"{what} {path}: cannot be read ({err.strerror or err}); correct data.paths") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{what} {path}: not UTF-8 text ({err.reason} at byte {err.start})") from None


def load_conversations(path: Path, tok: Tokenizer) -> list[tuple[np.ndarray, np.ndarray]]:
    """Every conversation of a chat jsonl file, rendered and tokenised, in file order."""
    convs = []
    for where, record in jsonl_records(path, "SFT file"):
        if not isinstance(record, dict) or "messages" not in record:
            raise DataError(f'{where}: expected an object {{"messages": [{{"role": ..., "content": ...}}, ...]}}')
        convs.append(render_chat(record["messages"], tok, where=where))
    if not convs:
        raise DataError(f"{path}: holds no conversations")
    return convs


def pack_conversations(lengths: Sequence[int], width: int, seed: Seed) -> list[list[int]]:
    """Bins of conversation indices whose lengths sum to at most `width` (a longer conversation gets a
    bin of its own and is cut): the conversations in a seeded permutation, each bin closed when the
    next one does not fit. Deterministic in (lengths, width, seed)."""
    order = EpochShuffle(len(lengths), seed)(np.arange(len(lengths)))  # epoch 0's permutation
    bins: list[list[int]] = []
    used = width + 1  # no open bin
    for c in order.tolist():
        n = min(int(lengths[c]), width)
        if used + n > width:
            bins.append([])
            used = 0
        bins[-1].append(c)
        used += n
    return bins


class SFTDataset(SampleDataset):
    """Conversations as samples — one padded per row, or packed several per row (`pack`); epoch e
    visits the samples in a permutation of (seed, e)."""

    def __init__(self, conversations: Sequence[tuple[np.ndarray, np.ndarray]], seq_length: int, seed: Seed,
                 pad_id: int, vocab_size: int, pack: bool = False):
        if seq_length < 1:
            raise ValueError(f"seq_length must be >= 1, got {seq_length}")
        self.conversations, self.seq_length = list(conversations), seq_length
        self.pad_id, self.vocab_size, self.pack = pad_id, vocab_size, pack
        width = seq_length + 1
        pack_seed = ([seed] if isinstance(seed, int) else list(seed)) + [1]  # not the epochs' permutations
        self.rows = (pack_conversations([len(ids) for ids, _ in self.conversations], width, pack_seed)
                     if pack else [[c] for c in range(len(self.conversations))])
        self.order = EpochShuffle(len(self.rows), seed)
        self.truncated = sum(len(ids) > width for ids, _ in self.conversations)

    def __len__(self) -> int:
        return len(self.rows)

    def samples(self, indices: np.ndarray) -> Batch:
        n, width = len(indices), self.seq_length + 1
        tokens = np.full((n, width), self.pad_id, dtype=np.int64)
        learn = np.zeros((n, width), dtype=bool)
        documents = np.zeros((n, width), dtype=np.int64)
        for row, r in enumerate(self.order(indices)):
            at = 0
            for doc, c in enumerate(self.rows[r]):
                ids, mask = self.conversations[c]
                k = min(len(ids), width - at)
                tokens[row, at:at + k], learn[row, at:at + k] = ids[:k], mask[:k]
                documents[row, at:at + k] = doc
                at += k
            documents[row, at:] = len(self.rows[r])  # the padding: a document of its own, never learned
        # Label j is token j + 1: it counts when that token belongs to an assistant turn.
        if not self.pack:
            return make_batch(tokens, None, learn[:, 1:].astype(np.float32), False, False)
        return make_batch(tokens, documents[:, :-1], learn[:, 1:].astype(np.float32), True, True)
