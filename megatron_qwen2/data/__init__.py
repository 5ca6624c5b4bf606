"""Training data: corpus files, tokenizers, indexed token files (this project's format and Megatron-LM's),
packed / blended / SFT datasets, batches, and each data-parallel rank's rows read ahead of the step
(loader.py)."""

from megatron_qwen2.data.batch import Batch
from megatron_qwen2.data.builder import build_datasets, parse_data_paths
from megatron_qwen2.data.corpus import corpus_files, read_document, stdlib_files
from megatron_qwen2.data.indexed import IndexedDataset, IndexedDatasetWriter, open_indexed, write_indexed_dataset
from megatron_qwen2.data.megatron_indexed import (MegatronIndexedDataset, MegatronIndexedDatasetWriter,
                                                  write_megatron_dataset)
from megatron_qwen2.data.loader import BatchPrefetcher, read_on_every_rank
from megatron_qwen2.data.packed import DocumentPackedDataset
from megatron_qwen2.data.sampler import BlendedDataset, SampleDataset
from megatron_qwen2.data.sft import SFTDataset, ensure_chat_tokens, render_chat
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
    "Batch",
    "BatchPrefetcher",
    "BlendedDataset",
    "DocumentPackedDataset",
    "IndexedDataset",
    "IndexedDatasetWriter",
    "MegatronIndexedDataset",
    "MegatronIndexedDatasetWriter",
    "SFTDataset",
    "SampleDataset",
    "build_datasets",
    "ensure_chat_tokens",
    "open_indexed",
    "parse_data_paths",
    "read_on_every_rank",
    "render_chat",
    "write_indexed_dataset",
    "write_megatron_dataset",
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
