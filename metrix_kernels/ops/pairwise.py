"""The fused pairwise op: per-row term statistics of unit rows x unit cols with in-kernel pair weights."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..backends import KernelConfig
from ._dispatch import backend_module, flatten, fused_op, none_if_free_zeros, pair_inputs, unflatten, unit_kwargs


def _forward(
    rows: Tensor, row_label_i: Tensor, row_label_j: Tensor, row_index: Tensor,
    cols: Tensor, col_label_i: Tensor, col_label_j: Tensor, col_index: Tensor,
    member_mask: Optional[Tensor], row_norm: Optional[Tensor], col_norm: Optional[Tensor],
    lam: float, codes: list[int], scalars: list[float], flags: list[int], backend: str,
) -> Tensor:
    return backend_module(backend).pairwise_forward(
        rows, row_label_i, row_label_j, row_index, cols, col_label_i, col_label_j, col_index, lam,
        unflatten(codes, scalars, flags), member_mask=member_mask, **unit_kwargs(row_norm, col_norm),
    )


def _forward_fake(rows, *args):
    return rows.new_empty((6, rows.shape[0]), dtype=torch.float64 if rows.dtype == torch.float64 else torch.float32)


def _backward_kernel(
    rows: Tensor, row_label_i: Tensor, row_label_j: Tensor, row_index: Tensor,
    cols: Tensor, col_label_i: Tensor, col_label_j: Tensor, col_index: Tensor,
    member_mask: Optional[Tensor], row_norm: Optional[Tensor], col_norm: Optional[Tensor],
    lam: float, codes: list[int], scalars: list[float], flags: list[int], backend: str,
    stats: Tensor, grad_pos_sum: Tensor, grad_neg_sum: Tensor,
) -> tuple[Tensor, Tensor]:
    return backend_module(backend).pairwise_backward(
        rows, row_label_i, row_label_j, row_index, cols, col_label_i, col_label_j, col_index, lam,
        unflatten(codes, scalars, flags), stats, grad_pos_sum, grad_neg_sum, member_mask=member_mask,
        **unit_kwargs(row_norm, col_norm),
    )


def _backward_fake(rows, row_label_i, row_label_j, row_index, cols, *args):
    return torch.empty_like(rows), torch.empty_like(cols)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:11], output)
    ctx.scalars = inputs[11:]


def _backward(ctx, grad_stats):
    *tensors, stats = ctx.saved_tensors
    grad = grad_stats.to(stats.dtype)
    grad_rows, grad_cols = ctx.kernels.backward(*tensors, *ctx.scalars, stats, grad[0].contiguous(),
                                                grad[1].contiguous())
    return (none_if_free_zeros(grad_rows), None, None, None, none_if_free_zeros(grad_cols), *(None,) * 11)


_call = fused_op("metrix::pairwise", _forward, _forward_fake, _backward_kernel, _backward_fake, _setup_context,
                 _backward)


def pairwise(
    rows: Tensor, row_labels: tuple[Tensor, Tensor], row_index: Tensor,
    cols: Tensor, col_labels: tuple[Tensor, Tensor], col_index: Tensor,
    lam: float, cfg: KernelConfig, backend: str, member_mask: Optional[Tensor] = None,
) -> Tensor:
    """Statistics [6, R] (backends contract) of the L2-normalized rows against the L2-normalized cols.

    *_labels are (label_i, label_j) of each side (equal for a clean side); gradients reach rows
    and cols through the normalization and the statistics' two term sums.
    """
    rows, cols, row_norm, col_norm = pair_inputs(backend, rows, cols)
    return _call(rows, *row_labels, row_index, cols, *col_labels, col_index, member_mask, row_norm, col_norm,
                 float(lam), *flatten(cfg), backend)
