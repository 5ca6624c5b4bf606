"""The compiled extension `megatron_qwen2._C`, loaded once; None when it is not built."""

from __future__ import annotations

import functools
import os
import warnings
from types import ModuleType
from typing import Optional


@functools.lru_cache(maxsize=None)
def load() -> Optional[ModuleType]:
    """The extension module, or None (warning once) when it is missing or disabled.

    MEGATRON_QWEN2_DISABLE_EXT=1 forces the PyTorch fallbacks.
    """
    if os.environ.get("MEGATRON_QWEN2_DISABLE_EXT") == "1":
        return None
    try:
        from megatron_qwen2 import _C
    except ImportError as e:
        warnings.warn(f"megatron_qwen2._C is not available ({e}); fused ops on CUDA use the PyTorch "
                      "reference implementations", RuntimeWarning, stacklevel=2)
        return None
    return _C
