"""The native checkpoint: parameters under their global (unsharded) names and shapes.

A checkpoint directory holds `model_config.json` (the ModelConfig), `model/`, a
torch.distributed.checkpoint (DCP) directory, so that any parallel layout can load it and
sharded saves write the same format (docs/architecture.md, "Invariants"), and `manifest.json`. A directory is
written under a temporary name and renamed into place, so it is either complete or absent.

The manifest is the rule for every checkpoint here, native or training (checkpoint/distributed.py):

    {"format": 2, "checksum": "xxh3_64", "files": {"model/__0_0.distcp": {"bytes": 5545, "xxh3_64": "9f..."}, ...}}

Each file's checksum (xxHash XXH3, 64 bits) is computed from the bytes as they are written, by
the process that writes them (`HashingFileSystem` under DCP, `write_file` for the rest), and the
manifest is written last, after the size of every file on disk was checked against its record.
A loader verifies the files it reads against it (`check_file`): a missing file, another size or
another checksum refuses the checkpoint with a `CheckpointError` naming the file. Manifests of
format 1 hold sizes only; their files are checked by size. `model_config.json` is listed too but
not refused for its checksum (a person may edit it); its values are validated instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import io
import json
import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional, Union

import torch
import torch.distributed.checkpoint as dcp
import xxhash
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from megatron_qwen2.checkpoint.atomic import atomic_directory
from megatron_qwen2.checkpoint.hf import expected_native_shapes
from megatron_qwen2.config import ModelConfig
from megatron_qwen2.errors import ConfigError

CONFIG_FILE = "model_config.json"
MODEL_DIR = "model"
LATEST_FILE = "latest"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 2
CHECKSUM = "xxh3_64"
VERIFY_THREADS = 8  # files read and checked in parallel per process (xxhash releases the GIL)
_READ_CHUNK = 16 << 20

PathLike = Union[str, Path]


class CheckpointError(ConfigError):
    """A checkpoint directory that is incomplete, corrupt or does not fit the model (exit code 2)."""


# ---------------------------------------------------------------------------------------------
# Checksums while writing


@dataclasses.dataclass(frozen=True)
class FileRecord:
    """What a writer recorded about one file: its size and checksum (None in a format-1 manifest)."""

    size: int
    checksum: Optional[str]

    def to_json(self) -> dict:
        return {"bytes": self.size, CHECKSUM: self.checksum}


class _HashingStream(io.RawIOBase):
    """A write stream that hashes what it passes on to `file` (None: a file that could not be opened).

    The first OSError is kept in `error` and later writes are dropped, so that a DCP writer thread
    ends normally and the save fails once, in the caller, with that error.
    """

    def __init__(self, path, file, error: Optional[OSError] = None):
        super().__init__()
        self.path, self._file, self.error = str(path), file, error
        self._hash = xxhash.xxh3_64()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        n = memoryview(data).nbytes
        if self.error is None:
            try:
                self._file.write(data)
            except OSError as e:
                self.error = with_path(e, self.path)
            else:
                self._hash.update(data)
        self.size += n
        return n

    def tell(self) -> int:
        return self.size

    def fileno(self) -> int:
        if self._file is None:
            raise io.UnsupportedOperation("fileno")
        return self._file.fileno()

    def close(self) -> None:
        if self._file is not None and not self._file.closed:
            try:
                self._file.close()  # flushes: a full disk often shows here
            except OSError as e:
                self.error = self.error or with_path(e, self.path)
        super().close()

    def record(self) -> FileRecord:
        return FileRecord(self.size, self._hash.hexdigest())


class HashingFileSystem(FileSystem):
    """DCP's local file system, recording each written file's size and checksum in `records`
    (absolute path -> FileRecord) and each write failure in `errors`, which it does not raise."""

    def __init__(self):
        super().__init__()
        self.records: dict[str, FileRecord] = {}
        self.errors: list[OSError] = []
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def create_stream(self, path, mode: str):
        if "r" in mode:
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        try:
            stream = _HashingStream(path, open(path, mode))
        except OSError as e:
            stream = _HashingStream(path, None, with_path(e, path))
        try:
            yield stream
        except OSError as e:  # os.fsync of the stream, inside DCP's writer
            stream.error = stream.error or with_path(e, path)
        finally:
            stream.close()
        with self._lock:
            if stream.error is not None:
                self.errors.append(stream.error)
            else:
                self.records[str(path)] = stream.record()

    def rename(self, path, new_path) -> None:
        with self._lock:
            failed = next((e for e in self.errors if e.filename == str(path)), None)
        if failed is not None:  # DCP renames the metadata file it wrote: say why it is not there
            raise failed
        super().rename(path, new_path)
        with self._lock:
            if str(path) in self.records:
                self.records[str(new_path)] = self.records.pop(str(path))


def hashing_writer(path: Path, thread_count: int = 1) -> dcp.FileSystemWriter:
    """A DCP FileSystemWriter whose `fs` is a HashingFileSystem."""
    writer = dcp.FileSystemWriter(str(path), thread_count=thread_count)
    writer.fs = HashingFileSystem()
    return writer


def written_records(writer: dcp.FileSystemWriter, ckpt_dir: Path) -> dict[str, FileRecord]:
    """The files a hashing_writer wrote, keyed by their path relative to ckpt_dir."""
    return {str(Path(p).relative_to(ckpt_dir)): r for p, r in writer.fs.records.items()}


def write_file(path: Path, data: bytes) -> FileRecord:
    """Write `data` to path and fsync it; its record. An OSError names the path."""
    try:
        with open(path, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as e:
        raise with_path(e, path) from None
    return FileRecord(len(data), xxhash.xxh3_64_hexdigest(data))


def with_path(e: OSError, path) -> OSError:
    """e, or when it names no file (a failed write or fsync) the same error naming `path`."""
    if e.filename is not None or e.errno is None:
        return e
    return type(e)(e.errno, e.strerror or os.strerror(e.errno), str(path))


def json_bytes(content) -> bytes:
    return (json.dumps(content, indent=1, default=str) + "\n").encode()


def write_manifest(ckpt_dir: Path, files: dict[str, FileRecord]) -> None:
    """Write ckpt_dir/manifest.json for `files` once every file on disk has its recorded size and no
    other file is there (CheckpointError otherwise); fsyncs it and the directories."""
    present = {str(p.relative_to(ckpt_dir)) for p in ckpt_dir.rglob("*") if p.is_file()}
    unrecorded = sorted(present - set(files))
    if unrecorded:
        raise CheckpointError(f"checkpoint {ckpt_dir}: {unrecorded[0]} has no checksum from the rank that wrote it")
    for rel, rec in files.items():
        size = (ckpt_dir / rel).stat().st_size  # FileNotFoundError: an OSError for the caller
        if size != rec.size:
            raise CheckpointError(f"checkpoint {ckpt_dir}: {rel} has {size} bytes on disk, its writer wrote {rec.size}")
    manifest = {"format": MANIFEST_FORMAT, "checksum": CHECKSUM,
                "files": {rel: files[rel].to_json() for rel in sorted(files)}}
    write_file(ckpt_dir / MANIFEST_FILE, json_bytes(manifest))
    for d in sorted({(ckpt_dir / rel).parent for rel in files} | {ckpt_dir}):
        fsync_dir(d)


def fsync_dir(path: Path) -> None:
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


def describe_os_error(e: OSError) -> str:
    """'PATH: No space left on device (ENOSPC)' for an OSError."""
    code = errno.errorcode.get(e.errno, str(e.errno)) if e.errno is not None else None
    text = e.strerror or str(e)
    where = f"{e.filename}: " if e.filename else ""
    return f"{where}{text} ({code})" if code else f"{where}{text}"


def find_os_error(e: BaseException) -> Optional[OSError]:
    """The OSError behind e: e itself, its cause or context, or a failure DCP collected from a rank."""
    seen = set()
    todo = [e]
    while todo:
        x = todo.pop(0)
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, OSError):
            return x
        if isinstance(x, CheckpointException):
            todo.extend(dcp_failures(x))
        todo.extend([x.__cause__, x.__context__])
    return None


def dcp_failures(e: CheckpointException) -> list[BaseException]:
    """The exceptions DCP collected from the ranks (by rank) into a CheckpointException."""
    return [w[0] if isinstance(w, tuple) else w for _, w in sorted(e.failures.items())]


# ---------------------------------------------------------------------------------------------
# Checking on load


def read_manifest(ckpt_dir: Path) -> dict[str, FileRecord]:
    """The files a checkpoint's manifest lists (CheckpointError when it is absent or unreadable)."""
    try:
        manifest = json.loads((ckpt_dir / MANIFEST_FILE).read_text())
        files = {}
        for rel, entry in manifest["files"].items():
            if isinstance(entry, int):  # format 1: sizes only
                files[rel] = FileRecord(entry, None)
            else:
                files[rel] = FileRecord(int(entry["bytes"]), str(entry[CHECKSUM]))
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {ckpt_dir} is incomplete: it has no {MANIFEST_FILE}") from None
    except OSError as e:
        raise CheckpointError(f"checkpoint {ckpt_dir}: {MANIFEST_FILE} cannot be read ({describe_os_error(e)})") from None
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"checkpoint {ckpt_dir}: {MANIFEST_FILE} is corrupt ({type(e).__name__}: {e})") from None
    return files


