"""The native checkpoint: parameters under their global (unsharded) names and shapes.

A checkpoint directory holds `model_config.json` (the ModelConfig) and `model/`, a
torch.distributed.checkpoint (DCP) directory, so that any parallel layout can load it and
sharded saves write the same format (DESIGN principle 4). A directory is written under a
temporary name and renamed into place, so it is either complete or absent.
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
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from megatron_qwen2.checkpoint.atomic import atomic_directory
from megatron_qwen2.checkpoint.hf import expected_native_shapes
from megatron_qwen2.config import ModelConfig

CONFIG_FILE = "model_config.json"
MODEL_DIR = "model"
LATEST_FILE = "latest"

PathLike = Union[str, Path]


def save_native(state: dict[str, torch.Tensor], model_cfg: ModelConfig, out_dir: PathLike,
                overwrite: bool = False) -> Path:
    """Write full tensors `state` and `model_cfg` to out_dir atomically; returns out_dir."""
    out_dir = Path(out_dir)
    check_native_state(state, model_cfg, f"state for {out_dir}")
    with atomic_directory(out_dir, overwrite) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(model_cfg), indent=1) + "\n")
        tensors = {k: v.detach().contiguous() for k, v in state.items()}
        with _single_process():
            # no_dist: this process holds every tensor; under torchrun only rank 0 calls this.
            dcp.save(tensors, checkpoint_id=str(tmp / MODEL_DIR), no_dist=True)
    return out_dir


def check_native_state(state: dict[str, torch.Tensor], cfg: ModelConfig, what: str) -> None:
    """ValueError naming the first missing, extra or mis-shaped parameter of `state`."""
    expected = expected_native_shapes(cfg)
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing:
        raise ValueError(f"{what}: missing tensor(s) {missing[:8]}")
    if extra:
        raise ValueError(f"{what}: unexpected tensor(s) {extra[:8]}")
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise ValueError(f"{what}: tensor {name} has shape {tuple(state[name].shape)}, expected {shape}")


def resolve_checkpoint_dir(ckpt_dir: PathLike) -> Path:
    """The checkpoint directory itself, following a `latest` file (a run's checkpoints/ dir)."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.exists():
        raise ValueError(f"checkpoint {ckpt_dir} does not exist")
    if (ckpt_dir / LATEST_FILE).is_file():
        ckpt_dir = ckpt_dir / (ckpt_dir / LATEST_FILE).read_text().strip()
    if not (ckpt_dir / CONFIG_FILE).is_file() or not (ckpt_dir / MODEL_DIR).is_dir():
        raise ValueError(f"{ckpt_dir} is not a native checkpoint (it needs {CONFIG_FILE} and {MODEL_DIR}/)")
    return ckpt_dir


def load_model_config(ckpt_dir: PathLike) -> ModelConfig:
    """The ModelConfig stored in a checkpoint (`latest` is followed)."""
    path = resolve_checkpoint_dir(ckpt_dir) / CONFIG_FILE
    try:
        fields = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"{path} has unknown fields {unknown}")
    return ModelConfig(**fields).validate()


def load_native_state(ckpt_dir: PathLike) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """All tensors of a checkpoint (full, on the CPU) and its ModelConfig; `latest` is followed."""
    ckpt_dir = resolve_checkpoint_dir(ckpt_dir)
    cfg = load_model_config(ckpt_dir)
    reader = dcp.FileSystemReader(str(ckpt_dir / MODEL_DIR))
    try:
        meta = reader.read_metadata().state_dict_metadata
    except FileNotFoundError:
        raise ValueError(f"{ckpt_dir / MODEL_DIR} holds no DCP metadata (an incomplete checkpoint?)") from None
    state = {}
    for name, md in meta.items():
        if not isinstance(md, TensorStorageMetadata):
            raise ValueError(f"{ckpt_dir}: entry {name} is not a tensor")
        state[name] = torch.empty(md.size, dtype=md.properties.dtype)
    with _single_process():
        dcp.load(state, storage_reader=reader, no_dist=True)
    return state, cfg


def load_model(ckpt_dir: PathLike, device: Union[str, torch.device] = "cpu", dtype: Optional[torch.dtype] = None):
    """A single-process Qwen2Model in eval mode with the checkpoint's weights; model(ids) -> logits."""
    from megatron_qwen2.model import Qwen2Model  # the model is not needed to convert checkpoints

    state, cfg = load_native_state(ckpt_dir)
    check_native_state(state, cfg, f"checkpoint {ckpt_dir}")
    dtype = dtype or state["embedding.weight"].dtype
    with torch.device(device):
        model = Qwen2Model(cfg)
    model.load_state_dict(state, strict=True)
    return model.to(dtype=dtype).eval()


@contextlib.contextmanager
def _single_process():
    """DCP warns that it runs without a process group; here that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield
