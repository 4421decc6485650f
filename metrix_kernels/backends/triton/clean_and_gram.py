"""The clean pairwise statistics and the Gram op's mixed statistics of one batch, with one gradient.

Where the error function's clean and mixed losses both compare the batch with itself, separate ops
each hold a [B, d] gradient before autograd adds them; here both backward passes write into one
float32 buffer, taken through the normalization once, so the backward holds one gradient and one
chunk of derivatives (backends contract: clean_and_gram_forward / clean_and_gram_backward).
"""
from __future__ import annotations

import torch

from .common import interpretable
from .gram import add_gram_grads, gram_mixed_forward
from .pairwise import add_pairwise_grads, pairwise_forward
from .unit_rows import through_norms_


def clean_and_gram_forward(emb, labels, sorted_labels, lam, clean_cfg, mixed_cfg, *, norm, order=None):
    positions = torch.arange(emb.shape[0], device=emb.device)
    clean = pairwise_forward(emb, labels, labels, positions, emb, labels, labels, positions, 1.0, clean_cfg,
                             norms=(norm, norm))
    mixed = gram_mixed_forward(emb, sorted_labels, positions, emb, sorted_labels, lam, mixed_cfg, norms=(norm, norm),
                               order=order)
    return clean, mixed


def clean_and_gram_backward(emb, labels, sorted_labels, lam, clean_cfg, mixed_cfg, clean_stats, mixed_stats,
                            clean_grad_pos, clean_grad_neg, mixed_grad_pos, mixed_grad_neg, *, norm, order=None):
    grad = torch.empty(emb.shape, device=emb.device, dtype=torch.float32)
    if emb.shape[0] == 0:
        return grad.to(emb.dtype)
    positions = torch.arange(emb.shape[0], device=emb.device)
    add_pairwise_grads(emb, labels, labels, positions, emb, labels, labels, positions, 1.0, clean_cfg, clean_stats,
                       clean_grad_pos, clean_grad_neg, None, (norm, norm), grad, grad)
    add_gram_grads(emb, sorted_labels, positions, emb, sorted_labels, lam, mixed_cfg, mixed_stats, mixed_grad_pos,
                   mixed_grad_neg, (norm, norm), order, grad, grad, accumulate=True)
    return through_norms_(grad, interpretable(emb), norm).to(emb.dtype)
