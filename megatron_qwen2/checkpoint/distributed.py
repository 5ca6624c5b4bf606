"""Sharded training checkpoints through torch.distributed.checkpoint (DCP), in the canonical layout.

Every rank writes the pieces of master weights and Adam moments it owns, each as a chunk of
the global tensor (global name, global shape, offsets; checkpoint/sharding.py says where each
piece sits), so a checkpoint saved under one layout (tp, pp, vpp, dp, cp, ep, distributed
optimizer on or off) loads under any other: each rank asks DCP for the boxes it needs and DCP
reads them from whichever chunks overlap. No DTensor or DeviceMesh is involved, so the same
code runs over gloo on CPUs and NCCL on GPUs.

A run's `checkpoints/step_NNNNNN/` holds:

    model_config.json   the ModelConfig (so `load_model` and `native-to-hf` read it like any native checkpoint)
    model/              DCP: fp32 master weights under global names and shapes
    optim/              DCP: `exp_avg/<name>`, `exp_avg_sq/<name>` (fp32, global shapes)
    rng/rank_NNNNN.pt   each rank's torch CPU (and CUDA) RNG state
    train_state.json    step, consumed samples, Adam step count, the layout it was saved under
    config.json         the resolved run config
    manifest.json       every file and its size; written last, checked before a load

It is written under `.step_NNNNNN.tmp`, renamed into place when complete, and only then does
`latest` move to it. A directory without a valid manifest, or whose files disagree with it,
is refused (`CheckpointError`) and the resume falls back to the previous checkpoint.
`CheckpointSaver` can also write in a background thread (train.async_save).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import threading
import time
import warnings
from pathlib import Path
from typing import Optional, Union

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, MetadataIndex, TensorProperties,
                                                   TensorStorageMetadata)
from torch.distributed.checkpoint.planner import LoadPlan, SavePlan, TensorWriteData, WriteItem, WriteItemType
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from megatron_qwen2.checkpoint.native import CONFIG_FILE, LATEST_FILE, MODEL_DIR
from megatron_qwen2.checkpoint.sharding import flat_pieces, param_shard_spec

OPTIM_DIR = "optim"
RNG_DIR = "rng"
TRAIN_STATE_FILE = "train_state.json"
RUN_CONFIG_FILE = "config.json"
MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step_(\d+)$")

PathLike = Union[str, Path]


class CheckpointError(ValueError):
    """A checkpoint directory that is incomplete, corrupt or does not fit the model."""


# ---------------------------------------------------------------------------------------------
# DCP planners over explicit pieces


class _PieceSavePlanner(DefaultSavePlanner):
    """Writes the given chunks of global tensors: {(name, offsets): (global shape, tensor)}."""

    def __init__(self, items: dict[tuple[str, tuple[int, ...]], tuple[tuple[int, ...], torch.Tensor]]):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._items = items

    def create_local_plan(self) -> SavePlan:
        writes = []
        for (name, offsets), (gshape, t) in self._items.items():
            chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=t.shape)
            data = TensorWriteData(chunk=chunk, properties=TensorProperties.create_from_tensor(t),
                                   size=torch.Size(gshape))
            writes.append(WriteItem(index=MetadataIndex(name, torch.Size(offsets)), type=WriteItemType.SHARD,
                                    tensor_data=data))
        self.plan = SavePlan(writes)
        return self.plan

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor:
        _, t = self._items[(write_item.index.fqn, tuple(write_item.index.offset))]
        t = t.detach()
        compact = t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size()
        if t.device.type == "cpu" and compact:
            return t  # already a compact CPU tensor (an asynchronous save's snapshot)
        out = torch.empty(t.shape, dtype=t.dtype)  # a view would drag its whole storage into the file
        out.copy_(t)
        return out


class _PieceLoadPlanner(DefaultLoadPlanner):
    """Reads boxes of global tensors into given destinations: {name: (global shape, [(offsets, dest)])}."""

    def __init__(self, wanted: dict[str, tuple[tuple[int, ...], list[tuple[tuple[int, ...], torch.Tensor]]]],
                 where: str):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._wanted, self._where = wanted, where

    def create_local_plan(self) -> LoadPlan:
        stored = self.metadata.state_dict_metadata
        reads = []
        for name, (gshape, boxes) in self._wanted.items():
            md = stored.get(name)
            if not isinstance(md, TensorStorageMetadata):
                raise CheckpointError(f"{self._where}: tensor {name!r} is missing")
            if tuple(md.size) != tuple(gshape):
                raise CheckpointError(f"{self._where}: tensor {name!r} has shape {tuple(md.size)}, "
                                      f"the model needs {tuple(gshape)}")
            chunks = [ChunkStorageMetadata(offsets=torch.Size(off), sizes=dest.shape) for off, dest in boxes]
            items = create_read_items_for_chunk_list(name, md, chunks)
            covered = [0] * len(boxes)
            for it in items:
                covered[it.dest_index.index] += int(torch.Size(it.lengths).numel())
            for (off, dest), n in zip(boxes, covered):
                if n != dest.numel():
                    raise CheckpointError(f"{self._where}: tensor {name!r} lacks data for the box at {off} "
                                          f"of size {tuple(dest.shape)}")
            reads.extend(items)
        self.plan = LoadPlan(reads)
        return self.plan

    def resolve_tensor(self, read_item) -> torch.Tensor:
        dest = self._wanted[read_item.dest_index.fqn][1][read_item.dest_index.index][1]
        for d, (off, n) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            dest = dest.narrow(d, off, n)
        return dest

    def commit_tensor(self, read_item, tensor: torch.Tensor) -> None:
        pass  # resolve_tensor handed out a view of the destination: the data is already in place


SAVE_THREADS = 4  # files written in parallel per rank


def _dcp_save(items, path: Path, group=None) -> None:
    planner = _PieceSavePlanner(items)
    writer = dcp.FileSystemWriter(str(path), thread_count=SAVE_THREADS)
    if dist.is_initialized():
        dcp.save({}, storage_writer=writer, planner=planner, process_group=group)
    else:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.save({}, storage_writer=writer, planner=planner, no_dist=True)


def _dcp_load(wanted, path: Path) -> None:
    planner = _PieceLoadPlanner(wanted, str(path))
    reader = dcp.FileSystemReader(str(path))
    if dist.is_initialized():
        dcp.load({}, storage_reader=reader, planner=planner)
    else:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load({}, storage_reader=reader, planner=planner, no_dist=True)


# ---------------------------------------------------------------------------------------------
# What this rank holds


def parameter_names(chunks: list[torch.nn.Module]) -> dict[int, str]:
    """id(parameter) -> its global name (layers are keyed by global index, so names match in every layout)."""
    return {id(p): name for chunk in chunks for name, p in chunk.named_parameters()}


def _dp_writes(p: torch.Tensor, buffer, sharded: bool) -> bool:
    """Replicas of a parameter (over the group its gradient bucket reduces over: dp, or dp x cp with
    context parallelism; expert_dp(x cp) for experts): one writes, unless the distributed optimizer gave
    each rank of that group other fragments."""
    if sharded:
        return True
    group = buffer.bucket_of[p].group
    return group is None or dist.get_rank(group) == 0


def _fragment_pieces(optimizer, names: dict[int, str], topo):
    """For each optimizer fragment: (its global name, global shape, its pieces)."""
    out = []
    for f in optimizer.fragments:
        spec = param_shard_spec(f.param, topo)
        out.append((names[id(f.param)], spec.global_shape, flat_pieces(spec, tuple(f.param.shape), f.start, f.end)))
    return out


# ---------------------------------------------------------------------------------------------
# Save


def save_training_checkpoint(ckpt_root: PathLike, step: int, chunks, optimizer, topo, model_cfg,
                             train_state: dict, run_config: dict, keep_last: int = 0) -> Path:
    """Write ckpt_root/step_NNNNNN (every rank takes part), move `latest` to it, drop old ones.

    train_state: JSON-able loop state (consumed samples, ...); step and layout are added here.
    keep_last > 0 keeps only that many newest step directories.
    """
    job = _prepare_save(ckpt_root, step, chunks, optimizer, topo, model_cfg, train_state, run_config, keep_last,
                        snapshot=False)
    return job.run()


class CheckpointSaver:
    """Saves training checkpoints, blocking or (async_save) in a background thread.

    Asynchronous saves copy this rank's pieces to CPU memory at the step boundary (the only stall),
    then write, fsync, rename and move `latest` in a thread that coordinates the ranks over a
    process group of its own (gloo), so its collectives never interleave with training's. A save
    waits for the previous one; `wait()` before exiting.
    """

    def __init__(self, async_save: bool = False):
        self.async_save = async_save
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None
        self._group = None
        if async_save and dist.is_initialized() and dist.get_world_size() > 1:
            self._group = dist.new_group(backend="gloo")  # collective: every rank constructs a saver

    def save(self, ckpt_root: PathLike, step: int, chunks, optimizer, topo, model_cfg, train_state: dict,
             run_config: dict, keep_last: int = 0, blocking: bool = False, on_done=None) -> None:
        """Save step `step`; on_done(path, seconds) is called once it is complete (from the thread if async)."""
        self.wait()
        began = time.perf_counter()
        background = self.async_save and not blocking
        job = _prepare_save(ckpt_root, step, chunks, optimizer, topo, model_cfg, train_state, run_config, keep_last,
                            snapshot=background, group=self._group if background else None)
        if not background:
            path = job.run()
            if on_done is not None:
                on_done(path, time.perf_counter() - began)
            return

        def work():
            try:
                path = job.run()
                if on_done is not None:
                    on_done(path, time.perf_counter() - began)
            except BaseException as e:  # reported by the next wait()
                self._error = e

        self._thread = threading.Thread(target=work, name=f"checkpoint-step-{step}", daemon=False)
        self._thread.start()

    def wait(self) -> None:
        """Block until the pending save (if any) is complete; re-raise its error."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise err


