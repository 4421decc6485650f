"""Backend "cpu": the kernel contract of ``metrix_kernels.backends`` on CPU tensors.

The work is done by the C++/OpenMP extension ``metrix_kernels._cpu`` (csrc/cpu/, built by
setup.py): similarity blocks by BLAS, pair weights, log-sum-exp and dL/ds per block row in C++,
the Gram identity for embedding mixup, one pass per (pair, channel) for mixed pooling. Memory
beyond the inputs: one block of at most 2^18 similarities for the pairwise op; G, r [B, B] and
S [A, B] (none when the anchors are the embeddings) for the Gram op.

A forward whose inputs require grad leaves its products (the pairwise op's similarities when they
were one block, the Gram op's G, r, S) to its backward, which would otherwise recompute them: one
slot per op, taken by a backward on the very same, unmodified input tensors (else it recomputes),
freed by it or replaced by the next such forward (a forward never followed by backward leaves its
products there until then).

Where one tensor is both sides of an op (rows is cols; anchors is emb), autograd sees one input
and only the sum of the two gradients: it is returned whole in the first (pairwise: grad_rows) or
second (Gram: grad_emb) gradient, the other zero, which saves a product.

Without the extension (no compiler at install, METRIX_NO_EXT=1, a torch it was not built for)
this module still imports: it logs one warning, ``available()`` is False and the api's
``backend="auto"`` falls back to the reference.
"""
from __future__ import annotations

import logging
import weakref
from typing import Optional

import torch

from ..family import SIGMA_FORMS, SIGMA_INPUTS, Sigma
from . import KernelConfig, assembly_codes

log = logging.getLogger(__name__)

try:
    from .. import _cpu as _ext
except ImportError as err:  # not built, or built against another torch
    _ext = None
    log.warning(
        "metrix_kernels: the compiled CPU kernels are not available (%s); backend='auto' uses the "
        "reference on CPU. Reinstall with a C++ compiler to build them: pip install --no-build-isolation -e .",
        err,
    )

_NATIVE = (torch.float32, torch.float64)
FLOAT64 = True  # float64 inputs are computed in float64 (backends contract)


def available(device: Optional[torch.device] = None) -> bool:
    """Whether the compiled extension loaded (and ``device``, if given, is a CPU)."""
    return _ext is not None and (device is None or torch.device(device).type == "cpu")


def _lib():
    if _ext is None:
        raise RuntimeError("metrix_kernels._cpu is not built; use backend='reference' or reinstall with a compiler")
    return _ext


def _sigma(s: Sigma) -> list[float]:
    return [float(SIGMA_FORMS.index(s.form)), float(SIGMA_INPUTS.index(s.of)), float(s.scale), float(s.shift)]


def _native(x: torch.Tensor) -> torch.Tensor:
    """The kernels run in float32 or float64; half inputs are computed in float32. Detached: the
    kernels' worker threads do not see the caller's no-autograd state."""
    return (x if x.dtype in _NATIVE else x.float()).detach().contiguous()


