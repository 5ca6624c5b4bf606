"""Tokenise jsonl / text files into an indexed token file pair for training.

    python tools/preprocess_data.py --input 'corpus/*.jsonl' notes.txt --tokenizer Qwen2-7B/ \
        --output-prefix data/corpus --workers 8 [--json-key text] [--format native|megatron]

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
