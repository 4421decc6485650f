"""The Triton backend (backends contract): CUDA tensors, or CPU tensors under TRITON_INTERPRET=1."""
from __future__ import annotations

import os

import torch

from .assemble import assemble_backward, assemble_forward
from .clean_and_gram import clean_and_gram_backward, clean_and_gram_forward
from .gram import gram_mixed_backward, gram_mixed_forward
from .mixpool import mixpool_backward, mixpool_forward
from .pairwise import pairwise_backward, pairwise_forward
from .unit_rows import unit_rows_backward, unit_rows_forward

__all__ = [
    "assemble_backward", "assemble_forward", "available", "clean_and_gram_backward", "clean_and_gram_forward",
    "gram_mixed_backward", "gram_mixed_forward",
    "mixpool_backward", "mixpool_forward", "pairwise_backward", "pairwise_forward", "unit_rows_backward",
    "unit_rows_forward",
]


def available(device: torch.device) -> bool:
    """Compiled kernels need a CUDA device; the interpreter runs them on CPU tensors."""
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
