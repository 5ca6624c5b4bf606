"""Write a directory so that it is either complete or absent: temp dir, then rename."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Union


def check_output_dir(out_dir: Union[str, Path], overwrite: bool) -> None:
    """Refuse an output that exists (unless overwrite or an empty directory) or is not a directory."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"output {out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"output {out_dir} already exists (overwrite it with --overwrite / overwrite=True)")


@contextlib.contextmanager
def atomic_directory(out_dir: Union[str, Path], overwrite: bool = False) -> Iterator[Path]:
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