@dataclasses.dataclass
class _SaveJob:
    tmp: Path
    final: Path
    rank: int
    model_items: dict
    optim_items: dict
    rng: dict
    meta: Optional[dict]  # rank 0: the JSON files to write
    keep_last: int
    group: Optional[object]

    def run(self) -> Path:
        _dcp_save(self.model_items, self.tmp / MODEL_DIR, self.group)
        _dcp_save(self.optim_items, self.tmp / OPTIM_DIR, self.group)
        torch.save(self.rng, self.tmp / RNG_DIR / f"rank_{self.rank:05d}.pt")
        _barrier(self.group)
        if self.rank == 0:
            for name, content in self.meta.items():
                (self.tmp / name).write_text(json.dumps(content, indent=1, default=str) + "\n")
            _write_manifest(self.tmp)
            ckpt_root = self.final.parent
            if self.final.exists():  # the same step saved again (a rerun): replace it
                shutil.rmtree(self.final)
            os.replace(self.tmp, self.final)
            _fsync_dir(ckpt_root)
            latest_tmp = ckpt_root / f".{LATEST_FILE}.tmp"
            latest_tmp.write_text(self.final.name + "\n")
            os.replace(latest_tmp, ckpt_root / LATEST_FILE)
            _fsync_dir(ckpt_root)
            if self.keep_last > 0:
                rotate_checkpoints(ckpt_root, self.keep_last)
        _barrier(self.group)
        return self.final


