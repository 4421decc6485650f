"""The fused loss: reference.clean_loss / reference.mixed_loss rebuilt from fused ops + family.assemble.

Each op (pairwise, gram, mixpool) is a torch.library custom op with a fake implementation and an
autograd formula, and runs on the backend module named by ``backend`` (backends contract).
Nothing of size B x B or larger is allocated here, except the [M, d] mixed rows that proxy-candidate
losses need under embedding mixup (``_mixed_rows``) and input mixup's explicit [B, M] member mask.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ..backends import (
    MEMBER_ALL,
    MEMBER_ALL_BUT_SELF,
    MEMBER_ANC_NEG,
    MEMBER_POS_NEG,
    MEMBER_RULES,
    LABEL_CODES,
    KernelConfig,
)
from ..family import LossRow, Terms, TermStats, assemble
from ..pairs import MixPlan
from ._dispatch import backend_module
from .gram import gram_mixed
from .mixpool import mixpool
from .pairwise import pairwise

__all__ = ["clean_loss", "gram_mixed", "mixed_loss", "mixpool", "pairwise"]


def _work_dtype(dtype: torch.dtype, backend: str) -> torch.dtype:
    """float64 is computed in float64 only by backends that declare FLOAT64 (the cpu one), else in
    float32; float32, float16 and bfloat16 stay as they are (float32 accumulation inside)."""
    if dtype == torch.float64 and not getattr(backend_module(backend), "FLOAT64", False):
        return torch.float32
    return dtype


class _UnitRows(torch.autograd.Function):
    """F.normalize(x, dim=-1), eps 1e-12, with a backward of two passes over x (autograd through
    F.normalize takes about eight, a cost that shows on the [M, d] mixed rows)."""

    @staticmethod
    def forward(ctx, x):
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min_(1e-12)
        y = x / norm
        ctx.save_for_backward(y, norm)
        return y

    @staticmethod
    def backward(ctx, grad):
        y, norm = ctx.saved_tensors
        # d y / d x = (I - y y^T) / |x|, or I / eps where the norm is clamped (as torch's clamp_min)
        along = torch.linalg.vecdot(grad, y, dim=-1).unsqueeze(-1) * (norm > 1e-12)
        return torch.addcmul(grad, y, along, value=-1).div_(norm)


def _normalize(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return _UnitRows.apply(x.to(dtype))


def _config(row: LossRow, terms: Terms, member: int, plan: Optional[MixPlan] = None, mixed_rows=False):
    return KernelConfig(
        terms.sigma_pos, terms.sigma_neg, member,
        label_mode=LABEL_CODES[plan.label_mode] if plan is not None else LABEL_CODES["interpolate"],
        mixed_rows=mixed_rows, count_nonzero=row.reduction == "nonzero_pairs",
    )


def _assemble(row: LossRow, terms: Terms, stats: torch.Tensor, dtype) -> torch.Tensor:
    pos_sum, neg_sum, *counts = stats
    loss = assemble(row, terms, TermStats(pos_sum, neg_sum, *(c.detach() for c in counts)))
    return loss.to(dtype)


def _proxy_side(proxies: torch.Tensor, dtype: torch.dtype):
    classes = torch.arange(proxies.shape[0], device=proxies.device)
    return _normalize(proxies, dtype), classes, torch.full_like(classes, -1)


def clean_loss(row: LossRow, terms: Terms, embeddings, labels, proxies, backend: str) -> torch.Tensor:
    """reference.clean_loss on a fused backend."""
    work = _work_dtype(embeddings.dtype, backend)
    e = _normalize(embeddings, work)
    index = torch.arange(labels.shape[0], device=labels.device)
    if row.anchors == "proxies":
        p, classes, none = _proxy_side(proxies, e.dtype)
        stats = pairwise(p, (classes, classes), none, e, (labels, labels), index, 1.0,
                         _config(row, terms, MEMBER_ALL), backend)
    elif row.candidates == "proxies":
        p, classes, none = _proxy_side(proxies, e.dtype)
        stats = pairwise(e, (labels, labels), index, p, (classes, classes), none, 1.0,
                         _config(row, terms, MEMBER_ALL), backend)
    else:
        stats = pairwise(e, (labels, labels), index, e, (labels, labels), index, 1.0,
                         _config(row, terms, MEMBER_ALL_BUT_SELF), backend)
    return _assemble(row, terms, stats, embeddings.dtype)


def _mixed_rows(mixup, plan, embeddings, features, head, inputs, model, backend, work) -> torch.Tensor:
    """The normalized [M, d] mixed embeddings (feature and input mixup; embedding mixup only for
    proxy-candidate losses, whose anchors are the mixed examples themselves)."""
    if mixup == "embedding":
        e = _normalize(embeddings, work)
        return _normalize(plan.lam * e[plan.i] + (1.0 - plan.lam) * e[plan.j], work)
    if mixup == "feature":
        return _normalize(head(mixpool(features, plan.i, plan.j, plan.lam, backend)), work)
    return _normalize(model(plan.lam * inputs[plan.i] + (1.0 - plan.lam) * inputs[plan.j]), work)


def mixed_loss(
    row: LossRow, terms: Terms, embeddings, labels, proxies, plan: MixPlan, mixup: str = "embedding",
    features=None, head: Optional[Callable] = None, inputs=None, model: Optional[Callable] = None,
    backend: str = "triton",
) -> torch.Tensor:
    """reference.mixed_loss on a fused backend.

    Embedding mixup without an explicit member mask reads only plan.lam, plan.pair_set and
    plan.label_mode: the Gram op enumerates the pairs itself, so plan.i / plan.j are never listed.
    """
    work = _work_dtype(embeddings.dtype, backend)
    if row.candidates == "proxies":
        # the mixed examples are the anchors; every proxy is a candidate with a soft label
        m = _mixed_rows(mixup, plan, embeddings, features, head, inputs, model, backend, work)
        p, classes, none = _proxy_side(proxies, m.dtype)
        stats = pairwise(m, (labels[plan.i], labels[plan.j]), plan.i, p, (classes, classes), none, plan.lam,
                         _config(row, terms, MEMBER_ALL, plan, mixed_rows=True), backend)
        return _assemble(row, terms, stats, embeddings.dtype)
    rule = MEMBER_RULES[plan.pair_set]
    e = _normalize(embeddings, work)
    if row.anchors == "proxies":
        # a proxy stands for its whole class: anc-neg is pos-neg, and no per-anchor mask applies
        anchors, anchor_labels, anchor_index = _proxy_side(proxies, e.dtype)
        rule = MEMBER_POS_NEG if rule == MEMBER_ANC_NEG else rule
        member_mask = None
    else:
        anchors, anchor_labels = e, labels
        anchor_index = torch.arange(labels.shape[0], device=labels.device)
        member_mask = plan.member
    cfg = _config(row, terms, rule, plan)
    if mixup == "embedding" and member_mask is None:
        if plan.pair_set in ("pos-neg", "anc-neg"):
            # Ordered pairs: grouping the batch by class changes no pair and no sum over anchors,
            # and lets the Gram kernel skip whole tiles without a member. (pos-pos / neg-neg put
            # lam on the first of i < j, so their batch order matters and is kept.)
            order = torch.argsort(labels, stable=True)
            e, labels = e[order], labels[order]
            if row.anchors == "examples":
                anchors, anchor_labels = e, labels
        stats = gram_mixed(anchors, anchor_labels, anchor_index, e, labels, plan.lam, cfg, backend)
    else:
        m = _mixed_rows(mixup, plan, embeddings, features, head, inputs, model, backend, work)
        stats = pairwise(anchors, (anchor_labels, anchor_labels), anchor_index, m, (labels[plan.i], labels[plan.j]),
                         plan.i, plan.lam, cfg, backend, member_mask=member_mask)
    return _assemble(row, terms, stats, embeddings.dtype)
