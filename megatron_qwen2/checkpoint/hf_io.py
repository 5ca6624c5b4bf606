"""Read and write Hugging Face model directories: config.json + (sharded) safetensors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from megatron_qwen2.checkpoint.atomic import atomic_directory

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # "5GB", as transformers counts it
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16",
                torch.float64: "float64"}


def read_hf_dir(hf_dir: Union[str, Path], progress: Optional[bool] = None) -> tuple[dict[str, torch.Tensor], dict]:
    """All tensors of an HF model directory and its config.json as a dict."""
    hf_dir = Path(hf_dir)
    if not (hf_dir / CONFIG_FILE).is_file():
        raise ValueError(f"{hf_dir} is not a Hugging Face model directory (no {CONFIG_FILE})")
    config = _read_json(hf_dir / CONFIG_FILE)
    weight_map = None
    if (hf_dir / INDEX_FILE).is_file():
        weight_map = _read_json(hf_dir / INDEX_FILE).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{hf_dir / INDEX_FILE} has no weight_map")
        files = sorted(set(weight_map.values()))
    elif (hf_dir / SINGLE_FILE).is_file():
        files = [SINGLE_FILE]
    else:
        raise ValueError(f"{hf_dir} holds no {SINGLE_FILE} and no {INDEX_FILE}")
    tensors: dict[str, torch.Tensor] = {}
    for fname in tqdm(files, desc="reading shards", unit="file", disable=_no_bar(progress, len(files))):
        path = hf_dir / fname
        if not path.is_file():
            raise ValueError(f"{hf_dir / INDEX_FILE} names {fname}, which does not exist")
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                if key in tensors:
                    raise ValueError(f"tensor {key} appears in more than one shard of {hf_dir}")
                if weight_map is not None and weight_map.get(key) != fname:
                    raise ValueError(f"{path} holds {key}, which {INDEX_FILE} places in {weight_map.get(key)}")
                tensors[key] = f.get_tensor(key)
    unheld = sorted(set(weight_map or ()) - set(tensors))
    if unheld:
        raise ValueError(f"{hf_dir / INDEX_FILE} lists tensor(s) that no shard holds: {unheld[:8]}")
    return tensors, config


def write_hf_dir(tensors: dict[str, torch.Tensor], config: dict, out_dir: Union[str, Path],
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, overwrite: bool = False,
                 progress: Optional[bool] = None) -> Path:
    """Write config.json and safetensors (sharded, with an index, above max_shard_bytes), atomically."""
    if max_shard_bytes <= 0:
        raise ValueError(f"max shard size must be > 0 bytes, got {max_shard_bytes}")
    out_dir = Path(out_dir)
    dtype = _DTYPE_NAMES.get(_main_dtype(tensors), "float32")
    # transformers 5 reads `dtype`; older releases read `torch_dtype`.
    config = {**config, "torch_dtype": dtype, "dtype": dtype}
    shards = plan_shards(tensors, max_shard_bytes)
    names = [SINGLE_FILE] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    with atomic_directory(out_dir, overwrite) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        weight_map = {}
        bar = tqdm(total=len(tensors), desc="writing tensors", unit="tensor", disable=_no_bar(progress, len(tensors)))
        for fname, keys in zip(names, shards):
            save_file({k: tensors[k].detach().contiguous() for k in keys}, str(tmp / fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in keys})
            bar.update(len(keys))
        bar.close()
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(_nbytes(t) for t in tensors.values())},
                     "weight_map": dict(sorted(weight_map.items()))}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return out_dir


def plan_shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[list[str]]:
    """Group tensor names, in order, into shards of at most max_bytes (a bigger tensor gets its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        n = _nbytes(t)
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def _main_dtype(tensors: dict[str, torch.Tensor]) -> Optional[torch.dtype]:
    """The dtype holding the most bytes (norms may be kept in fp32 next to bf16 weights)."""
    totals: dict[torch.dtype, int] = {}
    for t in tensors.values():
        totals[t.dtype] = totals.get(t.dtype, 0) + _nbytes(t)
    return max(totals, key=totals.get) if totals else None


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def _no_bar(progress: Optional[bool], n: int) -> Optional[bool]:
    # None lets tqdm hide the bar when stderr is not a terminal.
    return True if progress is False or n <= 1 else None
