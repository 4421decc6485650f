"""The fused embedding-mixup op: per-anchor term statistics against all mixed pairs of a batch."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..backends import UNIT_ROWS_BACKENDS, KernelConfig
from ._dispatch import backend_module, flatten, fused_op, none_if_free_zeros, pair_inputs, unflatten, unit_kwargs


def _forward(
    anchors: Tensor, anchor_label: Tensor, anchor_index: Tensor, emb: Tensor, labels: Tensor,
    anchor_norm: Optional[Tensor], emb_norm: Optional[Tensor], order: Optional[Tensor], lam: float,
    codes: list[int], scalars: list[float], flags: list[int], backend: str,
) -> Tensor:
    return backend_module(backend).gram_mixed_forward(
        anchors, anchor_label, anchor_index, emb, labels, lam, unflatten(codes, scalars, flags),
        **unit_kwargs(anchor_norm, emb_norm, order),
    )


def _forward_fake(anchors, *args):
    wide = anchors.dtype == torch.float64
    return anchors.new_empty((6, anchors.shape[0]), dtype=torch.float64 if wide else torch.float32)


def _backward_kernel(
    anchors: Tensor, anchor_label: Tensor, anchor_index: Tensor, emb: Tensor, labels: Tensor,
    anchor_norm: Optional[Tensor], emb_norm: Optional[Tensor], order: Optional[Tensor], lam: float,
    codes: list[int], scalars: list[float], flags: list[int], backend: str,
    stats: Tensor, grad_pos_sum: Tensor, grad_neg_sum: Tensor,
) -> tuple[Tensor, Tensor]:
    return backend_module(backend).gram_mixed_backward(
        anchors, anchor_label, anchor_index, emb, labels, lam, unflatten(codes, scalars, flags), stats,
        grad_pos_sum, grad_neg_sum, **unit_kwargs(anchor_norm, emb_norm, order),
    )


def _backward_fake(anchors, anchor_label, anchor_index, emb, *args):
    return torch.empty_like(anchors), torch.empty_like(emb)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:8], output)
    ctx.scalars = inputs[8:]


def _backward(ctx, grad_stats):
    *tensors, stats = ctx.saved_tensors
    grad = grad_stats.to(stats.dtype)
    grad_anchors, grad_emb = ctx.kernels.backward(*tensors, *ctx.scalars, stats, grad[0].contiguous(),
                                                  grad[1].contiguous())
    return (none_if_free_zeros(grad_anchors), None, None, none_if_free_zeros(grad_emb), *(None,) * 9)


_call = fused_op("metrix::gram_mixed", _forward, _forward_fake, _backward_kernel, _backward_fake, _setup_context,
                 _backward)


def gram_mixed(anchors: Tensor, anchor_label: Tensor, anchor_index: Tensor, emb: Tensor, labels: Tensor,
               lam: float, cfg: KernelConfig, backend: str, order: Optional[Tensor] = None) -> Tensor:
    """Statistics [6, A] of the L2-normalized anchors against every mix of the L2-normalized emb in cfg's
    pair set (anchor_index -1 for proxies); no mixed embedding is formed.

    With order (int64 [B], a permutation), the op takes emb's rows in that order: position p is row
    order[p], and labels (anchor_label too, when anchors is emb) are by position. Backends that
    normalize rows themselves read the rows through it, others get a permuted copy.
    """
    if order is not None and backend not in UNIT_ROWS_BACKENDS:
        same = anchors is emb
        emb, order = emb[order], None
        anchors = emb if same else anchors
    anchors, emb, anchor_norm, emb_norm = pair_inputs(backend, anchors, emb)
    return _call(anchors, anchor_label, anchor_index, emb, labels, anchor_norm, emb_norm, order, float(lam),
                 *flatten(cfg), backend)
