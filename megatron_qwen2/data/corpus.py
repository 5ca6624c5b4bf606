"""Which text files make up a training corpus, and how they are read.

`corpus_files("stdlib")` is the Python standard library's own source: a real corpus that every
machine with Python has, so the CPU training job needs no download.
"""

from __future__ import annotations

import glob
import os
import sysconfig
from pathlib import Path
from typing import Optional

from megatron_qwen2.errors import DataError

TEXT_SUFFIXES = (".txt", ".md", ".py")

# Directory names left out of the stdlib corpus: installed packages, the test suites
# (test/, tests/ such as lib2to3/tests, idlelib/idle_test) and bytecode caches.
_STDLIB_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})


def stdlib_root() -> Path:
    """The directory holding the running interpreter's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    """Every .py file of the standard library outside test and package directories, sorted by relative path."""
    return _walk(stdlib_root(), (".py",), lambda d: d in _STDLIB_EXCLUDED_DIRS)


def _walk(root: Path, suffixes: tuple[str, ...], skip_dir) -> list[Path]:
    """Files under root with one of `suffixes`, sorted by relative path, not descending where skip_dir(name)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not skip_dir(d)]  # prune: never descend into site-packages & co.
        rel_dir = Path(dirpath).relative_to(root)
        for name in filenames:
            path = Path(dirpath) / name
            if name.endswith(suffixes) and not name.startswith(".") and path.is_file():  # drops broken links
                found.append(((rel_dir / name).as_posix(), path))
    return [path for _, path in sorted(found)]


def corpus_files(spec: str, max_files: Optional[int] = None) -> list[Path]:
    """The files of corpus `spec`, in a fixed order, at most `max_files` of them.

    spec: 'stdlib'; a file; a directory (its *.txt, *.md and *.py files, recursively, sorted
    by relative path, hidden entries skipped); or a glob pattern ('**' recurses), sorted.
    """
    if max_files is not None and max_files <= 0:
        raise ValueError(f"max_files must be > 0, got {max_files}")
    if spec == "stdlib":
        files = stdlib_files()
    else:
        path = Path(os.path.expanduser(spec))
        if path.is_dir():
            files = _walk(path, TEXT_SUFFIXES, lambda d: d.startswith(".") or d == "__pycache__")
        elif path.is_file():
            files = [path]
        else:
            files = sorted(Path(p) for p in glob.glob(os.path.expanduser(spec), recursive=True) if os.path.isfile(p))
    if not files:
        raise DataError(f"data.corpus={spec!r} matches no files: give 'stdlib', a text file, a directory holding "
                        f"{'/'.join('*' + s for s in TEXT_SUFFIXES)} files, or a glob pattern")
    return files[:max_files] if max_files is not None else files


def read_document(path: Path) -> Optional[str]:
    """The file's text, or None when it is not valid UTF-8 (such files are left out of the corpus)."""
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        return None
    except OSError as err:
        raise DataError(f"corpus file {path} cannot be read ({err.strerror or err}); fix its permissions or "
                        "narrow data.corpus") from None
