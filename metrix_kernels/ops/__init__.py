"""The fused loss: reference.clean_loss / mixed_loss / error_function rebuilt from fused ops + family.assemble.

Each op (pairwise, gram, mixpool; clean_and_gram, the error function's two pair ops over one batch
as one, where the backend has it) is a torch.library custom op with a fake implementation and an
autograd formula, and runs on the backend module named by ``backend`` (backends contract).
Nothing of size B x B or larger is allocated here, except input mixup's explicit [B, M] member mask
and the [M, d] mixes of embedding mixup under an explicit member mask (``_mixed_rows``) or, for
proxy-candidate losses, under torch.compile (``_mixes_by_blocks``). Feature and input mixup's
[M, d] mixed embeddings are the model's own outputs.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch.utils.checkpoint import checkpoint

from ..backends import (
    MEMBER_ALL,
    MEMBER_ALL_BUT_SELF,
    MEMBER_ANC_NEG,
    MEMBER_POS_NEG,
    MEMBER_RULES,
    LABEL_CODES,
    UNIT_ROWS_BACKENDS,
    KernelConfig,
)
from ..family import LossRow, Terms, TermStats, assemble
from ..pairs import MixPlan, check_mixed_embeddings
from ._dispatch import autocast_off, backend_module, first_order, normalize
from .clean_and_gram import clean_and_gram
from .gram import gram_mixed
from .mixpool import mixpool
from .pairwise import pairwise

__all__ = ["clean_loss", "error_function", "gram_mixed", "mixed_loss", "mixpool", "pairwise"]

# Elements of the block of embedding mixes that _mixes_by_blocks makes at a time (at least B rows).
MIX_BLOCK_ELEMENTS = 1 << 22


def _work_dtype(dtype: torch.dtype, backend: str) -> torch.dtype:
    """float64 is computed in float64 only by backends that declare FLOAT64 (the cpu one), else in
    float32; float32, float16 and bfloat16 stay as they are (float32 accumulation inside)."""
    if dtype == torch.float64 and not getattr(backend_module(backend), "FLOAT64", False):
        return torch.float32
    return dtype


def _config(row: LossRow, terms: Terms, member: int, plan: Optional[MixPlan] = None, mixed_rows=False):
    return KernelConfig(
        terms.sigma_pos, terms.sigma_neg, member,
        label_mode=LABEL_CODES[plan.label_mode] if plan is not None else LABEL_CODES["interpolate"],
        mixed_rows=mixed_rows, count_nonzero=row.reduction == "nonzero_pairs",
    )


class _Assembled(torch.autograd.Function):
    """_assemble by the backend's assemble_forward / assemble_backward (one launch each way)."""

    @staticmethod
    @autocast_off
    def forward(ctx, row, terms, weight, kernels, *stats):
        loss, divisors = kernels.assemble_forward(row, terms, stats, weight)
        ctx.save_for_backward(*stats, divisors)
        ctx.row, ctx.terms, ctx.weight, ctx.kernels = row, terms, weight, kernels
        return loss

    @staticmethod
    @first_order
    @autocast_off
    def backward(ctx, grad):
        *stats, divisors = ctx.saved_tensors
        grads = ctx.kernels.assemble_backward(ctx.row, ctx.terms, tuple(stats), ctx.weight, divisors, grad)
        return (None, None, None, None, *grads)


def _formula(row: LossRow, terms: Terms, stats: torch.Tensor) -> torch.Tensor:
    pos_sum, neg_sum, *counts = stats
    return assemble(row, terms, TermStats(pos_sum, neg_sum, *(c.detach() for c in counts)))


def _assemble(row: LossRow, terms: Terms, dtype, backend: str, first: torch.Tensor,
              second: Optional[torch.Tensor] = None, weight: float = 1.0) -> torch.Tensor:
    """family.assemble(first) + weight * family.assemble(second) from statistics [6, A]: by the
    backend's kernels where it has them (not in compiled code, which traces the formula), else by the
    formula under autograd (some fifty small ops per call), in one pass where the two have as many
    anchors (all but the proxy-candidate losses, whose mixed anchors are the mixed examples)."""
    kernels = None if torch.compiler.is_compiling() else backend_module(backend)
    stats = (first,) if second is None else (first, second)
    if hasattr(kernels, "assemble_forward"):
        return _Assembled.apply(row, terms, float(weight), kernels, *stats).to(dtype)
    if second is None:
        return _formula(row, terms, first).to(dtype)
    if row.candidates != "proxies":  # as many anchors (no shape test: compiled shapes may be data-dependent)
        both = _formula(row, terms, torch.stack(stats, 1))
        return (both[0] + weight * both[1]).to(dtype)
    return (_formula(row, terms, first) + weight * _formula(row, terms, second)).to(dtype)


