"""Convert checkpoints between Hugging Face and native form, bit-exact both ways.

Used by `tools/convert_checkpoint.py hf-to-native|native-to-hf --input DIR --output DIR`.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError

from megatron_qwen2.checkpoint.atomic import check_output_dir
from megatron_qwen2.checkpoint.hf import (hf_config_to_model_config, hf_to_native, model_config_to_hf_config,
                                          native_to_hf)
from megatron_qwen2.checkpoint.hf_io import DEFAULT_MAX_SHARD_BYTES, read_hf_dir, write_hf_dir
from megatron_qwen2.checkpoint.native import load_native_state, save_native

DTYPES = {"keep": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def hf_to_native_dir(input_dir: Path, output_dir: Path, dtype: Optional[torch.dtype] = None,
                     overwrite: bool = False, name: Optional[str] = None) -> Path:
    """Convert an HF model directory into a native checkpoint directory."""
    _check_paths(input_dir, output_dir, overwrite)
    tensors, hf_config = read_hf_dir(input_dir)
    try:
        cfg = hf_config_to_model_config(hf_config, name=name or Path(input_dir).resolve().name)
    except KeyError as e:
        raise ValueError(f"{Path(input_dir) / 'config.json'} lacks the field {e}") from None
    state = _cast(hf_to_native(tensors, cfg), dtype)
    return save_native(state, cfg, output_dir, overwrite=overwrite)


def native_to_hf_dir(input_dir: Path, output_dir: Path, dtype: Optional[torch.dtype] = None,
                     overwrite: bool = False, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Convert a native checkpoint (or a run's checkpoints/ dir) into an HF model directory."""
    _check_paths(input_dir, output_dir, overwrite)
    state, cfg = load_native_state(input_dir)
    tensors = _cast(native_to_hf(state, cfg), dtype)
    return write_hf_dir(tensors, model_config_to_hf_config(cfg), output_dir, max_shard_bytes, overwrite)


def _check_paths(input_dir: Path, output_dir: Path, overwrite: bool) -> None:
    # Checked before reading gigabytes of input.
    if not Path(input_dir).exists():
        raise ValueError(f"input {input_dir} does not exist")
    if Path(input_dir).resolve() == Path(output_dir).resolve():
        raise ValueError(f"output {output_dir} is the input directory")
    check_output_dir(output_dir, overwrite)


def _cast(tensors: dict[str, torch.Tensor], dtype: Optional[torch.dtype]) -> dict[str, torch.Tensor]:
    return tensors if dtype is None else {k: v.to(dtype) for k, v in tensors.items()}


def parse_size(text: str) -> int:
    """'5GB' (10^9), '500MiB' (2^20), '1048576' -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS or float(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (examples: 5GB, 500MiB, 1048576)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="convert_checkpoint.py",
                                     description="Convert Qwen2 checkpoints between Hugging Face and native form.")
    parser.add_argument("direction", choices=["hf-to-native", "native-to-hf"])
    parser.add_argument("--input", required=True, type=Path, help="HF model dir, native checkpoint or checkpoints/")
    parser.add_argument("--output", required=True, type=Path, help="directory to write (must not exist)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="keep", help="cast every tensor (default: keep)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    parser.add_argument("--max-shard-size", type=parse_size, default=DEFAULT_MAX_SHARD_BYTES,
                        help="native-to-hf: largest safetensors file, e.g. 5GB or 500MiB (default 5GB)")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    """Run the converter; returns 0, or 2 after printing `error: ...` to stderr."""
    args = build_parser().parse_args(argv)
    try:
        if args.direction == "hf-to-native":
            out = hf_to_native_dir(args.input, args.output, DTYPES[args.dtype], args.overwrite)
        else:
            out = native_to_hf_dir(args.input, args.output, DTYPES[args.dtype], args.overwrite, args.max_shard_size)
    except (ValueError, OSError, SafetensorError) as e:  # OSError covers FileExistsError
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
