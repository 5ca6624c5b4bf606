"""Training data: corpus files, tokenizers, the cached token stream and packed training windows."""

from megatron_qwen2.data.corpus import corpus_files, read_document, stdlib_files
from megatron_qwen2.data.text_dataset import PackedDataset, build_packed_dataset, corpus_tokens, token_dtype
from megatron_qwen2.data.tokenizer import (
    EOD_TOKEN,
    REPO_TOKENIZER,
    SPECIAL_TOKENS,
    eod_token_id,
    load_tokenizer,
    tokenizer_file,
    train_bpe_tokenizer,
)

__all__ = [
    "EOD_TOKEN",
    "PackedDataset",
    "REPO_TOKENIZER",
    "SPECIAL_TOKENS",
    "build_packed_dataset",
    "corpus_files",
    "corpus_tokens",
    "eod_token_id",
    "load_tokenizer",
    "read_document",
    "stdlib_files",
    "token_dtype",
    "tokenizer_file",
    "train_bpe_tokenizer",
]