def _prepare_save(ckpt_root, step, chunks, optimizer, topo, model_cfg, train_state, run_config, keep_last,
                  snapshot: bool, group=None) -> _SaveJob:
    """Everything a save needs from the live training state (copied to CPU when `snapshot`)."""
    ckpt_root = Path(ckpt_root)
    name = f"step_{step:06d}"
    tmp = ckpt_root / f".{name}.tmp"
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a save interrupted before its rename
        (tmp / RNG_DIR).mkdir(parents=True)
    _barrier()

    names = parameter_names(chunks)
    sharded = bool(optimizer.buffer.shard)  # each rank (of its bucket's group) holds other fragments
    state = optimizer.state_dict()
    def keep(t: torch.Tensor) -> torch.Tensor:
        if not snapshot:
            return t
        out = torch.empty(t.shape, dtype=t.dtype)
        return out.copy_(t)
    model_items, optim_items = {}, {}
    for (pname, gshape, pieces), f, st in zip(_fragment_pieces(optimizer, names, topo), optimizer.fragments,
                                              state["fragments"]):
        if not _dp_writes(f.param, optimizer.buffer, sharded):
            continue
        for pc in pieces:
            if not pc.writer:
                continue
            model_items[(pname, pc.global_offsets)] = (gshape, keep(pc.view(st["master"], f.start)))
            for key in ("exp_avg", "exp_avg_sq"):
                optim_items[(f"{key}/{pname}", pc.global_offsets)] = (gshape, keep(pc.view(st[key], f.start)))
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state()
    meta = None
    if rank == 0:
        layout = {"world_size": topo.world_size, "tp": topo.tp, "pp": topo.pp, "vpp": topo.vpp, "dp": topo.dp,
                  "cp": topo.cp, "ep": topo.ep, "distributed_optimizer": sharded}
        meta = {CONFIG_FILE: dataclasses.asdict(model_cfg), RUN_CONFIG_FILE: run_config,
                TRAIN_STATE_FILE: dict(train_state, step=step, optimizer_step=state["step"], layout=layout,
                                       format=FORMAT_VERSION, torch=torch.__version__)}
    return _SaveJob(tmp, ckpt_root / name, rank, model_items, optim_items, rng, meta, keep_last, group)


