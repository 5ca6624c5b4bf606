"""Supervised fine-tuning data: chat jsonl rendered with the Qwen2 chat template, loss on assistant turns.

Each line of the file is {"messages": [{"role": ..., "content": ...}, ...]}. A conversation is
rendered as Qwen2's template does it (with its default system prompt when the first message is
not a system message):

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n<|im_start|>user\\n...<|im_end|>\\n
    <|im_start|>assistant\\n...<|im_end|>\\n

The loss counts the tokens of each assistant message's content and its closing <|im_end|>;
everything else (system and user turns, role headers, the newline after <|im_end|>) only
conditions. Samples are padded, not packed: one conversation per row, cut to seq_length + 1
tokens when longer, filled up with the end-of-document token, which the loss mask excludes.
Rows then need neither a document mask nor position resets.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from tokenizers import AddedToken, Tokenizer

from megatron_qwen2.data.batch import Batch, make_batch
from megatron_qwen2.data.sampler import EpochShuffle, SampleDataset, Seed

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
        raise ValueError(f"{where}: 'messages' must be a non-empty list")
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"{where}: each message needs a role in {ROLES} and a string content, got {m!r}")
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


def load_conversations(path: Path, tok: Tokenizer) -> list[tuple[np.ndarray, np.ndarray]]:
    """Every conversation of a chat jsonl file, rendered and tokenised, in file order."""
    convs = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict) or "messages" not in record:
                raise ValueError(f'{where}: expected an object {{"messages": [{{"role": ..., "content": ...}}, ...]}}')
            convs.append(render_chat(record["messages"], tok, where=where))
    if not convs:
        raise ValueError(f"{path}: holds no conversations")
    return convs


class SFTDataset(SampleDataset):
    """One padded conversation per sample; epoch e visits the conversations in a permutation of (seed, e)."""

    def __init__(self, conversations: Sequence[tuple[np.ndarray, np.ndarray]], seq_length: int, seed: Seed,
                 pad_id: int, vocab_size: int):
        if seq_length < 1:
            raise ValueError(f"seq_length must be >= 1, got {seq_length}")
        self.conversations, self.seq_length = list(conversations), seq_length
        self.pad_id, self.vocab_size = pad_id, vocab_size
        self.order = EpochShuffle(len(self.conversations), seed)
        self.truncated = sum(len(ids) > seq_length + 1 for ids, _ in self.conversations)

    def __len__(self) -> int:
        return len(self.conversations)

    def samples(self, indices: np.ndarray) -> Batch:
        n, width = len(indices), self.seq_length + 1
        tokens = np.full((n, width), self.pad_id, dtype=np.int64)
        learn = np.zeros((n, width), dtype=bool)
        for row, c in enumerate(self.order(indices)):
            ids, mask = self.conversations[c]
            k = min(len(ids), width)
            tokens[row, :k], learn[row, :k] = ids[:k], mask[:k]
        # Label j is token j + 1: it counts when that token belongs to an assistant turn.
        return make_batch(tokens, None, learn[:, 1:].astype(np.float32), False, False)
