"""Install megatron_qwen2; build the CUDA extension `megatron_qwen2._C` from csrc/ when possible.

The extension is built only when torch has CUDA and nvcc is found (or CUDA_HOME is set).
Otherwise the package installs as pure Python and the ops fall back to PyTorch.
Set MEGATRON_QWEN2_NO_EXT=1 to skip the build, TORCH_CUDA_ARCH_LIST / MEGATRON_QWEN2_GENCODE
to change the target (default: Hopper, sm_90a).
"""

import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _say(msg: str) -> None:
    print(f"megatron_qwen2: {msg}", file=sys.stderr)


def _check_cuda_versions(nvcc: str, torch_cuda: str) -> None:
    """Stop with a clear message when nvcc's CUDA major version differs from torch's.

    An extension built by one CUDA major version against a torch built with another fails to load
    or crashes at run time; torch's own check reports it deep inside the build.
    """
    import re
    import subprocess

    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise SystemExit(f"megatron_qwen2: cannot run {nvcc} --version ({e}); set CUDA_HOME to a working CUDA "
                         "toolkit or MEGATRON_QWEN2_NO_EXT=1 to install without the CUDA extension")
    found = re.search(r"release (\d+)\.(\d+)", out)
    if found is None:
        return
    nvcc_version = f"{found.group(1)}.{found.group(2)}"
    if found.group(1) != torch_cuda.split(".")[0]:
        raise SystemExit(
            f"megatron_qwen2: nvcc at {nvcc} is CUDA {nvcc_version} but torch was built with CUDA {torch_cuda}; "
            f"the extension must be built with the same CUDA major version. Point CUDA_HOME (and PATH) at a "
            f"CUDA {torch_cuda.split('.')[0]}.x toolkit, install the torch build for CUDA {nvcc_version}, or set "
            "MEGATRON_QWEN2_NO_EXT=1 to install without the extension (PyTorch fallbacks).")
    if nvcc_version != ".".join(torch_cuda.split(".")[:2]):
        _say(f"note: nvcc is CUDA {nvcc_version}, torch was built with CUDA {torch_cuda} (same major version: fine)")


def _cublaslt(cuda_home: "str | None") -> dict:
    """Where cublasLt.h and libcublasLt are (csrc/fp8_gemm.cpp calls cuBLASLt): the CUDA toolkit's, else
    those of the nvidia-cublas wheel torch depends on. CUDAExtension arguments, or a clear stop."""
    roots = [os.path.join(cuda_home, "include")] if cuda_home else []
    libs = [os.path.join(cuda_home, d, "libcublasLt.so") for d in ("lib64", "lib")] if cuda_home else []
    try:
        import nvidia  # the namespace package of NVIDIA's pip wheels

        for base in nvidia.__path__:
            roots += sorted(glob.glob(os.path.join(base, "*", "include")))
            libs += sorted(glob.glob(os.path.join(base, "*", "lib", "libcublasLt.so*")))
    except ImportError:
        pass
    include = next((r for r in roots if os.path.exists(os.path.join(r, "cublasLt.h"))), None)
    library = next((lib for lib in libs if os.path.exists(lib)), None)
    if include is None or library is None:
        raise SystemExit("megatron_qwen2: cublasLt.h or libcublasLt not found (looked in CUDA_HOME and the nvidia "
                         "pip packages); install the CUDA toolkit's cuBLAS or `pip install nvidia-cublas`, or set "
                         "MEGATRON_QWEN2_NO_EXT=1 to install without the extension")
    lib_dir = os.path.dirname(library)
    return {"include_dirs": [include], "library_dirs": [lib_dir], "runtime_library_dirs": [lib_dir],
            "libraries": [":" + os.path.basename(library)]}


def _extension_setup() -> dict:
    if os.environ.get("MEGATRON_QWEN2_NO_EXT") == "1":
        _say("MEGATRON_QWEN2_NO_EXT=1, installing pure Python (PyTorch fallbacks for every op)")
        return {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        _say("torch not importable at build time, installing pure Python (PyTorch fallbacks)")
        return {}
    nvcc = shutil.which("nvcc") or (CUDA_HOME and os.path.join(CUDA_HOME, "bin", "nvcc"))
    if torch.version.cuda is None or not nvcc or not os.path.exists(nvcc):
        why = "torch is a CPU build" if torch.version.cuda is None else "nvcc not found"
        _say(f"{why}, installing pure Python without the CUDA extension (PyTorch fallbacks)")
        return {}
    _check_cuda_versions(nvcc, torch.version.cuda)
    gencode = os.environ.get("MEGATRON_QWEN2_GENCODE", "-gencode=arch=compute_90a,code=sm_90a").split()
    # The Hopper attention kernels (csrc/sm90.cuh) exist only in an sm_90a build; the module says so.
    hopper = [f"-DMQ2_HOPPER_KERNELS={int(any('sm_90a' in g for g in gencode))}"]
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "*.cu")))
    # csrc/*.cuh are included by the .cu files; ninja tracks them through the compiler's depfiles.
    _say(f"building megatron_qwen2._C for CUDA {torch.version.cuda} ({' '.join(gencode)})")
    ext = CUDAExtension(
        name="megatron_qwen2._C",
        sources=sources,
        **_cublaslt(CUDA_HOME),
        extra_compile_args={
            "cxx": ["-O3", "-std=c++17", *hopper],
            "nvcc": ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo", *gencode, *hopper],
        },
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)}}


setup(
    name="megatron_qwen2",
    version="0.1.0",
    description="Megatron-style 3D-parallel training for the Qwen2 dense and MoE family",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_qwen2", "megatron_qwen2.*"]),
    package_data={"megatron_qwen2.data": ["assets/tokenizer.json"]},
    install_requires=[
        "torch>=2.4",
        "hydra-core>=1.3",
        "omegaconf>=2.3",
        "safetensors",
        "tokenizers>=0.15",
        "wandb",
        "numpy",
        "tqdm",
        "xxhash",
    ],
    extras_require={
        "test": ["pytest", "transformers>=4.45", "pyarrow"],
        "convert": ["transformers>=4.45"],
        "build": ["pybind11", "ninja"],
    },
    **_extension_setup(),
)