def rotate_checkpoints(ckpt_root: PathLike, keep_last: int) -> list[Path]:
    """Remove all but the newest `keep_last` step directories (never the one `latest` names)."""
    ckpt_root = Path(ckpt_root)
    latest = _read_latest(ckpt_root)
    steps = sorted(_step_dirs(ckpt_root), key=lambda p: _step_of(p), reverse=True)
    removed = []
    for old in steps[keep_last:]:
        if old.name != latest:
            shutil.rmtree(old, ignore_errors=True)
            removed.append(old)
    return removed


def _write_manifest(ckpt_dir: Path) -> None:
    files = {str(p.relative_to(ckpt_dir)): p.stat().st_size
             for p in sorted(ckpt_dir.rglob("*")) if p.is_file() and p.name != MANIFEST_FILE}
    for p in ckpt_dir.rglob("*"):
        if p.is_file():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
    path = ckpt_dir / MANIFEST_FILE
    path.write_text(json.dumps({"format": FORMAT_VERSION, "files": files}, indent=1) + "\n")
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _barrier(group=None) -> None:
    if dist.is_initialized():
        dist.barrier(group=group)


# ---------------------------------------------------------------------------------------------
# Find and check


def _step_dirs(ckpt_root: Path) -> list[Path]:
    if not ckpt_root.is_dir():
        return []
    return [p for p in ckpt_root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]


def _step_of(path: Path) -> int:
    return int(_STEP_DIR.match(path.name).group(1))


def _read_latest(ckpt_root: Path) -> Optional[str]:
    try:
        return (ckpt_root / LATEST_FILE).read_text().strip() or None
    except OSError:
        return None


