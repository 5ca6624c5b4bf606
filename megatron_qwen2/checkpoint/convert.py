"""Convert checkpoints between Hugging Face and native form, bit-exact both ways.

Used by `tools/convert_checkpoint.py hf-to-native|native-to-hf --input DIR --output DIR`.
`native-to-hf` also writes the tokenizer files: those of `--tokenizer PATH`, else those of the
tokenizer the checkpoint's run config names (`data.tokenizer`; null is the repository's
tokenizer). A checkpoint with neither (one converted from Hugging Face, or upcycled) needs
`--tokenizer PATH` or `--no-tokenizer` (the weights alone).

Every error of the tools (this one and tools/upcycle.py) is one line on stderr, `error: ...`,
naming the path or value and the fix, and exit code 2 (errors.EXIT_CONFIG); nothing on disk
changes, and an existing output stays unless --overwrite (then it is replaced only once the
directory written is complete).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Callable, NoReturn, Optional, Union

import torch
from safetensors import SafetensorError
from torch.distributed.checkpoint.api import CheckpointException

from megatron_qwen2.checkpoint.atomic import check_paths
from megatron_qwen2.checkpoint.distributed import RUN_CONFIG_FILE
from megatron_qwen2.checkpoint.hf import (hf_config_to_model_config, hf_to_native, model_config_to_hf_config,
                                          native_to_hf)
from megatron_qwen2.checkpoint.hf_io import (DEFAULT_MAX_SHARD_BYTES, hf_tokenizer_files, qwen2_pipeline_differences,
                                             read_hf_dir, write_hf_dir)
from megatron_qwen2.checkpoint.native import (describe_os_error, find_os_error, load_model_config, load_native_state,
                                              resolve_checkpoint_dir, save_native)
from megatron_qwen2.data.tokenizer import load_tokenizer, tokenizer_file
from megatron_qwen2.errors import EXIT_CONFIG, ConfigError, TrainingError

DTYPES = {"keep": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}

PathLike = Union[str, Path]


def hf_to_native_dir(input_dir: Path, output_dir: Path, dtype: Optional[torch.dtype] = None,
                     overwrite: bool = False, name: Optional[str] = None) -> Path:
    """Convert an HF model directory into a native checkpoint directory."""
    check_paths(input_dir, output_dir, overwrite)
    tensors, hf_config = read_hf_dir(input_dir)
    try:
        cfg = hf_config_to_model_config(hf_config, name=name or Path(input_dir).resolve().name)
    except KeyError as e:
        raise ValueError(f"{Path(input_dir) / 'config.json'} lacks the field {e}") from None
    state = _cast(hf_to_native(tensors, cfg), dtype)
    return save_native(state, cfg, output_dir, overwrite=overwrite)


def native_to_hf_dir(input_dir: Path, output_dir: Path, dtype: Optional[torch.dtype] = None,
                     overwrite: bool = False, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                     tokenizer: Optional[PathLike] = None, with_tokenizer: bool = True) -> Path:
    """Convert a native checkpoint (or a run's checkpoints/ dir) into an HF model directory, with the
    tokenizer files of `tokenizer` or of the run's tokenizer (see the module docstring) unless
    `with_tokenizer` is False."""
    check_paths(input_dir, output_dir, overwrite)
    ckpt_dir = resolve_checkpoint_dir(input_dir)
    run_config = read_run_config(ckpt_dir)
    cfg = load_model_config(ckpt_dir)
    hf_config, files, differences = model_config_to_hf_config(cfg), {}, []
    if with_tokenizer:  # before the weights are read: a tokenizer problem costs no time
        source = tokenizer_source(ckpt_dir, run_config, tokenizer)
        tok = load_tokenizer(source)
        differences = qwen2_pipeline_differences(tok)
        files, token_ids = hf_tokenizer_files(tok, cfg.vocab_size, cfg.max_position_embeddings,
                                              chat=_trained_on_chat(run_config))
        hf_config.update(token_ids)
    state, cfg = load_native_state(ckpt_dir)  # checked against the manifest before it is read
    tensors = _cast(native_to_hf(state, cfg), dtype)
    out = write_hf_dir(tensors, hf_config, output_dir, max_shard_bytes, overwrite, files=files)
    if differences:
        print(f"warning: tokenizer {source} differs from Qwen2's in its {' and '.join(differences)}; transformers "
              ">= 5 loads a qwen2 model's tokenizer with Qwen2's pipeline (NFC normalizer, Qwen2's split), so text "
              "that is not in Unicode NFC (or splits otherwise) encodes there differently than in training",
              file=sys.stderr)
    return out


def read_run_config(ckpt_dir: Path) -> Optional[dict]:
    """A training checkpoint's resolved run config (config.json); None for a checkpoint without one."""
    path = ckpt_dir / RUN_CONFIG_FILE
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path} is unreadable ({e}); restore it, or pass --tokenizer PATH") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path} is not a run config (a JSON object); restore it, or pass --tokenizer PATH")
    return config


