"""Write a directory so that it is either complete or absent: temp dir, then rename.

The finished directory gets the permissions that files and folders created by the process get
(0777 / 0666 less the umask), whatever its writers created them with (`tempfile.mkdtemp` makes
0700, safetensors and DCP may make 0600 files).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Union

PathLike = Union[str, Path]


def check_output_dir(out_dir: PathLike, overwrite: bool) -> None:
    """Refuse an output that exists (unless overwrite or an empty directory) or is not a directory."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"output {out_dir} exists and is not a directory; pick another --output")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"output {out_dir} already exists (pick another --output, or replace it with "
                              "--overwrite / overwrite=True)")


def check_paths(input_dir: PathLike, output_dir: PathLike, overwrite: bool) -> None:
    """Before reading any input: the input exists, the output is neither it nor a directory holding it
    (replacing that would delete the input), and the output may be written (check_output_dir)."""
    src, dst = Path(input_dir).resolve(), Path(output_dir).resolve()
    if not src.exists():
        raise FileNotFoundError(f"input {input_dir} does not exist; check --input")
    if src == dst or src.is_relative_to(dst):
        raise ValueError(f"output {output_dir} holds the input {input_dir}; pick another --output")
    check_output_dir(output_dir, overwrite)


def process_umask() -> int:
    """The umask, read without changing it where /proc says it (os.umask sets it for every thread)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(root: Path) -> None:
    """chmod root and everything under it to 0777 (folders) / 0666 (files) less the umask."""
    mask = process_umask()
    os.chmod(root, 0o777 & ~mask)
    for parent, dirs, files in os.walk(root):
        for d in dirs:
            os.chmod(os.path.join(parent, d), 0o777 & ~mask)
        for f in files:
            os.chmod(os.path.join(parent, f), 0o666 & ~mask)


@contextlib.contextmanager
def atomic_directory(out_dir: PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of out_dir to fill; on success it is renamed to out_dir.

    An existing non-empty out_dir is an error unless `overwrite`, and is then replaced only
    once the new directory is complete. On any failure the temporary directory is removed.
    """
    out_dir = Path(out_dir)
    check_output_dir(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        yield tmp
        apply_umask(tmp)
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _move_into_place(new: Path, out_dir: Path) -> None:
    if not out_dir.exists():
        os.replace(new, out_dir)
        return
    # rename(2) may replace only an empty directory, so the old one steps aside first.
    old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    os.replace(out_dir, old)
    try:
        os.replace(new, out_dir)
    except BaseException:
        os.replace(old, out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)
