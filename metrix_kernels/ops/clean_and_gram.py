"""The error function's clean and Gram statistics of one batch as one op, for backends that have it
(clean_and_gram_forward / _backward: UNIT_ROWS_BACKENDS): one autograd node, so that the two backward
passes write one [B, d] gradient instead of two that autograd then adds."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..backends import KernelConfig
from ._dispatch import backend_module, flatten, fused_op, row_norms, unflatten


def _forward(
    emb: Tensor, labels: Tensor, sorted_labels: Tensor, norm: Tensor, order: Optional[Tensor], lam: float,
    clean_codes: list[int], clean_scalars: list[float], clean_flags: list[int],
    mixed_codes: list[int], mixed_scalars: list[float], mixed_flags: list[int], backend: str,
) -> tuple[Tensor, Tensor]:
    clean_cfg = unflatten(clean_codes, clean_scalars, clean_flags)
    mixed_cfg = unflatten(mixed_codes, mixed_scalars, mixed_flags)
    return backend_module(backend).clean_and_gram_forward(emb, labels, sorted_labels, lam, clean_cfg, mixed_cfg,
                                                          norm=norm, order=order)


def _forward_fake(emb, *args):
    stats = emb.new_empty((6, emb.shape[0]), dtype=torch.float32)
    return stats, torch.empty_like(stats)


def _backward_kernel(
    emb: Tensor, labels: Tensor, sorted_labels: Tensor, norm: Tensor, order: Optional[Tensor], lam: float,
    clean_codes: list[int], clean_scalars: list[float], clean_flags: list[int],
    mixed_codes: list[int], mixed_scalars: list[float], mixed_flags: list[int], backend: str,
    clean_stats: Tensor, mixed_stats: Tensor, clean_grad_pos: Tensor, clean_grad_neg: Tensor,
    mixed_grad_pos: Tensor, mixed_grad_neg: Tensor,
) -> Tensor:
    clean_cfg = unflatten(clean_codes, clean_scalars, clean_flags)
    mixed_cfg = unflatten(mixed_codes, mixed_scalars, mixed_flags)
    return backend_module(backend).clean_and_gram_backward(
        emb, labels, sorted_labels, lam, clean_cfg, mixed_cfg, clean_stats, mixed_stats, clean_grad_pos,
        clean_grad_neg, mixed_grad_pos, mixed_grad_neg, norm=norm, order=order)


def _backward_fake(emb, *args):
    return torch.empty_like(emb)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:5], *output)
    ctx.scalars = inputs[5:]


def _term_grads(grad: Optional[Tensor], stats: Tensor) -> tuple[Tensor, Tensor]:
    grad = torch.zeros_like(stats) if grad is None else grad.to(stats.dtype)
    return grad[0].contiguous(), grad[1].contiguous()


def _backward(ctx, grad_clean, grad_mixed):
    *tensors, clean_stats, mixed_stats = ctx.saved_tensors
    grad = ctx.kernels.backward(*tensors, *ctx.scalars, clean_stats, mixed_stats, *_term_grads(grad_clean, clean_stats),
                                *_term_grads(grad_mixed, mixed_stats))
    return (grad, *(None,) * 12)


_call = fused_op("metrix::clean_and_gram", _forward, _forward_fake, _backward_kernel, _backward_fake, _setup_context,
                 _backward)


def clean_and_gram(emb: Tensor, labels: Tensor, sorted_labels: Tensor, order: Optional[Tensor], lam: float,
                   clean_cfg: KernelConfig, mixed_cfg: KernelConfig, backend: str) -> tuple[Tensor, Tensor]:
    """(pairwise(emb, emb) with clean_cfg, gram_mixed(emb, emb, order=order) with mixed_cfg): the clean
    statistics [6, B] of the L2-normalized batch against itself (labels, batch order) and the mixed
    ones of it against its mixes (sorted_labels, in order)."""
    emb = emb.contiguous()
    return _call(emb, labels, sorted_labels, row_norms(emb), order, float(lam), *flatten(clean_cfg),
                 *flatten(mixed_cfg), backend)
