"""Show what an indexed dataset holds: its header and counts, a document, or a training sample.

    python tools/inspect_data.py data/web                                   # header and counts
    python tools/inspect_data.py data/web --document 3 --tokenizer Qwen2-7B/  # tokens and text of document 3
    python tools/inspect_data.py data/web --sample 0 --seq-length 4096 --tokenizer Qwen2-7B/ \
        --reset-position-ids --eod-mask-loss [--seed 1234] [--split 98,2]   # sample 0 as train.py builds it
    python tools/inspect_data.py data/web --document 3 --json              # one JSON object per line

Reads this project's format and Megatron-LM's alike (megatron_qwen2/data/inspect.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from megatron_qwen2.data.inspect import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
