"""Tokenise jsonl / Parquet / text files or a saved Hugging Face dataset into an indexed token file pair.

    python tools/preprocess_data.py --input 'corpus/*.jsonl' notes.txt --tokenizer Qwen2-7B/ \
        --output-prefix data/corpus --workers 8 [--json-key text] [--format native|megatron]

    python tools/preprocess_data.py --input 'hf/*.parquet' hf_saved_dataset/ --json-key text \
        --output-prefix data/hf   # .parquet / save_to_disk directories: one document per row (needs pyarrow)

writes data/corpus.bin (token ids) and data/corpus.idx (header + document offsets). The format is
this project's by default (`native`, described in megatron_qwen2/data/indexed.py), or Megatron-LM's
indexed dataset with `--format megatron` (megatron_qwen2/data/megatron_indexed.py), which
Megatron-LM and NeMo read too. Train on either with `data.paths=[data/corpus]`.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from megatron_qwen2.data.preprocess import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
