"""The CUDA extension metrix_kernels._cuda, for setup.py and csrc/gpu_build.sh.

METRIX_NO_CUDA=1 skips it; METRIX_FORCE_CUDA=1 builds it even where torch sees no GPU (nvcc and a
CUDA build of torch are still needed). Architectures: TORCH_CUDA_ARCH_LIST when set, else sm_80 and
sm_90 (plus PTX for newer cards).
"""
from __future__ import annotations

import glob
import os

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = sorted(glob.glob(os.path.join(HERE, "cuda", "*.cu"))) + [os.path.join(HERE, "cuda", "binding.cpp")]
DEFAULT_ARCHS = ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
                 "-gencode=arch=compute_90,code=compute_90"]


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def cuda_extension(force: bool = False):
    """A CUDAExtension for metrix_kernels._cuda, or None when CUDA is absent or switched off."""
    if _flag("METRIX_NO_CUDA"):
        return None
    force = force or _flag("METRIX_FORCE_CUDA")
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, CUDAExtension
    except ImportError:
        if force:
            raise
        return None
    if torch.version.cuda is None or CUDA_HOME is None or not (force or torch.cuda.is_available()):
        if force:
            raise RuntimeError("METRIX_FORCE_CUDA=1 but torch is not a CUDA build or CUDA_HOME / nvcc is missing")
        return None
    nvcc = ["-O3", "-lineinfo"]  # the C++ standard is torch's choice (C++20 from torch 2.13 on)
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        nvcc += DEFAULT_ARCHS  # torch adds its own arch flags only when none are given
    return CUDAExtension(
        name="metrix_kernels._cuda",
        sources=[os.path.relpath(s) for s in SOURCES],  # setuptools wants paths relative to setup.py
        include_dirs=[os.path.join(HERE, "cuda")],
        extra_compile_args={"cxx": ["-O3"], "nvcc": nvcc},
    )
