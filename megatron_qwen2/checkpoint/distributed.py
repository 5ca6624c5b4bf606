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
    manifest.json       every file with its size and xxh3 checksum (checkpoint/native.py); written last

Saving. Before anything is written, one all-reduce of one flag checks that no master weight or
Adam moment of any rank is inf or nan (else NonFiniteError). Each rank writes its files under
`.step_NNNNNN.tmp`, hashing the bytes as they go out, and sends the records (size, checksum)
or its failure to rank 0 (one gather). Rank 0 writes the JSON files, checks every file's size on
disk against its writer's record, writes the manifest, renames the directory into place and only
then moves `latest`; it broadcasts the outcome, so every rank returns or raises together. Any
OSError on any rank (a full or read-only disk, an I/O error) removes the temporary directory,
leaves the previous checkpoints and `latest` as they were and raises RunDirError on every rank.

"Verified when written" (what `rotate_checkpoints` counts): the directory has a manifest, which
rank 0 writes only once every rank's records arrived and every size on disk matched, and the
files it lists are still there with those sizes.

Loading. The files of the manifest are spread over the ranks, each rank checks its share (size
and checksum) and one all-gather tells every rank the first problem, so all refuse or accept the
same checkpoint (`verify_checkpoint`). `CheckpointSaver` can also write in a background thread
(train.async_save).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import shutil
import threading
import time
import warnings
from pathlib import Path
from typing import Callable, Optional, Union

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, MetadataIndex, TensorProperties,
                                                   TensorStorageMetadata)
from torch.distributed.checkpoint.planner import LoadPlan, SavePlan, TensorWriteData, WriteItem, WriteItemType
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from megatron_qwen2.checkpoint.native import (CONFIG_FILE, LATEST_FILE, MANIFEST_FILE, MODEL_DIR, CheckpointError,
                                              FileRecord, check_files, dcp_failures, describe_os_error, find_os_error,
                                              fsync_dir, hashing_writer, json_bytes, present_with_sizes, read_manifest,
                                              weight_files, write_file, write_manifest, written_records)
from megatron_qwen2.checkpoint.sharding import flat_pieces, param_shard_spec
from megatron_qwen2.errors import NonFiniteError, RunDirError

OPTIM_DIR = "optim"
RNG_DIR = "rng"
TRAIN_STATE_FILE = "train_state.json"
RUN_CONFIG_FILE = "config.json"
FORMAT_VERSION = 2  # train_state.json's "format"; 2: the manifest holds checksums
CORRUPT_SUFFIX = ".corrupt"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_PARTIAL_SAVE = re.compile(r"^\.(step_\d+)\.(tmp|old)$")

PathLike = Union[str, Path]

__all__ = ["CheckpointError", "MANIFEST_FILE", "CheckpointSaver", "load_training_checkpoint",
           "verify_checkpoint", "find_resume_checkpoint", "rotate_checkpoints", "remove_partial_saves",
           "set_aside", "point_latest", "read_latest"]


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


# ---------------------------------------------------------------------------------------------
# Collectives (no-ops in a single process)


def _rank_world(group=None) -> tuple[int, int]:
    if not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _gather(obj, group=None) -> Optional[list]:
    """Every rank's obj, by rank, on rank 0 (None elsewhere)."""
    rank, world = _rank_world(group)
    if world == 1:
        return [obj]
    out = [None] * world if rank == 0 else None
    dist.gather_object(obj, out, dst=0, group=group)
    return out


def _all_gather(obj, group=None) -> list:
    _, world = _rank_world(group)
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj, group=group)
    return out


def _broadcast(obj, group=None):
    """Rank 0's obj on every rank."""
    if _rank_world(group)[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def _collective_device() -> torch.device:
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# DCP reads and writes


SAVE_THREADS = 4  # files written in parallel per rank


def _dcp_save(items, ckpt_dir: Path, sub: str, group=None) -> tuple[dict[str, FileRecord], list[OSError]]:
    """Write `items` to ckpt_dir/sub (every rank of group takes part); this rank's file records
    (relative to ckpt_dir) and the write errors it met, which it does not raise."""
    planner = _PieceSavePlanner(items)
    writer = hashing_writer(ckpt_dir / sub, thread_count=SAVE_THREADS)
    if dist.is_initialized():
        dcp.save({}, storage_writer=writer, planner=planner, process_group=group)
    else:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.save({}, storage_writer=writer, planner=planner, no_dist=True)
    return written_records(writer, ckpt_dir), list(writer.fs.errors)


def _dcp_load(wanted, path: Path) -> None:
    planner = _PieceLoadPlanner(wanted, str(path))
    reader = dcp.FileSystemReader(str(path))
    try:
        if dist.is_initialized():
            dcp.load({}, storage_reader=reader, planner=planner)
        else:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp.load({}, storage_reader=reader, planner=planner, no_dist=True)
    except CheckpointException as e:  # raised on every rank: DCP gathers each rank's failure
        failures = dcp_failures(e)
        known = next((f for f in failures if isinstance(f, CheckpointError)), None)
        if known is not None:
            raise CheckpointError(str(known)) from None
        cause = find_os_error(e)
        detail = describe_os_error(cause) if cause else (f"{type(failures[0]).__name__}: {failures[0]}"
                                                         if failures else str(e))
        raise CheckpointError(f"{path} cannot be read ({detail})") from None


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


class CheckpointSaver:
    """Saves training checkpoints, blocking or (async_save) in a background thread.

    Asynchronous saves copy this rank's pieces to CPU memory at the step boundary (the only stall),
    then write, fsync, rename and move `latest` in a thread that coordinates the ranks over a
    process group of its own (gloo), so its collectives never interleave with training's. A save
    waits for the previous one; `wait()` before exiting. An error of the thread (RunDirError:
    the disk is full, ...) is raised by the next `save()` or `wait()`, on every rank.
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
        """Write ckpt_root/step_NNNNNN (every rank takes part) and move `latest` to it.

        train_state: JSON-able loop state (consumed samples, ...); step and layout are added here.
        keep_last > 0 keeps only that many newest verified checkpoints (rotate_checkpoints).
        on_done(path, seconds) is called once the save is complete (from the thread if async).
        Raises NonFiniteError (nothing written) or RunDirError (nothing changed) on every rank.
        """
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
class _RankReport:
    """What one rank sends rank 0 after writing: its files, or why it could not write them."""

    files: dict[str, FileRecord]
    failure: Optional[str] = None  # one line
    io: bool = True  # the failure is an OSError (else a bug: raised as RuntimeError)


@dataclasses.dataclass
class _SaveJob:
    tmp: Path
    final: Path
    step: int
    rank: int
    model_items: dict
    optim_items: dict
    rng: dict
    meta: Optional[dict]  # rank 0: the JSON files to write
    keep_last: int
    group: Optional[object]

    def run(self) -> Path:
        files: dict[str, FileRecord] = {}
        errors: list[BaseException] = []
        for items, sub in ((self.model_items, MODEL_DIR), (self.optim_items, OPTIM_DIR)):
            try:  # every rank calls both DCP saves, whatever failed before: they are collectives
                written, failed = _dcp_save(items, self.tmp, sub, self.group)
                files.update(written)
                errors.extend(failed)
            except (Exception, CheckpointException) as e:  # DCP raises what failed on any rank on every rank
                errors.append(e)
        if not errors:
            rel = f"{RNG_DIR}/rank_{self.rank:05d}.pt"
            try:
                buf = io.BytesIO()
                torch.save(self.rng, buf)
                files[rel] = write_file(self.tmp / rel, buf.getvalue())
            except OSError as e:
                errors.append(e)
        report = _RankReport(files)
        if errors:
            cause = find_os_error(errors[0])
            report = _RankReport({}, describe_os_error(cause) if cause is not None
                                 else f"{type(errors[0]).__name__}: {errors[0]}", io=cause is not None)
        reports = _gather(report, self.group)
        outcome = None
        if self.rank == 0:
            try:
                outcome = self._finish(reports)
            except Exception as e:  # a bug: still answer the other ranks, which wait for the outcome
                shutil.rmtree(self.tmp, ignore_errors=True)
                outcome = (f"cannot write checkpoint {self.final}: {type(e).__name__}: {e}", False)
        outcome = _broadcast(outcome, self.group)
        if outcome is not None:
            text, is_io = outcome
            err = RunDirError(text) if is_io else RuntimeError(text)
            err.step = self.step  # outcome.json's step
            raise err from (errors[0] if errors else None)
        return self.final

    def _finish(self, reports: list[_RankReport]) -> Optional[tuple[str, bool]]:
        """Rank 0: complete and publish the checkpoint, or remove it; (one line, is an OSError) on failure."""
        failed = [(r, rep) for r, rep in enumerate(reports) if rep.failure is not None]
        problem = None
        if failed:
            rank, rep = failed[0]
            problem = (rep.failure + (f" (rank {rank})" if len(reports) > 1 else ""), rep.io)
        else:
            files = {rel: rec for rep in reports for rel, rec in rep.files.items()}
            try:
                for name, content in self.meta.items():
                    files[name] = write_file(self.tmp / name, json_bytes(content))
                write_manifest(self.tmp, files)
                _publish(self.tmp, self.final)
            except OSError as e:
                problem = (describe_os_error(e), True)
            except CheckpointError as e:  # a size on disk that is not the one written
                problem = (str(e), True)
        if problem is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            text, is_io = problem
            return (f"cannot write checkpoint {self.final}: {text}; the partial {self.tmp.name} was removed and "
                    f"the previous checkpoints and {LATEST_FILE} are unchanged (free space in {self.final.parent} "
                    f"or make it writable, then resume)", is_io)
        if self.keep_last > 0:
            rotate_checkpoints(self.final.parent, self.keep_last)
        return None


def _publish(tmp: Path, final: Path) -> None:
    """Rename tmp to final (replacing a same-named checkpoint), then move `latest` to it. On failure
    what was there is back in place and tmp holds the new checkpoint again."""
    root = final.parent
    old = root / f".{final.name}.old"
    if final.exists():  # the same step saved again (a rerun): replaced only once the new one is complete
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    try:
        os.replace(tmp, final)
        try:
            fsync_dir(root)
            point_latest(root, final.name)
        except BaseException:
            os.replace(final, tmp)
            raise
    except BaseException:
        if old.exists():
            os.replace(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)


def point_latest(ckpt_root: Path, name: str) -> None:
    """Make ckpt_root/latest name `name` (atomically; fsynced)."""
    tmp = ckpt_root / f".{LATEST_FILE}.tmp"
    try:
        write_file(tmp, (name + "\n").encode())
        os.replace(tmp, ckpt_root / LATEST_FILE)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(ckpt_root)


def _check_finite(state: dict, step: int, group=None) -> None:
    """NonFiniteError on every rank when a master weight or Adam moment of any rank is inf or nan
    (per tensor one min/max reduction on its device, which nan, inf and -inf reach, then one
    all-reduce of one flag)."""
    tensors = [st[k] for st in state["fragments"] for k in ("master", "exp_avg", "exp_avg_sq") if st[k].numel()]
    if tensors:
        extremes = torch.stack([torch.stack(torch.aminmax(t.detach())) for t in tensors])
        finite = torch.isfinite(extremes).all().to(torch.float32)
    else:
        finite = torch.ones((), device=_collective_device())
    if _rank_world(group)[1] > 1:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN, group=group)
    if finite.item() != 1.0:
        err = NonFiniteError(f"step {step}: a master weight or Adam moment is inf or nan, so checkpoint "
                             f"step_{step:06d} was not written; the last checkpoint is the one to resume from")
        err.step = step  # outcome.json's step
        raise err


def _prepare_save(ckpt_root, step, chunks, optimizer, topo, model_cfg, train_state, run_config, keep_last,
                  snapshot: bool, group=None) -> _SaveJob:
    """Everything a save needs from the live training state (copied to CPU when `snapshot`)."""
    ckpt_root = Path(ckpt_root)
    name = f"step_{step:06d}"
    tmp = ckpt_root / f".{name}.tmp"
    rank = dist.get_rank() if dist.is_initialized() else 0
    state = optimizer.state_dict()
    _check_finite(state, step)
    failure = None
    if rank == 0:
        try:
            shutil.rmtree(tmp, ignore_errors=True)  # a save interrupted before its rename
            (tmp / RNG_DIR).mkdir(parents=True)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            failure = (f"cannot write checkpoint {ckpt_root / name}: {describe_os_error(e)}; the previous "
                       f"checkpoints and {LATEST_FILE} are unchanged (free space in {ckpt_root} or make it writable)")
    failure = _broadcast(failure)
    if failure is not None:
        err = RunDirError(failure)
        err.step = step
        raise err

    names = parameter_names(chunks)
    sharded = bool(optimizer.buffer.shard)  # each rank (of its bucket's group) holds other fragments
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
                  "cp": topo.cp, "ep": topo.ep, "etp": topo.etp, "distributed_optimizer": sharded}
        meta = {CONFIG_FILE: dataclasses.asdict(model_cfg), RUN_CONFIG_FILE: run_config,
                TRAIN_STATE_FILE: dict(train_state, step=step, optimizer_step=state["step"], layout=layout,
                                       format=FORMAT_VERSION, torch=torch.__version__)}
    return _SaveJob(tmp, ckpt_root / name, step, rank, model_items, optim_items, rng, meta, keep_last, group)


def rotate_checkpoints(ckpt_root: PathLike, keep_last: int) -> list[Path]:
    """Remove the step directories older than the `keep_last` newest verified ones (see the module
    docstring); never the one `latest` names. Newer unverified ones and `step_N.corrupt` stay."""
    ckpt_root = Path(ckpt_root)
    latest = read_latest(ckpt_root)
    steps = sorted(_step_dirs(ckpt_root), key=_step_of, reverse=True)
    verified = [p for p in steps if _verified_when_written(p)]
    if keep_last <= 0 or len(verified) <= keep_last:
        return []
    oldest_kept = _step_of(verified[keep_last - 1])
    removed = []
    for old in steps:
        if _step_of(old) < oldest_kept and old.name != latest:
            shutil.rmtree(old, ignore_errors=True)
            removed.append(old)
    return removed


def _verified_when_written(ckpt_dir: Path) -> bool:
    try:
        return present_with_sizes(ckpt_dir, read_manifest(ckpt_dir))
    except CheckpointError:
        return False


# ---------------------------------------------------------------------------------------------
# Find and check


def _step_dirs(ckpt_root: Path) -> list[Path]:
    if not ckpt_root.is_dir():
        return []
    return [p for p in ckpt_root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]


def _step_of(path: Path) -> int:
    return int(_STEP_DIR.match(path.name).group(1))


def read_latest(ckpt_root: Path) -> Optional[str]:
    """The name `latest` holds, or None."""
    try:
        return (Path(ckpt_root) / LATEST_FILE).read_text().strip() or None
    except OSError:
        return None


def remove_partial_saves(ckpt_root: PathLike) -> list[Path]:
    """Remove what an interrupted save left (`.step_N.tmp`, `.latest.tmp`; call on rank 0 before
    resuming). A `.step_N.old` (a same-step checkpoint being replaced) goes back to step_N when
    that is missing, else is removed. Returns the paths removed; never raises."""
    ckpt_root = Path(ckpt_root)
    if not ckpt_root.is_dir():
        return []
    removed = []
    for p in sorted(ckpt_root.iterdir()):
        m = _PARTIAL_SAVE.match(p.name)
        try:
            if m and m.group(2) == "old" and not (ckpt_root / m.group(1)).exists():
                os.replace(p, ckpt_root / m.group(1))
            elif m or p.name == f".{LATEST_FILE}.tmp":
                if p.is_dir():
                    shutil.rmtree(p)
                else:
                    p.unlink()
                removed.append(p)
        except OSError:  # left for the next start (a read-only disk fails the next save anyway)
            pass
    return removed


def set_aside(ckpt_dir: PathLike) -> Path:
    """Rename a refused checkpoint to step_N.corrupt (step_N.corrupt.2, ... if taken); the new path.
    Neither resuming nor rotation looks at it again."""
    ckpt_dir = Path(ckpt_dir)
    target = ckpt_dir.with_name(ckpt_dir.name + CORRUPT_SUFFIX)
    n = 2
    while target.exists():
        target = ckpt_dir.with_name(f"{ckpt_dir.name}{CORRUPT_SUFFIX}.{n}")
        n += 1
    os.replace(ckpt_dir, target)
    fsync_dir(ckpt_dir.parent)
    return target


def _checked_on_load(rel: str, weights_only: bool) -> bool:
    """The files a load checks against their checksums: all but model_config.json (a person may edit
    it; ModelConfig.validate and the tensor shapes check it), or with weights_only model/ and
    train_state.json."""
    if weights_only:
        return weight_files(rel) or rel == TRAIN_STATE_FILE
    return rel != CONFIG_FILE


def _share(files: dict[str, FileRecord], rank: int, world: int) -> dict[str, FileRecord]:
    """This rank's part of `files`: largest first, each to the rank with the fewest bytes so far."""
    load = [0] * world
    mine = {}
    for rel in sorted(files, key=lambda r: (-files[r].size, r)):
        r = min(range(world), key=lambda i: (load[i], i))
        load[r] += files[rel].size
        if r == rank:
            mine[rel] = files[rel]
    return mine


def verify_checkpoint(ckpt_dir: PathLike, weights_only: bool = False) -> dict:
    """Check a training checkpoint against its manifest; returns its train_state (CheckpointError if not).

    Under torch.distributed every rank must call it: the files are spread over the ranks, each
    checks its share, and all raise the same error (the first by rank) or none.
    """
    ckpt_dir = Path(ckpt_dir)
    rank, world = _rank_world()
    problem, train_state = None, {}
    try:
        files = read_manifest(ckpt_dir)
        checked = {rel: rec for rel, rec in files.items() if _checked_on_load(rel, weights_only)}
        problem = check_files(ckpt_dir, _share(checked, rank, world))
        if problem is None:
            train_state = _readable_state(ckpt_dir, files, weights_only)
    except CheckpointError as e:
        problem = str(e)
    problem = next((p for p in _all_gather(problem) if p is not None), None)
    if problem is not None:
        raise CheckpointError(problem)
    return train_state


def _readable_state(ckpt_dir: Path, files: dict, weights_only: bool) -> dict:
    """Its DCP metadata unpickles and its train_state.json parses; the train state ({} for a native
    checkpoint loaded for its weights)."""
    for sub in (MODEL_DIR,) if weights_only else (MODEL_DIR, OPTIM_DIR):
        try:
            dcp.FileSystemReader(str(ckpt_dir / sub)).read_metadata()
        except Exception as e:  # DCP raises whatever unpickling a damaged file raises
            raise CheckpointError(f"checkpoint {ckpt_dir}: {sub}/ has unreadable DCP metadata ({e})") from None
    if weights_only and TRAIN_STATE_FILE not in files:
        return {}
    return _read_train_state(ckpt_dir)


def _read_train_state(ckpt_dir: Path) -> dict:
    try:
        return json.loads((ckpt_dir / TRAIN_STATE_FILE).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {ckpt_dir}: {TRAIN_STATE_FILE} is unreadable ({e})") from None


def find_resume_checkpoint(ckpt_root: PathLike, log=print,
                           on_refused: Optional[Callable[[Path, CheckpointError], None]] = None) -> Optional[Path]:
    """The newest usable checkpoint under ckpt_root: `latest` first, then older steps; None if none.

    Each unusable one is reported, on every rank, through on_refused(path, error) when given, else
    as one warning line through `log`, and skipped. Under torch.distributed every rank must call
    it (rank 0 lists the candidates; verify_checkpoint runs on all) and all return the same path.
    """
    ckpt_root = Path(ckpt_root)
    names = None
    if _rank_world()[0] == 0:
        candidates = sorted(_step_dirs(ckpt_root), key=_step_of, reverse=True)
        latest = read_latest(ckpt_root)
        named = ckpt_root / latest if latest is not None else None
        if named is not None and named in candidates:
            candidates = [named] + [c for c in candidates if c != named]
        names = [c.name for c in candidates]
    for name in _broadcast(names):
        cand = ckpt_root / name
        try:
            verify_checkpoint(cand)
            return cand
        except CheckpointError as e:
            if on_refused is not None:
                on_refused(cand, e)
            else:
                log(f"warning: refusing {e}; trying the previous checkpoint")
    return None


# ---------------------------------------------------------------------------------------------
# Load


def _checkpoint_dir(path: PathLike) -> Path:
    """`path` as a Path, CheckpointError when it holds no model/ (it is not a checkpoint)."""
    path = Path(path)
    if not (path / MODEL_DIR).is_dir():
        raise CheckpointError(f"{path} is not a checkpoint (it needs {MODEL_DIR}/)")
    return path


def load_training_checkpoint(ckpt_dir: PathLike, chunks, optimizer, topo, weights_only: bool = False,
                             verify: bool = True) -> dict:
    """Load masters (and, unless weights_only, Adam moments and RNG) into this rank's fragments.

    Works for any checkpoint in the canonical layout: a training checkpoint of any layout, or
    (weights_only) a native checkpoint converted from Hugging Face. Returns its train_state
    ({} for a native checkpoint without one). Every rank must call it. verify=False skips the
    check against the manifest, for a checkpoint that verify_checkpoint has just accepted.
    """
    ckpt_dir = _checkpoint_dir(ckpt_dir)
    if verify:
        train_state = verify_checkpoint(ckpt_dir, weights_only)
    else:
        train_state = _read_train_state(ckpt_dir) if (ckpt_dir / TRAIN_STATE_FILE).exists() or not weights_only else {}
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


@torch.no_grad()
def load_weights(ckpt_dir: PathLike, chunks, topo, verify: bool = True) -> None:
    """Load a checkpoint's weights into this rank's pieces of `chunks` (a model without an optimizer,
    such as the DPO reference), from a training or native checkpoint of any layout. Every rank must call it."""
    ckpt_dir = _checkpoint_dir(ckpt_dir)
    if verify:
        verify_checkpoint(ckpt_dir, weights_only=True)
    wanted: dict = {}
    loaded = []
    for name, p in ((n, p) for chunk in chunks for n, p in chunk.named_parameters()):
        spec = param_shard_spec(p, topo)
        full = torch.empty(p.numel(), dtype=torch.float32, device=p.device)
        for pc in flat_pieces(spec, tuple(p.shape), 0, p.numel()):
            wanted.setdefault(name, (spec.global_shape, []))[1].append((pc.global_offsets, pc.view(full, 0)))
        loaded.append((p, full))
    _dcp_load(wanted, ckpt_dir / MODEL_DIR)
    for p, full in loaded:
        p.copy_(full.view(p.shape))


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