def present_with_sizes(ckpt_dir: Path, files: dict[str, FileRecord]) -> bool:
    """Every listed file is there with its recorded size (a stat each, no reading)."""
    try:
        return all((ckpt_dir / rel).stat().st_size == rec.size for rel, rec in files.items())
    except OSError:
        return False


def check_file(ckpt_dir: Path, rel: str, rec: FileRecord) -> Optional[str]:
    """Why ckpt_dir/rel does not match its record (one line), or None when it does."""
    path = ckpt_dir / rel
    try:
        size = path.stat().st_size
        if size != rec.size:
            return f"checkpoint {ckpt_dir} is corrupt: {rel} has {size} bytes, the manifest says {rec.size}"
        if rec.checksum is None:
            return None
        h = xxhash.xxh3_64()
        buf = bytearray(min(_READ_CHUNK, max(size, 1)))
        view = memoryview(buf)
        with open(path, "rb", buffering=0) as fh:
            while True:
                n = fh.readinto(buf)
                if not n:
                    break
                h.update(view[:n])
    except FileNotFoundError:
        return f"checkpoint {ckpt_dir} is incomplete: {rel} is missing"
    except OSError as e:
        return f"checkpoint {ckpt_dir}: {rel} cannot be read ({describe_os_error(e)})"
    if h.hexdigest() != rec.checksum:
        return (f"checkpoint {ckpt_dir} is corrupt: {rel} has checksum {h.hexdigest()}, "
                f"the manifest says {rec.checksum}")
    return None


def check_files(ckpt_dir: Path, files: dict[str, FileRecord], threads: Optional[int] = None) -> Optional[str]:
    """The first of `files` (in name order) that does not match its record, as one line; None if all do.
    Up to `threads` (default VERIFY_THREADS) files are read at a time."""
    names = sorted(files)
    with ThreadPoolExecutor(max_workers=max(1, min(threads or VERIFY_THREADS, len(names)))) as pool:
        problems = list(pool.map(lambda rel: check_file(ckpt_dir, rel, files[rel]), names))
    return next((p for p in problems if p is not None), None)


def weight_files(rel: str) -> bool:
    """The files a weights loader checks: model/ (model_config.json is read too, but checked by
    ModelConfig.validate and the shape of every tensor instead: a person may edit it)."""
    return rel.startswith(MODEL_DIR + "/")


def verify_native(ckpt_dir: Path, select: Callable[[str], bool] = weight_files) -> None:
    """Check the files `select` picks from ckpt_dir's manifest, in this process (CheckpointError)."""
    files = {rel: rec for rel, rec in read_manifest(ckpt_dir).items() if select(rel)}
    problem = check_files(ckpt_dir, files)
    if problem is not None:
        raise CheckpointError(problem)


def save_native(state: dict[str, torch.Tensor], model_cfg: ModelConfig, out_dir: PathLike,
                overwrite: bool = False) -> Path:
    """Write full tensors `state` and `model_cfg` to out_dir atomically; returns out_dir."""
    out_dir = Path(out_dir)
    check_native_state(state, model_cfg, f"state for {out_dir}")
    with atomic_directory(out_dir, overwrite) as tmp:
        files = {CONFIG_FILE: write_file(tmp / CONFIG_FILE, json_bytes(dataclasses.asdict(model_cfg)))}
        tensors = {k: v.detach().contiguous() for k, v in state.items()}
        writer = hashing_writer(tmp / MODEL_DIR)
        with _single_process():
            # no_dist: this process holds every tensor; under torchrun only rank 0 calls this.
            dcp.save(tensors, storage_writer=writer, no_dist=True)
        if writer.fs.errors:
            raise writer.fs.errors[0]
        files.update(written_records(writer, tmp))
        write_manifest(tmp, files)
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
        raise CheckpointError(f"checkpoint {ckpt_dir} does not exist")
    if (ckpt_dir / LATEST_FILE).is_file():
        ckpt_dir = ckpt_dir / (ckpt_dir / LATEST_FILE).read_text().strip()
    if not (ckpt_dir / CONFIG_FILE).is_file() or not (ckpt_dir / MODEL_DIR).is_dir():
        raise CheckpointError(f"{ckpt_dir} is not a native checkpoint (it needs {CONFIG_FILE} and {MODEL_DIR}/)")
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


