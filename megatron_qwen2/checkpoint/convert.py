"""`tools/convert_checkpoint.py`: Hugging Face <-> native checkpoints, bit-exact both ways."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

import torch

from megatron_qwen2.checkpoint.hf import hf_config_to_model_config, hf_to_native, model_config_to_hf_config, native_to_hf
from megatron_qwen2.checkpoint.hf_io import read_hf_dir, write_hf_dir
from megatron_qwen2.checkpoint.native import load_native_state, save_native

DTYPES = {"keep": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _cast(tensors: dict[str, torch.Tensor], dtype: Optional[torch.dtype]) -> dict[str, torch.Tensor]:
    return tensors if dtype is None else {k: v.to(dtype) for k, v in tensors.items()}


def hf_to_native_dir(input_dir: Path, output_dir: Path, dtype: Optional[torch.dtype] = None,
                     overwrite: bool = False, name: Optional[str] = None) -> Path:
    """Convert an HF model directory into a native checkpoint directory."""
    _check_output(output_dir, overwrite)
    tensors, hf_config = read_hf_dir(input_dir)
    cfg = hf_config_to_model_config(hf_config, name=name or Path(input_dir).name)
    state = _cast(hf_to_native(tensors, cfg), dtype)
    return save_native(state, cfg, output_dir, overwrite=overwrite)


def native_to_hf_dir(input_dir: Path, output_dir: Path, dtype: Optional[torch.dtype] = None,
                     overwrite: bool = False, max_shard_bytes: int = 5 * 1024**3) -> Path:
    """Convert a native checkpoint (or a run's checkpoints/ dir) into an HF model directory."""
    _check_output(output_dir, overwrite)
    state, cfg = load_native_state(input_dir)
    tensors = _cast(native_to_hf(state, cfg), dtype)
    return write_hf_dir(tensors, model_config_to_hf_config(cfg), output_dir, max_shard_bytes, overwrite)


def _check_output(output_dir: Path, overwrite: bool) -> None:
    # Fail before reading gigabytes of input.
    if Path(output_dir).exists() and not overwrite:
        raise FileExistsError(f"output {output_dir} already exists (pass --overwrite to replace it)")


def _size(text: str) -> int:
    units = {"KB": 1024, "MB": 1024**2, "GB": 1024**3, "B": 1}
    t = text.strip().upper()
    for unit, mult in units.items():
        if t.endswith(unit) and t[:-len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(t[:-len(unit)]) * mult)
    if t.isdigit():
        return int(t)
    raise argparse.ArgumentTypeError(f"bad size {text!r} (examples: 5GB, 500MB, 1048576)")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("direction", choices=["hf-to-native", "native-to-hf"])
    parser.add_argument("--input", required=True, type=Path)
    parser.add_argument("--output", required=True, type=Path)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="keep", help="cast tensors (default: keep)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    parser.add_argument("--max-shard-size", type=_size, default="5GB", help="native-to-hf shard size")
    args = parser.parse_args(argv)
    try:
        if not args.input.exists():
            raise ValueError(f"input {args.input} does not exist")
        if args.direction == "hf-to-native":
            out = hf_to_native_dir(args.input, args.output, DTYPES[args.dtype], args.overwrite)
        else:
            out = native_to_hf_dir(args.input, args.output, DTYPES[args.dtype], args.overwrite, args.max_shard_size)
    except (ValueError, FileExistsError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0
