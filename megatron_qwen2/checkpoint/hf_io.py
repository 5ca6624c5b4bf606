"""Read and write Hugging Face model directories: config.json + (sharded) safetensors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from megatron_qwen2.checkpoint.atomic import atomic_directory

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def read_hf_dir(hf_dir: Union[str, Path], progress: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """All tensors of an HF checkpoint directory and its config.json as a dict."""
    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise ValueError(f"{hf_dir} is not a Hugging Face model directory (no config.json)")
    config = json.loads((hf_dir / "config.json").read_text())
    if (hf_dir / INDEX_FILE).is_file():
        weight_map = json.loads((hf_dir / INDEX_FILE).read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    elif (hf_dir / SINGLE_FILE).is_file():
        files = [SINGLE_FILE]
    else:
        raise ValueError(f"{hf_dir} holds no {SINGLE_FILE} and no {INDEX_FILE}")
    tensors: dict[str, torch.Tensor] = {}
    for name in tqdm(files, desc="reading shards", unit="file", disable=not progress or len(files) == 1):
        path = hf_dir / name
        if not path.is_file():
            raise ValueError(f"{INDEX_FILE} names {name}, which is not in {hf_dir}")
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                if key in tensors:
                    raise ValueError(f"tensor {key} appears in more than one shard of {hf_dir}")
                tensors[key] = f.get_tensor(key)
    return tensors, config


def write_hf_dir(tensors: dict[str, torch.Tensor], config: dict, out_dir: Union[str, Path],
                 max_shard_bytes: int = 5 * 1024**3, overwrite: bool = False, progress: bool = True) -> Path:
    """Write config.json and safetensors shards (with an index when there are several), atomically."""
    dtypes = {t.dtype for t in tensors.values()}
    config = dict(config, torch_dtype=_DTYPE_NAMES.get(max(dtypes, key=lambda d: d.itemsize), "float32"))
    shards = _plan_shards(tensors, max_shard_bytes)
    with atomic_directory(Path(out_dir), overwrite) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        names = [SINGLE_FILE] if len(shards) == 1 else [
            f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        weight_map = {}
        for fname, keys in tqdm(list(zip(names, shards)), desc="writing shards", unit="file",
                                disable=not progress or len(shards) == 1):
            save_file({k: tensors[k].contiguous() for k in keys}, str(tmp / fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in keys})
        if len(shards) > 1:
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return out_dir


def _plan_shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards
