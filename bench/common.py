"""Shared pieces of the GPU benchmarks: timing, the copy-bandwidth ceiling, result files."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
from pathlib import Path

import torch

SPEC_PEAK_TFLOPS = 989.0  # H100 / H200 SXM dense bf16, the MFU denominator


def time_ms(fn, warmup: int = 10, iters: int = 50) -> float:
    """Median milliseconds of fn() over `iters` runs, timed with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def copy_bandwidth_gbs(nbytes: int = 2 * 1024**3) -> float:
    """Device copy bandwidth (bytes read + written per second, GB/s): the memory-bound ceiling."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), warmup=5, iters=20)
    return 2 * src.numel() * src.element_size() / ms / 1e6


def matmul_ceiling_tflops(n: int = 8192) -> float:
    """bf16 n x n x n matmul throughput (TFLOP/s): the compute ceiling measured in the run."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = time_ms(lambda: a @ b, warmup=5, iters=20)
    return 2 * n**3 / ms / 1e9


def git_commit(override: str | None = None) -> str:
    """The commit measured: `override`, else $GIT_COMMIT, else `git rev-parse HEAD`, else 'unknown'."""
    if override:
        return override
    if os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_result(name: str, payload: dict, out_dir: str | None, commit: str | None = None) -> Path:
    """bench/results/<name>_<device>_<date>.json (or under out_dir), with device, commit and date."""
    device = torch.cuda.get_device_name()
    date = datetime.date.today().isoformat()
    payload = dict(payload, device=device, commit=git_commit(commit), date=date, torch=torch.__version__,
                   cuda=torch.version.cuda)
    root = Path(out_dir) if out_dir else Path(__file__).resolve().parent / "results"
    root.mkdir(parents=True, exist_ok=True)
    slug = device.replace("NVIDIA ", "").replace(" ", "-").lower()
    path = root / f"{name}_{slug}_{date}.json"
    path.write_text(json.dumps(payload, indent=1) + "\n")
    return path


def device_name() -> str:
    """The CUDA device's name, else the CPU's (for dry runs of a benchmark on a machine without a GPU)."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    import platform

    return f"cpu ({platform.processor() or platform.machine()})"


def device_slug(name: str | None = None) -> str:
    """A file-name form of the device name: 'NVIDIA H200' -> 'h200', 'cpu (x86_64)' -> 'cpu'."""
    name = name or device_name()
    if name.startswith("cpu"):
        return "cpu"
    return name.replace("NVIDIA ", "").replace(" ", "-").lower()


def write_result_file(path: str | Path, payload: dict, commit: str | None = None,
                      measured: dict | None = None) -> Path:
    """Write payload to exactly `path` as JSON, with device, commit, date and versions added: this
    process's, or `measured` (those keys of results measured elsewhere, e.g. merged result files)."""
    if measured is None:
        measured = dict(device=device_name(), commit=git_commit(commit),
                        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                        torch=torch.__version__, cuda=torch.version.cuda)
    payload = dict(payload, **measured)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n")
    return path
