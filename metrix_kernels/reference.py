"""The oracle: the mathematics of SPEC section 1 in plain PyTorch.

It materializes every mixed embedding and every similarity, builds the label and membership
matrices, and lets autograd differentiate. Clarity over speed: every fused path is tested
against these functions.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .family import LossRow, Terms, TermStats, assemble
from .pairs import MixPlan, check_mixed_embeddings, rule_member, soft_labels


def normalize(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)


def term_stats(sim: torch.Tensor, pos_w: torch.Tensor, neg_w: torch.Tensor, terms: Terms) -> TermStats:
    """Per-anchor term statistics (family.TermStats) from a materialized [A, V] similarity matrix."""
    pos_sum, pos_nnz = _term(sim, pos_w, terms.sigma_pos)
    neg_sum, neg_nnz = _term(sim, neg_w, terms.sigma_neg)
    return TermStats(pos_sum, neg_sum, pos_w.sum(1), neg_w.sum(1), pos_nnz, neg_nnz)


def _term(sim, w, sigma):
    x = sigma.argument(sim)
    used = w > 0
    if sigma.form == "exp":
        # log sum_v w exp(x_v), shifted by the row maximum; -inf for a row without weight,
        # arranged so that neither value nor gradient becomes NaN.
        z = torch.where(used, x, torch.full_like(x, -math.inf))
        shift = z.max(dim=1).values.detach() if z.shape[1] else z.new_zeros(z.shape[0])
        shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
        total = (w * torch.exp(z - shift[:, None])).sum(1)
        empty = ~used.any(1)
        log_total = shift + torch.log(torch.where(empty, torch.ones_like(total), total))
        value = torch.where(empty, torch.full_like(total, -math.inf), log_total)
        return value, used.sum(1)
    per_pair = sigma.value(x)
    return (w * per_pair).sum(1), (used & (per_pair > 0)).sum(1)


def _roles(row: LossRow, embeddings: torch.Tensor, proxies: Optional[torch.Tensor]):
    """(anchors, candidates) for the clean loss, normalized."""
    e = normalize(embeddings)
    if row.anchors == "proxies":
        return normalize(proxies), e
    if row.candidates == "proxies":
        return e, normalize(proxies)
    return e, e


def clean_loss(
    row: LossRow, terms: Terms, embeddings: torch.Tensor, labels: torch.Tensor, proxies: Optional[torch.Tensor]
) -> torch.Tensor:
    """The clean loss (eq. 3) with the row's reduction."""
    anchors, candidates = _roles(row, embeddings, proxies)
    sim = anchors @ candidates.T
    if row.uses_proxies:
        classes = torch.arange(proxies.shape[0], device=labels.device)
        anchor_labels, cand_labels = (classes, labels) if row.anchors == "proxies" else (labels, classes)
        pos = anchor_labels[:, None] == cand_labels[None, :]
        valid = torch.ones_like(pos)
    else:
        pos = labels[:, None] == labels[None, :]
        valid = ~torch.eye(labels.shape[0], dtype=torch.bool, device=labels.device)
    pos_w = (pos & valid).to(sim.dtype)
    neg_w = (~pos & valid).to(sim.dtype)
    return assemble(row, terms, term_stats(sim, pos_w, neg_w, terms))


def mix_embeddings(embeddings: torch.Tensor, plan: MixPlan) -> torch.Tensor:
    """Embedding mixup: lam * e_i + (1 - lam) * e_j of the normalized embeddings."""
    e = normalize(embeddings)
    return plan.lam * e[plan.i] + (1.0 - plan.lam) * e[plan.j]


def pool(features: torch.Tensor) -> torch.Tensor:
    """Global average + global max pooling of [N, C, H, W] maps (the paper's, after Kim et al.)."""
    return features.mean(dim=(2, 3)) + features.amax(dim=(2, 3))


def mix_features(features: torch.Tensor, plan: MixPlan) -> torch.Tensor:
    """Feature mixup's pooled mixed features [M, C]: pool(lam * h_i + (1 - lam) * h_j)."""
    return pool(plan.lam * features[plan.i] + (1.0 - plan.lam) * features[plan.j])


def mix_inputs(inputs: torch.Tensor, plan: MixPlan) -> torch.Tensor:
    """Input mixup: lam * x_i + (1 - lam) * x_j."""
    return plan.lam * inputs[plan.i] + (1.0 - plan.lam) * inputs[plan.j]


def mixed_embeddings(
    mixup: str,
    plan: MixPlan,
    embeddings: torch.Tensor,
    features: Optional[torch.Tensor] = None,
    head: Optional[Callable] = None,
    inputs: Optional[torch.Tensor] = None,
    model: Optional[Callable] = None,
) -> torch.Tensor:
    """The [M, d] mixed embeddings of a plan, by mixup type (eq. 4)."""
    if mixup == "embedding":
        return mix_embeddings(embeddings, plan)
    if mixup == "feature":
        m, maker = head(mix_features(features, plan)), "head"
    else:
        m, maker = model(mix_inputs(inputs, plan)), "model"
    check_mixed_embeddings(m, plan.i.shape[0], embeddings, maker)
    return m


def mixed_loss(
    row: LossRow,
    terms: Terms,
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    proxies: Optional[torch.Tensor],
    plan: MixPlan,
    mixup: str = "embedding",
    features: Optional[torch.Tensor] = None,
    head: Optional[Callable] = None,
    inputs: Optional[torch.Tensor] = None,
    model: Optional[Callable] = None,
) -> torch.Tensor:
    """The mixed loss (eq. 9) over the mixed examples of ``plan``, materialized."""
    m = normalize(mixed_embeddings(mixup, plan, embeddings, features, head, inputs, model))
    label_i, label_j = labels[plan.i], labels[plan.j]
    if row.candidates == "proxies":
        # the mixed embedding is the anchor; proxy c has label lam [y_i = c] + (1 - lam) [y_j = c]
        classes = torch.arange(proxies.shape[0], device=labels.device)
        y = soft_labels(classes, label_i, label_j, plan.lam, plan.label_mode, m.dtype).T
        sim = m @ normalize(proxies).T
        return assemble(row, terms, term_stats(sim, y, 1.0 - y, terms))
    if row.anchors == "proxies":
        anchors = normalize(proxies)
        anchor_labels = torch.arange(proxies.shape[0], device=labels.device)
        anchor_index = None
    else:
        anchors = normalize(embeddings)
        anchor_labels = labels
        anchor_index = torch.arange(labels.shape[0], device=labels.device)
    member = plan.member
    if member is None or anchor_index is None:
        member = rule_member(plan.pair_set, anchor_labels, anchor_index, label_i, label_j, plan.i)
    member = member.to(m.dtype)
    y = soft_labels(anchor_labels, label_i, label_j, plan.lam, plan.label_mode, m.dtype)
    sim = anchors @ m.T
    return assemble(row, terms, term_stats(sim, member * y, member * (1.0 - y), terms))


def error_function(
    row: LossRow,
    terms: Terms,
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    proxies: Optional[torch.Tensor],
    plan: MixPlan,
    mixup: str,
    features: Optional[torch.Tensor] = None,
    head: Optional[Callable] = None,
    inputs: Optional[torch.Tensor] = None,
    model: Optional[Callable] = None,
    weight: float = 0.4,
) -> torch.Tensor:
    """The Metrix error function E = clean loss + weight * mixed loss (eq. 10)."""
    clean = clean_loss(row, terms, embeddings, labels, proxies)
    return clean + weight * mixed_loss(row, terms, embeddings, labels, proxies, plan, mixup, features, head, inputs,
                                       model)