def verify_checkpoint(ckpt_dir: PathLike, weights_only: bool = False) -> dict:
    """Check a training checkpoint against its manifest; returns its train_state (CheckpointError if not)."""
    ckpt_dir = Path(ckpt_dir)
    try:
        manifest = json.loads((ckpt_dir / MANIFEST_FILE).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {ckpt_dir} is incomplete: it has no {MANIFEST_FILE}") from None
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {ckpt_dir}: {MANIFEST_FILE} is corrupt ({e})") from None
    for rel, size in files.items():
        path = ckpt_dir / rel
        if not path.is_file():
            raise CheckpointError(f"checkpoint {ckpt_dir} is incomplete: {rel} is missing")
        if path.stat().st_size != size:
            raise CheckpointError(f"checkpoint {ckpt_dir} is corrupt: {rel} has {path.stat().st_size} bytes, "
                                  f"the manifest says {size}")
    dirs = (MODEL_DIR,) if weights_only else (MODEL_DIR, OPTIM_DIR)
    for sub in dirs:
        try:
            dcp.FileSystemReader(str(ckpt_dir / sub)).read_metadata()
        except Exception as e:  # DCP raises whatever unpickling a damaged file raises
            raise CheckpointError(f"checkpoint {ckpt_dir}: {sub}/ has unreadable DCP metadata ({e})") from None
    try:
        return json.loads((ckpt_dir / TRAIN_STATE_FILE).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {ckpt_dir}: {TRAIN_STATE_FILE} is unreadable ({e})") from None


def find_resume_checkpoint(ckpt_root: PathLike, log=print) -> Optional[Path]:
    """The newest usable checkpoint under ckpt_root: `latest` first, then older steps; None if none.

    Each unusable one is reported through `log` with the reason, and skipped.
    """
    ckpt_root = Path(ckpt_root)
    candidates = sorted(_step_dirs(ckpt_root), key=_step_of, reverse=True)
    latest = _read_latest(ckpt_root)
    if latest is not None:
        named = ckpt_root / latest
        candidates = [named] + [c for c in candidates if c != named]
    for cand in candidates:
        try:
            verify_checkpoint(cand)
            return cand
        except CheckpointError as e:
            log(f"warning: refusing {e}; trying the previous checkpoint")
    return None


# ---------------------------------------------------------------------------------------------
# Load


def load_training_checkpoint(ckpt_dir: PathLike, chunks, optimizer, topo, weights_only: bool = False) -> dict:
    """Load masters (and, unless weights_only, Adam moments and RNG) into this rank's fragments.

    Works for any checkpoint in the canonical layout: a training checkpoint of any layout, or
    (weights_only) a native checkpoint converted from Hugging Face. Returns its train_state
    ({} for a native checkpoint without one). Every rank must call it.
    """
    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / MODEL_DIR).is_dir():
        raise CheckpointError(f"{ckpt_dir} is not a checkpoint (it needs {MODEL_DIR}/)")
    # A native checkpoint converted from Hugging Face has no manifest and no training state.
    has_manifest = (ckpt_dir / MANIFEST_FILE).exists()
    train_state = verify_checkpoint(ckpt_dir, weights_only) if has_manifest or not weights_only else {}
    names = parameter_names(chunks)
    fresh = [{k: torch.zeros_like(f.master) for k in ("master", "exp_avg", "exp_avg_sq")} for f in optimizer.fragments]
    model_wanted: dict = {}
    optim_wanted: dict = {}
    for (pname, gshape, pieces), f, dest in zip(_fragment_pieces(optimizer, names, topo), optimizer.fragments, fresh):
        for pc in pieces:
            model_wanted.setdefault(pname, (gshape, []))[1].append(
                (pc.global_offsets, pc.view(dest["master"], f.start)))
            if not weights_only:
                for key in ("exp_avg", "exp_avg_sq"):
                    optim_wanted.setdefault(f"{key}/{pname}", (gshape, []))[1].append(
                        (pc.global_offsets, pc.view(dest[key], f.start)))
    _dcp_load(model_wanted, ckpt_dir / MODEL_DIR)
    if weights_only:
        optimizer.load_state_dict({"step": 0, "fragments": [{"master": d["master"]} for d in fresh]})
        return train_state
    _dcp_load(optim_wanted, ckpt_dir / OPTIM_DIR)
    optimizer.load_state_dict({"step": train_state.get("optimizer_step", 0), "fragments": fresh})
    _restore_rng(ckpt_dir, train_state, topo)
    return train_state


def _restore_rng(ckpt_dir: Path, train_state: dict, topo) -> None:
    """Per-rank RNG states, when the world size is the one they were saved under."""
    if train_state.get("layout", {}).get("world_size") != topo.world_size:
        return
    rank = dist.get_rank() if dist.is_initialized() else 0
    path = ckpt_dir / RNG_DIR / f"rank_{rank:05d}.pt"
    if not path.is_file():
        return
    rng = torch.load(path, weights_only=True)
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
