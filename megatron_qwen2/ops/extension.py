"""The compiled extension `megatron_qwen2._C`, loaded once; None when it is not built.

Which implementation a door uses is chosen per call by `use_kernel`; MEGATRON_QWEN2_OPS forces it:

- ``auto`` (default): the compiled kernel when it is built and the inputs suit it, else the reference.
- ``reference``: always the plain-PyTorch reference (for debugging a suspected kernel bug).
- ``kernel``: the compiled kernel whenever the inputs live on CUDA; raises if it is not built.
"""

from __future__ import annotations

import functools
import os
import warnings
from types import ModuleType
from typing import Optional

import torch

MODES = ("auto", "kernel", "reference")
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@functools.lru_cache(maxsize=None)
def load() -> Optional[ModuleType]:
    """The extension module, or None when MEGATRON_QWEN2_OPS=reference or it is not built (warning once)."""
    if mode() == "reference":
        return None
    try:
        from megatron_qwen2 import _C
    except ImportError as e:
        warnings.warn(f"megatron_qwen2._C is not available ({e}); fused ops on CUDA use the PyTorch "
                      "reference implementations", RuntimeWarning, stacklevel=2)
        return None
    return _C


def mode() -> str:
    """MEGATRON_QWEN2_OPS, validated: one of MODES."""
    value = os.environ.get("MEGATRON_QWEN2_OPS", "auto").strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(f"MEGATRON_QWEN2_OPS={value!r} is not one of {', '.join(MODES)}")
    return value


# Under torch.compile the choice is a constant of the process (environment and build), so
# dynamo calls these at trace time instead of tracing the import and environment look-ups.
_constant = getattr(torch._dynamo, "assume_constant_result", lambda f: f)


@_constant
def _mode_now() -> str:
    return mode()


@_constant
def _built() -> bool:
    return load() is not None


def use_kernel(*tensors: torch.Tensor, dtypes: tuple[torch.dtype, ...] = KERNEL_DTYPES) -> bool:
    """True when the compiled kernel should run on these tensors (all CUDA, one of `dtypes`)."""
    if not tensors or not all(t.is_cuda for t in tensors):
        return False
    m = _mode_now()
    if m == "reference":
        return False
    built = _built()
    if m == "kernel" and not built:
        raise RuntimeError("MEGATRON_QWEN2_OPS=kernel but megatron_qwen2._C is not built "
                           "(pip install --no-build-isolation -e . on a CUDA machine)")
    return built and tensors[0].dtype in dtypes and all(t.dtype == tensors[0].dtype for t in tensors)
