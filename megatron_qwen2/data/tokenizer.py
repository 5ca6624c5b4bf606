"""Tokenizers: the repository's small byte-level BPE, or any Hugging Face `tokenizer.json`.

The repository tokenizer (assets/tokenizer.json, 4096 tokens) follows Qwen2's design at a small
scale: Qwen2's pre-tokenisation regex (digits split one by one), byte-level BPE so any text
round-trips, and Qwen2's special tokens, `<|endoftext|>` ending each document.
`tools/train_tokenizer.py` rebuilds it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Union

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from megatron_qwen2.errors import DataError

REPO_TOKENIZER = Path(__file__).resolve().parent / "assets" / "tokenizer.json"
EOD_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = (EOD_TOKEN, "<|im_start|>", "<|im_end|>")  # ids 0, 1, 2 in the repo tokenizer

# Qwen2's pre-tokeniser split (from its tokenizer.json).
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def tokenizer_file(path: Union[str, Path, None]) -> Path:
    """The tokenizer.json that `path` names: None → the repo's, a directory → DIR/tokenizer.json, a file → it."""
    if path is None:
        file = REPO_TOKENIZER
    else:
        file = Path(path).expanduser()
        if file.is_dir():
            file = file / "tokenizer.json"
    if not file.is_file():
        raise DataError(f"tokenizer {str(path) if path is not None else 'default'!r}: no file at {file} "
                        "(give a tokenizer.json or a directory holding one)")
    return file


def load_tokenizer(path: Union[str, Path, None] = None) -> Tokenizer:
    """Load a `tokenizers.Tokenizer`; see `tokenizer_file` for what `path` may be."""
    file = tokenizer_file(path)
    try:
        tok = Tokenizer.from_file(str(file))
    except Exception as err:  # the Rust side raises plain Exception for malformed JSON
        raise DataError(f"tokenizer {file} is not a valid tokenizer.json: {err}") from err
    tok.source_path = str(file)  # for error messages further on
    return tok


def eod_token_id(tok: Tokenizer) -> int:
    """The id of `<|endoftext|>`, the token that ends each document."""
    token_id = tok.token_to_id(EOD_TOKEN)
    if token_id is None:
        raise ValueError(f"tokenizer {getattr(tok, 'source_path', '<in memory>')} has no {EOD_TOKEN} token, "
                         "which ends each document")
    return token_id


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE with Qwen2's pre-tokenisation and special tokens (deterministic for fixed texts)."""
    min_size = len(SPECIAL_TOKENS) + len(pre_tokenizers.ByteLevel.alphabet())
    if vocab_size < min_size:
        raise ValueError(f"vocab_size={vocab_size} is below the {min_size} tokens that the byte alphabet and the "
                         "special tokens take")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, so any text encodes
    )
    tok.train_from_iterator(texts, trainer)
    return tok