def _long(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.int64 and x.is_contiguous() else x.to(torch.int64).contiguous()


def _as(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # a no-op .to() still costs microseconds of argument parsing, some thirty times per loss call
    return x if x.dtype == dtype else x.to(dtype)


def _native_pair(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both sides in one native dtype (the promotion of theirs)."""
    a, b = _native(a), _native(b)
    dtype = torch.promote_types(a.dtype, b.dtype)
    return _as(a, dtype), _as(b, dtype)


# op -> (weak references to the input tensors, their versions, scalars, products): see the module
# docstring. Weak, so that a forward never followed by backward does not keep its autograd graph.
_kept: dict = {}


def _keep(op: str, inputs: tuple, scalars: tuple, products: list) -> None:
    if products and any(x.requires_grad for x in inputs):
        _kept[op] = ([weakref.ref(x) for x in inputs], [x._version for x in inputs], scalars, products)


def _take(op: str, inputs: tuple, scalars: tuple) -> list:
    """The products kept by the forward on these very inputs, or [] (then the kernel recomputes them)."""
    kept = _kept.pop(op, None)
    if kept is None or kept[2] != scalars or len(kept[0]) != len(inputs):
        return []
    same = all(ref() is x and x._version == v for ref, x, v in zip(kept[0], inputs, kept[1]))
    return kept[3] if same else []


def _pairwise_args(rows, row_label_i, row_label_j, row_index, cols, col_label_i, col_label_j, col_index, lam, cfg,
                   member_mask):
    rows, cols = _native_pair(rows, cols)
    return (
        rows, _long(row_label_i), _long(row_label_j), _long(row_index),
        cols, _long(col_label_i), _long(col_label_j), _long(col_index),
        float(lam), _sigma(cfg.sigma_pos), _sigma(cfg.sigma_neg), int(cfg.member), int(cfg.label_mode),
        bool(cfg.mixed_rows), None if member_mask is None else member_mask.to(torch.bool).contiguous(),
    )


def pairwise_forward(rows, row_label_i, row_label_j, row_index, cols, col_label_i, col_label_j, col_index,
                     lam: float, cfg: KernelConfig, member_mask=None) -> torch.Tensor:
    args = _pairwise_args(rows, row_label_i, row_label_j, row_index, cols, col_label_i, col_label_j, col_index,
                          lam, cfg, member_mask)
    stats, *products = _lib().pairwise_forward(*args)
    _keep("pairwise", (rows, cols), (), products)
    return stats


def pairwise_backward(rows, row_label_i, row_label_j, row_index, cols, col_label_i, col_label_j, col_index,
                      lam: float, cfg: KernelConfig, stats, grad_pos_sum, grad_neg_sum, member_mask=None):
    args = _pairwise_args(rows, row_label_i, row_label_j, row_index, cols, col_label_i, col_label_j, col_index,
                          lam, cfg, member_mask)
    kept = _take("pairwise", (rows, cols), ())
    grad_rows, grad_cols = _lib().pairwise_backward(*args, stats.detach(), grad_pos_sum.detach(), grad_neg_sum.detach(),
                                                    rows is cols, kept[0] if kept else None)
    return _as(grad_rows, rows.dtype), _as(grad_cols, cols.dtype)


def _gram_args(anchors, anchor_label, anchor_index, emb, labels, lam, cfg):
    # example anchors: the anchor similarities are rows of the Gram matrix (one product less)
    same = anchors is emb
    anchors, emb = _native_pair(anchors, emb)
    return (
        anchors, _long(anchor_label), _long(anchor_index), emb, _long(labels), float(lam), _sigma(cfg.sigma_pos),
        _sigma(cfg.sigma_neg), int(cfg.member), int(cfg.label_mode), same,
    )


def gram_mixed_forward(anchors, anchor_label, anchor_index, emb, labels, lam: float, cfg: KernelConfig):
    stats, *products = _lib().gram_mixed_forward(*_gram_args(anchors, anchor_label, anchor_index, emb, labels, lam,
                                                             cfg))
    _keep("gram", (anchors, emb, labels), (float(lam),), products)
    return stats


def gram_mixed_backward(anchors, anchor_label, anchor_index, emb, labels, lam: float, cfg: KernelConfig,
                        stats, grad_pos_sum, grad_neg_sum):
    args = _gram_args(anchors, anchor_label, anchor_index, emb, labels, lam, cfg)
    kept = _take("gram", (anchors, emb, labels), (float(lam),))
    grad_anchors, grad_emb = _lib().gram_mixed_backward(*args, stats.detach(), grad_pos_sum.detach(),
                                                        grad_neg_sum.detach(), kept)
    return _as(grad_anchors, anchors.dtype), _as(grad_emb, emb.dtype)


def unit_rows_forward(x):
    y, norm = _lib().unit_rows_forward(_native(x))
    return _as(y, x.dtype), norm


def unit_rows_backward(grad, y, norm):
    grad_x = _lib().unit_rows_backward(_as(_native(grad), norm.dtype), _as(_native(y), norm.dtype), norm)
    return _as(grad_x, y.dtype)


def assemble_forward(row, terms, stats, weight: float):
    return _lib().assemble_forward([s.detach() for s in stats], float(weight), _assembly(row, terms))


def assemble_backward(row, terms, stats, weight: float, divisors, grad_loss):
    return tuple(_lib().assemble_backward([s.detach() for s in stats], float(weight), divisors, grad_loss.detach(),
                                          _assembly(row, terms)))


def _assembly(row, terms) -> list[float]:
    return [float(code) for code in assembly_codes(row, terms)]


def mixpool_argmax_dtype(positions: int) -> torch.dtype:
    """uint8 positions where H*W fits (a quarter of int32's memory traffic), else int32."""
    return torch.uint8 if positions <= 256 else torch.int32


def mixpool_forward(features, i, j, lam: float):
    small = mixpool_argmax_dtype(features.shape[2] * features.shape[3]) == torch.uint8
    pooled, argmax = _lib().mixpool_forward(_native(features), _long(i), _long(j), float(lam), small)
    return _as(pooled, features.dtype), argmax


def mixpool_backward(grad_pooled, features, i, j, lam: float, argmax):
    f = _native(features)
    grad = _lib().mixpool_backward(_as(grad_pooled.detach(), f.dtype).contiguous(), f, _long(i), _long(j), float(lam),
                                   argmax.contiguous())
    return _as(grad, features.dtype)
