"""Packaging lives in pyproject.toml; this file builds the optional compiled extensions.

    metrix_kernels._cpu   C++/OpenMP kernels of backend "cpu" (csrc/cpu/)
    metrix_kernels._cuda  CUDA kernels, described by csrc/cuda_build.py when that file exists

Environment switches (1/true/yes/on):
    METRIX_NO_EXT=1      build no extension: a pure-Python install
    METRIX_NO_CPU_EXT=1  skip the CPU kernels only
    METRIX_FORCE_EXT=1   fail the install when an extension does not compile (default: a warning,
                         and at run time the library falls back to the reference)
    METRIX_CPU_MARCH=x   -march of the CPU kernels, default "native"; empty for the compiler's own

Install after torch, without build isolation so that the extensions build against that torch:
    pip install --no-build-isolation -e '.[test]'
"""
from __future__ import annotations

import glob
import importlib.util
import os

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _warn(message: str) -> None:
    print(f"WARNING (metrix-kernels setup): {message}", flush=True)


def _cpu_extension(CppExtension):
    if _flag("METRIX_NO_CPU_EXT"):
        return None
    march = os.environ.get("METRIX_CPU_MARCH", "native").strip()
    # no errno and no trapping math (as torch itself is built): lets the exp loops vectorize
    flags = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"] + ([f"-march={march}"] if march else [])
    sources = sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, "csrc", "cpu", "*.cpp")))
    return CppExtension("metrix_kernels._cpu", sources, extra_compile_args=flags, extra_link_args=["-fopenmp"])


def _cuda_extension():
    """csrc/cuda_build.py's cuda_extension(), when the CUDA sources are part of this checkout."""
    path = os.path.join(HERE, "csrc", "cuda_build.py")
    if not os.path.exists(path):
        return None
    spec = importlib.util.spec_from_file_location("metrix_cuda_build", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.cuda_extension()


def _extensions() -> dict:
    if _flag("METRIX_NO_EXT"):
        return {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        _warn("torch is not importable, so no compiled extension is built (install torch first and use "
              "pip install --no-build-isolation)")
        return {}

    class OptionalBuildExtension(BuildExtension):
        """A failed compile (no compiler, no OpenMP) costs the extension, not the install."""

        def run(self):
            try:
                super().run()
            except Exception as err:  # e.g. torch's compiler checks, before any extension
                if _flag("METRIX_FORCE_EXT"):
                    raise
                _warn(f"no extension was built ({err}); the library falls back to the reference")

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as err:  # compiler errors come as several distutils / subprocess types
                if _flag("METRIX_FORCE_EXT"):
                    raise
                _warn(f"{ext.name} was not built ({err}); the library falls back to the reference for it")

    modules = [m for m in (_cpu_extension(CppExtension), _cuda_extension()) if m is not None]
    if not modules:
        return {}
    return {"ext_modules": modules, "cmdclass": {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}}


setup(**_extensions())
