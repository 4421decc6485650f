"""Fused-op tests: compiled Triton on CUDA when there is a GPU, else the Triton interpreter on CPU.

TRITON_INTERPRET must be set before any Triton kernel is defined, i.e. before
metrix_kernels.backends.triton is imported (the library imports it lazily).
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Few examples: the interpreter is slow, and on a GPU each new specialization compiles (seconds).
EXAMPLES = 2 if DEVICE == "cuda" else 3
MAX_BATCH = 150 if DEVICE == "cuda" else 40


@pytest.fixture
def device() -> str:
    return DEVICE