def _proxy_side(proxies: torch.Tensor, dtype: torch.dtype):
    classes = torch.arange(proxies.shape[0], device=proxies.device)
    return proxies.to(dtype), classes, torch.full_like(classes, -1)


def clean_loss(row: LossRow, terms: Terms, embeddings, labels, proxies, backend: str) -> torch.Tensor:
    """reference.clean_loss on a fused backend."""
    e = embeddings.to(_work_dtype(embeddings.dtype, backend))
    return _assemble(row, terms, embeddings.dtype, backend, _clean_stats(row, terms, e, labels, proxies, backend))


def mixed_loss(
    row: LossRow, terms: Terms, embeddings, labels, proxies, plan: MixPlan, mixup: str = "embedding",
    features=None, head: Optional[Callable] = None, inputs=None, model: Optional[Callable] = None,
    backend: str = "triton",
) -> torch.Tensor:
    """reference.mixed_loss on a fused backend.

    Embedding mixup without an explicit member mask reads only plan.lam, plan.pair_set and
    plan.label_mode: the Gram op enumerates the pairs itself, so plan.i / plan.j are never listed.
    """
    e, e_labels, order = _batch(row, embeddings, labels, plan, mixup, backend)
    stats = _mixed_stats(row, terms, e, e_labels, order, labels, proxies, plan, mixup, features, head, inputs, model,
                         backend)
    return _assemble(row, terms, embeddings.dtype, backend, stats)


def error_function(
    row: LossRow, terms: Terms, embeddings, labels, proxies, plan: MixPlan, mixup: str, features=None,
    head: Optional[Callable] = None, inputs=None, model: Optional[Callable] = None, weight: float = 0.4,
    backend: str = "triton",
) -> torch.Tensor:
    """reference.error_function on a fused backend: clean_loss + weight * mixed_loss, the two assembled
    together."""
    e, e_labels, order = _batch(row, embeddings, labels, plan, mixup, backend)
    if backend in UNIT_ROWS_BACKENDS and row.anchors != "proxies" and _by_gram(row, plan, mixup):
        # the batch against itself, clean and mixed: one op, one [B, d] gradient
        clean, mixed = clean_and_gram(e, labels, e_labels, order, plan.lam, _config(row, terms, MEMBER_ALL_BUT_SELF),
                                      _config(row, terms, MEMBER_RULES[plan.pair_set], plan), backend)
    else:
        clean = _clean_stats(row, terms, e, labels, proxies, backend)
        mixed = _mixed_stats(row, terms, e, e_labels, order, labels, proxies, plan, mixup, features, head, inputs,
                             model, backend)
    return _assemble(row, terms, embeddings.dtype, backend, clean, mixed, weight)


def _by_gram(row: LossRow, plan: MixPlan, mixup: str) -> bool:
    """Whether the mixed loss runs on the Gram op: embedding mixup, anchors against mixed candidates, over
    every pair of the set (a plan that lists its pairs per anchor, with a member mask, mixes them
    explicitly)."""
    return mixup == "embedding" and row.candidates != "proxies" and plan.member is None


def _batch(row: LossRow, embeddings, labels, plan: MixPlan, mixup: str, backend: str):
    """(the batch in the backend's dtype, the labels in the Gram op's order, that order or None). The
    Gram op takes pos-neg / anc-neg pairs grouped by class: ordered pairs, so the order changes no pair
    and no sum over anchors, and the kernel then skips whole tiles without a member (pos-pos / neg-neg
    put lam on the first of i < j, so their batch order matters and is kept). The op reads the batch
    through the order; no sorted copy is made where the backend can (gram_mixed)."""
    order = None
    if _by_gram(row, plan, mixup) and plan.pair_set in ("pos-neg", "anc-neg"):
        order = torch.argsort(labels, stable=True)
        labels = labels[order]
    return embeddings.to(_work_dtype(embeddings.dtype, backend)), labels, order


def _clean_stats(row: LossRow, terms: Terms, e, labels, proxies, backend: str) -> torch.Tensor:
    """The clean loss's statistics [6, A] from the batch e (the pair ops normalize it)."""
    index = torch.arange(labels.shape[0], device=labels.device)
    if row.anchors == "proxies":
        p, classes, none = _proxy_side(proxies, e.dtype)
        return pairwise(p, (classes, classes), none, e, (labels, labels), index, 1.0,
                        _config(row, terms, MEMBER_ALL), backend)
    if row.candidates == "proxies":
        p, classes, none = _proxy_side(proxies, e.dtype)
        return pairwise(e, (labels, labels), index, p, (classes, classes), none, 1.0,
                        _config(row, terms, MEMBER_ALL), backend)
    return pairwise(e, (labels, labels), index, e, (labels, labels), index, 1.0,
                    _config(row, terms, MEMBER_ALL_BUT_SELF), backend)


