"""The fused feature-mixup op: pool(lam * f_i + (1 - lam) * f_j) for pairs (i, j), pooled = mean + max."""
from __future__ import annotations

import torch
from torch import Tensor

from ._dispatch import backend_module, fused_op


def _forward(features: Tensor, i: Tensor, j: Tensor, lam: float, backend: str) -> tuple[Tensor, Tensor]:
    return backend_module(backend).mixpool_forward(features, i, j, lam)


def _forward_fake(features, i, j, lam, backend):
    shape = (i.shape[0], features.shape[1])
    argmax_dtype = getattr(backend_module(backend), "mixpool_argmax_dtype", lambda positions: torch.int32)
    positions = features.shape[2] * features.shape[3]
    return features.new_empty(shape), features.new_empty(shape, dtype=argmax_dtype(positions))


def _backward_kernel(grad_pooled: Tensor, features: Tensor, i: Tensor, j: Tensor, lam: float, argmax: Tensor,
                     backend: str) -> Tensor:
    return backend_module(backend).mixpool_backward(grad_pooled, features, i, j, lam, argmax)


def _backward_fake(grad_pooled, features, *args):
    return torch.empty_like(features)


def _setup_context(ctx, inputs, output):
    features, i, j, lam, backend = inputs
    ctx.save_for_backward(features, i, j, output[1])
    ctx.lam, ctx.backend = lam, backend
    # argmax has no gradient: without these, backward would first fill an [M, C] zero tensor for it
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_pooled, grad_argmax):
    features, i, j, argmax = ctx.saved_tensors
    return ctx.kernels.backward(grad_pooled, features, i, j, ctx.lam, argmax, ctx.backend), None, None, None, None


_call = fused_op("metrix::mixpool", _forward, _forward_fake, _backward_kernel, _backward_fake, _setup_context,
                 _backward)


def mixpool(features: Tensor, i: Tensor, j: Tensor, lam: float, backend: str) -> Tensor:
    """Pooled mixed features [M, C] of [B, C, H, W] maps, the mixed maps never formed."""
    return _call(features.contiguous(), i.contiguous(), j.contiguous(), float(lam), backend)[0]
