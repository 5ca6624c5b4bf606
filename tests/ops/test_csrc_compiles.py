"""Every csrc/*.cu compiles for sm_90a with the machine's nvcc (compile-only, no GPU needed), and
bindings.cpp passes a syntax check against the installed torch's headers.

The .cu files include only core ATen and c10/cuda headers, which even a CPU build of torch ships;
C10_CUDA_NO_CMAKE_CONFIGURE_FILE stands in for the one generated header a CPU build lacks. The
files compile in parallel so the check stays within a couple of minutes on two cores.
"""

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"


def _nvcc():
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    found = shutil.which("nvcc") or (cuda_home and os.path.join(cuda_home, "bin", "nvcc"))
    return found if found and os.path.exists(found) else None


def _torch_includes():
    import torch

    inc = Path(torch.__file__).parent / "include"
    return [f"-I{inc}", f"-I{inc / 'torch' / 'csrc' / 'api' / 'include'}"]


def test_cuda_sources_compile_for_sm90a(tmp_path):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (neither on PATH nor under $CUDA_HOME): the compile-only check needs it")
    sources = sorted(CSRC.glob("*.cu"))
    assert sources, "no .cu files under csrc/"
    jobs = []
    for src in sources:
        cmd = [nvcc, "-c", "-std=c++17", "--use_fast_math", "-gencode=arch=compute_90a,code=sm_90a",
               "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE", "-Xcompiler", "-O0", *_torch_includes(), str(src),
               "-o", str(tmp_path / (src.stem + ".o"))]
        jobs.append((src.name, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx:
        cmd = [cxx, "-std=c++17", "-fsyntax-only", "-DTORCH_EXTENSION_NAME=_C", *_torch_includes(),
               f"-I{sysconfig.get_paths()['include']}", str(CSRC / "bindings.cpp")]
        jobs.append(("bindings.cpp", subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
    failed = []
    for name, proc in jobs:
        out, _ = proc.communicate(timeout=600)
        if proc.returncode != 0:
            errors = [line for line in out.splitlines() if "error" in line.lower()][:20]
            failed.append(f"{name}:\n" + "\n".join(errors or out.splitlines()[-20:]))
    assert not failed, "compile-only check failed:\n" + "\n\n".join(failed)
    for src in sources:
        assert (tmp_path / (src.stem + ".o")).stat().st_size > 0


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