def tokenizer_source(ckpt_dir: Path, run_config: Optional[dict], tokenizer: Optional[PathLike]) -> Optional[Path]:
    """The tokenizer.json to export: `tokenizer` when given, else the one the run config names
    (data.tokenizer: null is the repository's). ConfigError when there is neither or the file is gone."""
    if tokenizer is not None:
        try:
            return tokenizer_file(tokenizer)
        except FileNotFoundError as e:
            raise ConfigError(f"--tokenizer: {e}") from None
    data = (run_config or {}).get("data")
    if not isinstance(data, dict) or "tokenizer" not in data:
        raise ConfigError(f"checkpoint {ckpt_dir} records no tokenizer (it has no run config {RUN_CONFIG_FILE}): "
                          "pass --tokenizer PATH (a tokenizer.json or a Hugging Face tokenizer directory), or "
                          "--no-tokenizer to write the weights alone")
    try:
        return tokenizer_file(data["tokenizer"])
    except FileNotFoundError:
        raise ConfigError(f"checkpoint {ckpt_dir} was trained with the tokenizer {data['tokenizer']!r}, which is not "
                          f"at {Path(data['tokenizer']).expanduser().resolve()}: pass --tokenizer PATH") from None


def _trained_on_chat(run_config: Optional[dict]) -> bool:
    data = (run_config or {}).get("data")
    return isinstance(data, dict) and data.get("format") in ("sft", "preference")  # rendered with the chat template


def _cast(tensors: dict[str, torch.Tensor], dtype: Optional[torch.dtype]) -> dict[str, torch.Tensor]:
    return tensors if dtype is None else {k: v.to(dtype) for k, v in tensors.items()}


def parse_size(text: str) -> int:
    """'5GB' (10^9), '500MiB' (2^20), '1048576' -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS or float(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (examples: 5GB, 500MiB, 1048576)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


class ToolArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line, `error: PROG: ... (see PROG --help)`, and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_CONFIG, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def error_line(e: BaseException) -> Optional[str]:
    """The one line a tool prints for an expected error; None for a bug (its traceback is shown)."""
    if isinstance(e, (TrainingError, ValueError, SafetensorError)):
        return str(e)
    if isinstance(e, (OSError, CheckpointException)):
        cause = find_os_error(e)
        return describe_os_error(cause) if cause is not None else str(e)
    return None


def run_tool(work: Callable[[], Path]) -> int:
    """Run a tool's work: 0 after printing `wrote PATH`, or EXIT_CONFIG after one `error: ...` line."""
    try:
        out = work()
    except Exception as e:
        line = error_line(e)
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        return EXIT_CONFIG
    print(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = ToolArgumentParser(prog="convert_checkpoint.py",
                                description="Convert Qwen2 checkpoints between Hugging Face and native form.")
    parser.add_argument("direction", choices=["hf-to-native", "native-to-hf"])
    parser.add_argument("--input", required=True, type=Path, help="HF model dir, native checkpoint or checkpoints/")
    parser.add_argument("--output", required=True, type=Path, help="directory to write (must not exist)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="keep", help="cast every tensor (default: keep)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    parser.add_argument("--max-shard-size", type=parse_size, default=DEFAULT_MAX_SHARD_BYTES,
                        help="native-to-hf: largest safetensors file, e.g. 5GB or 500MiB (default 5GB)")
    tok = parser.add_mutually_exclusive_group()
    tok.add_argument("--tokenizer", type=Path, default=None,
                     help="native-to-hf: the tokenizer to write (a tokenizer.json or a directory holding one); "
                          "default: the one the checkpoint's run config names")
    tok.add_argument("--no-tokenizer", action="store_true", help="native-to-hf: write the weights alone")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    """Run the converter; returns 0, or 2 after printing one `error: ...` line to stderr."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.direction == "hf-to-native":
        if args.tokenizer is not None or args.no_tokenizer:
            parser.error("--tokenizer / --no-tokenizer apply to native-to-hf only")
        return run_tool(lambda: hf_to_native_dir(args.input, args.output, DTYPES[args.dtype], args.overwrite))
    return run_tool(lambda: native_to_hf_dir(args.input, args.output, DTYPES[args.dtype], args.overwrite,
                                             args.max_shard_size, args.tokenizer, not args.no_tokenizer))


if __name__ == "__main__":
    sys.exit(main())