def checkpoint_for(ckpt_dir: PathLike, model: ModelConfig, field: str) -> Path:
    """The checkpoint directory a config field names (`latest` followed), checked to hold the
    architecture of `model` (every field but the name); ValueError naming `field` otherwise."""
    src = resolve_checkpoint_dir(ckpt_dir)
    theirs, ours = dataclasses.asdict(load_model_config(src)), dataclasses.asdict(model)
    differ = [f"model.{k}: {theirs[k]!r} there, {ours[k]!r} here" for k in ours if k != "name" and theirs[k] != ours[k]]
    if differ:
        raise ValueError(f"{field}={ckpt_dir} holds another architecture: " + "; ".join(differ))
    return src


def load_native_state(ckpt_dir: PathLike) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """All tensors of a checkpoint (full, on the CPU) and its ModelConfig; `latest` is followed.

    The files it reads are first checked against the manifest (CheckpointError naming the file)."""
    ckpt_dir = resolve_checkpoint_dir(ckpt_dir)
    verify_native(ckpt_dir)
    cfg = load_model_config(ckpt_dir)
    reader = dcp.FileSystemReader(str(ckpt_dir / MODEL_DIR))
    try:
        meta = reader.read_metadata().state_dict_metadata
    except FileNotFoundError:
        raise CheckpointError(f"{ckpt_dir / MODEL_DIR} holds no DCP metadata (an incomplete checkpoint?)") from None
    state = {}
    for name, md in meta.items():
        if not isinstance(md, TensorStorageMetadata):
            raise CheckpointError(f"{ckpt_dir}: entry {name} is not a tensor")
        state[name] = torch.empty(md.size, dtype=md.properties.dtype)
    try:
        with _single_process():
            dcp.load(state, storage_reader=reader, no_dist=True)
    except CheckpointException as e:
        cause = find_os_error(e)
        raise CheckpointError(f"checkpoint {ckpt_dir}: {MODEL_DIR}/ cannot be read ("
                              f"{describe_os_error(cause) if cause else _first_failure(e)})") from None
    return state, cfg


def _first_failure(e: CheckpointException) -> str:
    for exc in dcp_failures(e):
        return f"{type(exc).__name__}: {exc}"
    return str(e)


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
