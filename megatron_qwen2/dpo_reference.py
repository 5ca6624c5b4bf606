"""The DPO reference's weights and, with dpo.precompute_reference, its log-probabilities computed once
before training (docs/architecture.md, "DPO").

The reference is dpo.reference, else train.init_from, else the seeded initialisation the policy
starts from. Precomputed log-probabilities live in RUN_DIR/dpo_reference_logps.pt: for each
preference dataset (by its name, `path (train|valid)`) a [pairs, 2] float64 table of the chosen and
rejected response's log-probability, by pair index, and the description of what they were computed
from (`meta`: the reference, the model, train.dtype and train.fp8, and a digest of each dataset's
pairs). A start whose description equals the file's reads it (a resumed run computes nothing); any
other computes the tables again, with the policy's chunks holding the reference weights for that
pass (their own weights are kept on the CPU meanwhile and put back).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_qwen2.checkpoint import checkpoint_for
from megatron_qwen2.checkpoint.distributed import load_weights
from megatron_qwen2.config import Config
from megatron_qwen2.data.preference import PreferenceDataset
from megatron_qwen2.engine.step import TrainingStep

REFERENCE_LOGPS_FILE = "dpo_reference_logps.pt"


def reference_source(cfg: Config) -> Optional[Path]:
    """The checkpoint the reference's weights come from (checked against model.*), or None for the
    seeded initialisation."""
    if cfg.dpo.reference:
        return checkpoint_for(cfg.dpo.reference, cfg.model, "dpo.reference")
    if cfg.train.init_from:
        return checkpoint_for(cfg.train.init_from, cfg.model, "train.init_from")
    return None


def prepare_reference(cfg: Config, trainer: TrainingStep, parts: list[PreferenceDataset], run_dir: Path,
                      say) -> None:
    """Give the step its reference: load its weights into the frozen reference model, or attach the
    precomputed log-probabilities to every preference dataset (read from the run dir, or computed)."""
    src = reference_source(cfg)
    if trainer.reference is not None:
        if src is not None:
            load_weights(src, trainer.reference.chunks, trainer.topo)
        say(f"DPO reference: {src if src is not None else 'the seeded initialisation'} (frozen, same layout)")
        return
    meta = {"reference": str(src) if src is not None else f"seeded initialisation, train.seed={cfg.train.seed}",
            "model": dataclasses.asdict(cfg.model), "dtype": cfg.train.dtype, "fp8": cfg.train.fp8,
            "datasets": {p.name: p.fingerprint() for p in parts}}
    path = run_dir / REFERENCE_LOGPS_FILE
    stored = _read_on_rank0(path)
    if stored is not None and stored.get("meta") == meta:
        for p in parts:
            p.attach_reference(stored["logps"][p.name].numpy())
        say(f"DPO reference: log-probabilities read from {path}")
        return
    starting = None
    if src is not None:  # the policy's chunks hold the reference for the pass, then their own weights again
        starting = [p.detach().to("cpu", copy=True) for p in trainer.params]
        load_weights(src, trainer.chunks, trainer.topo)
    tables = {p.name: dataset_logps(trainer, p) for p in parts}
    if starting is not None:
        with torch.no_grad():
            for p, weights in zip(trainer.params, starting):
                p.copy_(weights)
    for p in parts:
        p.attach_reference(tables[p.name])
    if trainer.topo.rank == 0:
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        torch.save({"meta": meta, "logps": {name: torch.from_numpy(t) for name, t in tables.items()}}, tmp)
        os.replace(tmp, path)
    say(f"DPO reference: log-probabilities of {sum(len(p.pairs) for p in parts)} pairs computed from "
        f"{src if src is not None else 'the seeded initialisation'} into {path}")


def _read_on_rank0(path: Path) -> Optional[dict]:
    """The precomputed file as rank 0 reads it (None when absent), the same on every rank."""
    box = [None]
    if not dist.is_initialized() or dist.get_rank() == 0:
        if path.is_file():
            box[0] = torch.load(path, weights_only=True)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    return box[0]


def dataset_logps(trainer: TrainingStep, dataset: PreferenceDataset) -> np.ndarray:
    """[pairs, 2]: the log-probabilities of every pair's responses under the weights the trainer's chunks
    hold, from the dataset's rows (its packing plan: each pair once), in global batches of rows in plan
    order (the last one filled up with the first rows)."""
    topo, gbs = trainer.topo, trainer.cfg.train.global_batch_size
    rows, local = dataset.rows, gbs // topo.dp
    slots = max(len(r) for r in rows)
    out = np.zeros((len(dataset.pairs), 2), dtype=np.float64)
    for start in range(0, len(rows), gbs):
        indices = np.arange(start, start + gbs) % len(rows)
        mine = indices[topo.dp_rank * local:(topo.dp_rank + 1) * local]
        logps = trainer.global_response_logps(dataset.make_rows([rows[j] for j in mine]), slots).numpy()
        for j in range(min(gbs, len(rows) - start)):
            for slot, pair in enumerate(rows[indices[j]]):
                out[pair] = logps[j, slot]
    return out
