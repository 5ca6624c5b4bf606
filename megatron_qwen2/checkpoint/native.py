"""The native checkpoint: full (unsharded) tensors under their global names.

A checkpoint directory holds `model_config.json` (the ModelConfig) and `model/`, a
torch.distributed.checkpoint directory, so that any parallel layout can load it and later
sharded saves write the same format (DESIGN principle 4). Directories are written under a
temporary name and renamed into place, so a checkpoint is either complete or absent.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import warnings
from pathlib import Path
from typing import Optional, Union

import torch
import torch.distributed.checkpoint as dcp

from megatron_qwen2.checkpoint.atomic import atomic_directory
from megatron_qwen2.config import ModelConfig

CONFIG_FILE = "model_config.json"
MODEL_DIR = "model"
LATEST_FILE = "latest"


def save_native(state: dict[str, torch.Tensor], model_cfg: ModelConfig, out_dir: Union[str, Path],
                overwrite: bool = False) -> Path:
    """Write a checkpoint of `state` (full tensors) to out_dir atomically; returns out_dir."""
    out_dir = Path(out_dir)
    with atomic_directory(out_dir, overwrite) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(model_cfg), indent=1) + "\n")
        with _single_process():
            dcp.save({k: v.detach().contiguous() for k, v in state.items()}, checkpoint_id=str(tmp / MODEL_DIR),
                     no_dist=True)
    return out_dir


@contextlib.contextmanager
def _single_process():
    """This process alone reads or writes the whole checkpoint; DCP need not coordinate."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def resolve_checkpoint_dir(ckpt_dir: Union[str, Path]) -> Path:
    """The checkpoint directory itself, following a `latest` file (a run's checkpoints/ dir)."""
    ckpt_dir = Path(ckpt_dir)
    if (ckpt_dir / LATEST_FILE).is_file():
        ckpt_dir = ckpt_dir / (ckpt_dir / LATEST_FILE).read_text().strip()
    if not (ckpt_dir / CONFIG_FILE).is_file() or not (ckpt_dir / MODEL_DIR).is_dir():
        raise ValueError(f"{ckpt_dir} is not a native checkpoint (no {CONFIG_FILE} and {MODEL_DIR}/ inside)")
    return ckpt_dir


def load_model_config(ckpt_dir: Union[str, Path]) -> ModelConfig:
    ckpt_dir = resolve_checkpoint_dir(ckpt_dir)
    fields = json.loads((ckpt_dir / CONFIG_FILE).read_text())
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"{ckpt_dir / CONFIG_FILE} has unknown fields {unknown}")
    return ModelConfig(**fields).validate()


def load_native_state(ckpt_dir: Union[str, Path]) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """All tensors of a checkpoint (on the CPU) and its ModelConfig."""
    ckpt_dir = resolve_checkpoint_dir(ckpt_dir)
    cfg = load_model_config(ckpt_dir)
    reader = dcp.FileSystemReader(str(ckpt_dir / MODEL_DIR))
    meta = reader.read_metadata().state_dict_metadata
    state = {}
    for name, md in meta.items():
        state[name] = torch.empty(md.size, dtype=md.properties.dtype)
    with _single_process():
        dcp.load(state, storage_reader=reader, no_dist=True)
    return state, cfg


def load_model(ckpt_dir: Union[str, Path], device: Union[str, torch.device] = "cpu",
               dtype: Optional[torch.dtype] = None):
    """A single-process Qwen2Model (eval mode) with the checkpoint's weights; model(ids) -> logits."""
    from megatron_qwen2.model import Qwen2Model

    state, cfg = load_native_state(ckpt_dir)
    model = Qwen2Model(cfg)
    expected = dict(model.named_parameters())
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise ValueError(f"checkpoint {ckpt_dir} does not match the model: missing {missing[:5]}, extra {extra[:5]}")
    with torch.no_grad():
        for name, p in expected.items():
            if tuple(state[name].shape) != tuple(p.shape):
                raise ValueError(f"checkpoint tensor {name} has shape {tuple(state[name].shape)}, "
                                 f"the model expects {tuple(p.shape)}")
            p.copy_(state[name])
    model.to(device=device, dtype=dtype or next(iter(state.values())).dtype)
    return model.eval()
