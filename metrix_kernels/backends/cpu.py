"""Backend "cpu": the kernel contract of ``metrix_kernels.backends`` on CPU tensors.

The work is done by the C++/OpenMP extension ``metrix_kernels._cpu`` (csrc/cpu/, built by
setup.py): similarity tiles by BLAS, pair weights, log-sum-exp and dL/ds per tile in C++, the
Gram identity for embedding mixup, one pass per (pair, channel) for mixed pooling. Memory beyond
the inputs: one tile per thread for the pairwise op, S [A, B] and r [B, B] for the Gram op.

Without the extension (no compiler at install, METRIX_NO_EXT=1, a torch it was not built for)
this module still imports: it logs one warning, ``available()`` is False and the api's
``backend="auto"`` falls back to the reference.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch

from ..family import SIGMA_FORMS, SIGMA_INPUTS, Sigma
from . import KernelConfig

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
    return x.detach().to(torch.int64).contiguous()


def _pairwise_args(rows, row_label_i, row_label_j, row_index, cols, col_label_i, col_label_j, col_index, lam, cfg,
                   member_mask):
    dtype = torch.promote_types(_native(rows).dtype, _native(cols).dtype)
    return (
        _native(rows).to(dtype), _long(row_label_i), _long(row_label_j), _long(row_index),
        _native(cols).to(dtype), _long(col_label_i), _long(col_label_j), _long(col_index),
        float(lam), _sigma(cfg.sigma_pos), _sigma(cfg.sigma_neg), int(cfg.member), int(cfg.label_mode),
        bool(cfg.mixed_rows), None if member_mask is None else member_mask.to(torch.bool).contiguous(),
    )


def pairwise_forward(rows, row_label_i, row_label_j, row_index, cols, col_label_i, col_label_j, col_index,
                     lam: float, cfg: KernelConfig, member_mask=None) -> torch.Tensor:
    args = _pairwise_args(rows, row_label_i, row_label_j, row_index, cols, col_label_i, col_label_j, col_index,
                          lam, cfg, member_mask)
    return _lib().pairwise_forward(*args)


def pairwise_backward(rows, row_label_i, row_label_j, row_index, cols, col_label_i, col_label_j, col_index,
                      lam: float, cfg: KernelConfig, stats, grad_pos_sum, grad_neg_sum, member_mask=None):
    args = _pairwise_args(rows, row_label_i, row_label_j, row_index, cols, col_label_i, col_label_j, col_index,
                          lam, cfg, member_mask)
    grad_rows, grad_cols = _lib().pairwise_backward(*args, stats.detach(), grad_pos_sum.detach(), grad_neg_sum.detach())
    return grad_rows.to(rows.dtype), grad_cols.to(cols.dtype)


def _gram_args(anchors, anchor_label, anchor_index, emb, labels, lam, cfg):
    dtype = torch.promote_types(_native(anchors).dtype, _native(emb).dtype)
    anchors, emb = _native(anchors).to(dtype), _native(emb).to(dtype)
    # example anchors: the anchor similarities are rows of the Gram matrix (one product less)
    same = anchors.shape == emb.shape and torch.equal(anchors, emb)
    return (
        anchors, _long(anchor_label), _long(anchor_index), emb, _long(labels), float(lam), _sigma(cfg.sigma_pos),
        _sigma(cfg.sigma_neg), int(cfg.member), int(cfg.label_mode), same,
    )


def gram_mixed_forward(anchors, anchor_label, anchor_index, emb, labels, lam: float, cfg: KernelConfig):
    return _lib().gram_mixed_forward(*_gram_args(anchors, anchor_label, anchor_index, emb, labels, lam, cfg))


def gram_mixed_backward(anchors, anchor_label, anchor_index, emb, labels, lam: float, cfg: KernelConfig,
                        stats, grad_pos_sum, grad_neg_sum):
    args = _gram_args(anchors, anchor_label, anchor_index, emb, labels, lam, cfg)
    grad_anchors, grad_emb = _lib().gram_mixed_backward(*args, stats.detach(), grad_pos_sum.detach(),
                                                        grad_neg_sum.detach())
    return grad_anchors.to(anchors.dtype), grad_emb.to(emb.dtype)


def mixpool_forward(features, i, j, lam: float):
    pooled, argmax = _lib().mixpool_forward(_native(features), _long(i), _long(j), float(lam))
    return pooled.to(features.dtype), argmax


def mixpool_backward(grad_pooled, features, i, j, lam: float, argmax):
    f = _native(features)
    grad = _lib().mixpool_backward(grad_pooled.detach().to(f.dtype).contiguous(), f, _long(i), _long(j), float(lam),
                                   argmax.to(torch.int32).contiguous())
    return grad.to(features.dtype)
