#!/usr/bin/env python
"""Convert Qwen2 checkpoints (see megatron_qwen2/checkpoint/convert.py):

    python tools/convert_checkpoint.py hf-to-native --input HF_DIR --output CKPT_DIR
    python tools/convert_checkpoint.py native-to-hf --input CKPT_DIR --output HF_DIR [--tokenizer PATH | --no-tokenizer]

Errors are one line on stderr and exit code 2.
"""

import sys
from pathlib import Path

try:
    import megatron_qwen2  # noqa: F401
except ImportError:  # a source checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_qwen2.checkpoint.convert import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
