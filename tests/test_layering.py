"""No import runs back up the layers of the package.

Lowest first: ops -> parallel -> model -> engine -> the top level (train.py, planner.py,
checkpoint/, data/, ...). A module may import its own layer and those below it, and, from
anywhere, the plain values of config.py, errors.py and data/batch.py. Imports inside functions
count as well: they run back up all the same.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "megatron_qwen2"
LAYERS = {"ops": 0, "_C": 0, "parallel": 1, "model": 2, "engine": 3}
TOP = 4
PLAIN_VALUES = {"megatron_qwen2", "megatron_qwen2.config", "megatron_qwen2.errors", "megatron_qwen2.data.batch"}


def layer(module: str) -> int | None:
    """The layer of a megatron_qwen2 module; None for the plain values importable from anywhere."""
    if module in PLAIN_VALUES:
        return None
    parts = module.split(".")
    return LAYERS.get(parts[1], TOP)


def module_name(path: Path, package: Path) -> str:
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, package: Path) -> list[tuple[int, str]]:
    """(line, module) of every megatron_qwen2 module the file imports, relative imports resolved."""
    name = module_name(path, package)
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")[:len(name.split(".")) - node.level + is_package]
                base = ".".join(anchor + ([base] if base else []))
            if base == "megatron_qwen2":  # `from megatron_qwen2 import ops`: the names are modules
                found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, base))
    return [(line, m) for line, m in found if m == "megatron_qwen2" or m.startswith("megatron_qwen2.")]


def upward_imports(package: Path) -> list[str]:
    """One line per import from a lower layer into a higher one."""
    bad = []
    for path in sorted(package.rglob("*.py")):
        own = layer(module_name(path, package))
        if own is None:
            continue
        for line, target in imported_modules(path, package):
            other = layer(target)
            if other is not None and other > own:
                bad.append(f"{path.relative_to(package.parent)}:{line} imports {target}")
    return bad


def test_no_import_runs_back_up():
    assert upward_imports(PACKAGE) == []


def test_the_check_sees_an_upward_import(tmp_path):
    package = tmp_path / "megatron_qwen2"
    files = {
        "__init__.py": "",
        "config.py": "",
        "ops/__init__.py": "from megatron_qwen2.config import ModelConfig\n",
        "ops/cross_entropy.py": "def f():\n    from megatron_qwen2.parallel.cross_entropy import g\n",
        "parallel/__init__.py": "from megatron_qwen2 import ops\n",
        "parallel/pipeline.py": "from megatron_qwen2.model import Qwen2Model\n",
        "model/__init__.py": "from ..engine import step\n",
        "engine/step.py": "from megatron_qwen2 import model, train\n",
        "train.py": "from megatron_qwen2.engine.step import TrainingStep\n",
    }
    for name, text in files.items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(text)
    assert upward_imports(package) == [
        "megatron_qwen2/engine/step.py:1 imports megatron_qwen2.train",
        "megatron_qwen2/model/__init__.py:1 imports megatron_qwen2.engine",
        "megatron_qwen2/ops/cross_entropy.py:2 imports megatron_qwen2.parallel.cross_entropy",
        "megatron_qwen2/parallel/pipeline.py:1 imports megatron_qwen2.model",
    ]
