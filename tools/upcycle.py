#!/usr/bin/env python
"""Upcycle a dense native checkpoint into an MoE one (Qwen2 report recipe; see
megatron_qwen2/checkpoint/upcycle.py):

    python tools/upcycle.py --input DENSE_CKPT --output MOE_CKPT --num-experts 64 --top-k 8 \\
        --expert-ffn-size 2560 --shared-expert-ffn-size 20480 --reinit-fraction 0.5 --seed S [--equivalence]

What cannot fit the output's disk or the host's memory is refused before starting; errors are one
line on stderr and exit code 2.
"""

import sys
from pathlib import Path

try:
    import megatron_qwen2  # noqa: F401
except ImportError:  # a source checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_qwen2.checkpoint.upcycle import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