def _mixed_rows(mixup, plan, e, features, head, inputs, model, backend) -> torch.Tensor:
    """The [M, d] mixed embeddings, before normalization (embedding mixup: mixes of the unit rows of the
    batch e, here only for an explicit member mask)."""
    if mixup == "embedding":
        return _mix(normalize(e, e.dtype, backend), plan.lam, plan.i, plan.j)
    if mixup == "feature":
        m, maker = head(mixpool(features, plan.i, plan.j, plan.lam, backend)), "head"
    else:
        m, maker = model(_mix(inputs, plan.lam, plan.i, plan.j)), "model"
    check_mixed_embeddings(m, plan.i.shape[0], e, maker)
    return m.to(e.dtype)


def _mix(x: torch.Tensor, lam: float, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """lam * x[i] + (1 - lam) * x[j]. index_select's gradient is an index_add, where indexing's is an
    accumulating index_put; lerp is one op for three."""
    return torch.lerp(x.index_select(0, j), x.index_select(0, i), lam)


def _mixes_by_blocks(stats: Callable, unit: torch.Tensor, p: torch.Tensor, plan: MixPlan) -> torch.Tensor:
    """stats(mixes, p, i, j) [6, rows] of the embedding mixes of the unit rows over plan's pairs, joined.
    The mixes are made a block of rows at a time and, when there are several blocks, made again in the
    backward pass (activation checkpointing), so that one [rows, d] block exists at a time, not all
    [M, d] (M grows as B^2). The cost: the blocks' forward pass runs twice."""

    def block(unit, p, i, j):
        return stats(_mix(unit, plan.lam, i, j), p, i, j)

    rows = max(unit.shape[0], MIX_BLOCK_ELEMENTS // max(unit.shape[1], 1))
    # under torch.compile M is data-dependent: one block, which the compiler plans; one block is also
    # kept for the backward pass rather than made again, as it costs no more memory than a block
    if torch.compiler.is_compiling() or plan.i.shape[0] <= rows:
        return block(unit, p, plan.i, plan.j)
    return torch.cat([checkpoint(block, unit, p, plan.i[s:s + rows], plan.j[s:s + rows], use_reentrant=False)
                      for s in range(0, plan.i.shape[0], rows)], dim=1)


def _mixed_stats(row: LossRow, terms: Terms, e, e_labels, order, labels, proxies, plan: MixPlan, mixup: str, features,
                 head, inputs, model, backend: str) -> torch.Tensor:
    """The mixed loss's statistics [6, A] from the batch e (the Gram op takes it in order, where given,
    with labels e_labels in that order); labels are the batch's own, that plan.i / plan.j index."""
    if row.candidates == "proxies":
        # the mixed examples are the anchors; every proxy is a candidate with a soft label
        p, classes, none = _proxy_side(proxies, e.dtype)
        cfg = _config(row, terms, MEMBER_ALL, plan, mixed_rows=True)

        def against_proxies(m, p, i, j):
            return pairwise(m, (labels[i], labels[j]), i, p, (classes, classes), none, plan.lam, cfg, backend)

        if mixup == "embedding":
            return _mixes_by_blocks(against_proxies, normalize(e, e.dtype, backend), p, plan)
        return against_proxies(_mixed_rows(mixup, plan, e, features, head, inputs, model, backend), p, plan.i, plan.j)
    rule = MEMBER_RULES[plan.pair_set]
    if row.anchors == "proxies":
        # a proxy stands for its whole class: anc-neg is pos-neg, and no per-anchor mask applies
        anchors, anchor_labels, anchor_index = _proxy_side(proxies, e.dtype)
        rule = MEMBER_POS_NEG if rule == MEMBER_ANC_NEG else rule
        member_mask = None
    else:
        anchors, anchor_labels = e, e_labels
        anchor_index = torch.arange(labels.shape[0], device=labels.device)
        member_mask = plan.member
    cfg = _config(row, terms, rule, plan)
    if _by_gram(row, plan, mixup):
        return gram_mixed(anchors, anchor_labels, anchor_index, e, e_labels, plan.lam, cfg, backend, order)
    m = _mixed_rows(mixup, plan, e, features, head, inputs, model, backend)
    return pairwise(anchors, (anchor_labels, anchor_labels), anchor_index, m, (labels[plan.i], labels[plan.j]),
                    plan.i, plan.lam, cfg, backend, member_mask=member_mask)
