"""Mixing pairs, the interpolation factor and the soft labels of mixed examples (SPEC 1.3).

A mixed example is a pair (i, j) of batch indices mixed with factor lam on i. For an anchor a of
class y_a its label is  y = lam * [y_i == y_a] + (1 - lam) * [y_j == y_a]  and it belongs to the
anchor's mixing set M(a) by the rule of the pair set:

    pos-neg   y_i == y_a, y_j != y_a       (i ranges over the positives and the anchor itself)
    anc-neg   i == a,     y_j != y_a
    pos-pos   y_i == y_a, y_j == y_a       (unordered, i < j)
    neg-neg   y_i != y_a, y_j != y_a       (unordered, i < j)

The pairs of a whole batch (``batch_pairs``) are the union of M(a) over its anchors. When proxies
are the anchors, a proxy stands for its whole class, so anc-neg means the same as pos-neg there.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .family import is_real

PAIR_SETS = ("pos-neg", "anc-neg", "pos-pos", "neg-neg")
DEFAULT_PAIRS = "pos-neg/anc-neg"  # the paper's default: one of the two, drawn per call
LABEL_MODES = ("interpolate", "negative", "dominant")

# The comparison methods of the paper's Table 3 (run there with the contrastive loss), as metrix_loss
# keyword presets.
METHODS = {
    "metrix": {"pairs": DEFAULT_PAIRS, "label_mode": "interpolate"},
    # MoCHi (Kalantidis et al. 2020): mixed embeddings are negatives whatever lam, made of each anchor's
    # hardest negatives only (paper, sec. 4.2).
    "mochi-anc-neg": {"mixup": "embedding", "pairs": "anc-neg", "label_mode": "negative", "mix_hardest": True},
    "mochi-neg-neg": {"mixup": "embedding", "pairs": "neg-neg", "label_mode": "negative", "mix_hardest": True},
    # i-Mix (Lee et al. 2021): anchor-negative input mixup, labels interpolated linearly (paper, sec. 2
    # and 4.2); Metrix/input differs by its pair set, pos-neg or anc-neg drawn per call.
    "i-mix": {"mixup": "input", "pairs": "anc-neg", "label_mode": "interpolate"},
}


class MixPlan:
    """The mixed examples of one call: pairs (i, j) mixed with lam on i.

    Pass i = j = None with ``labels`` to mean every pair of ``pair_set`` (``batch_pairs``): they are
    listed only when read, so a fused embedding-mixup path, which enumerates them in the kernel,
    never allocates the O(B^2) index lists. ``member`` is an explicit [B, M] anchor-membership mask
    when the pairs were chosen per anchor (input mixup's hard negatives); None means the rule of
    ``pair_set`` decides.
    """

    def __init__(self, i, j, lam: float, pair_set: str, label_mode: str, member=None, labels=None):
        if i is None and labels is None:
            raise ValueError("MixPlan needs the pairs (i, j) or the labels to list them from")
        self._pairs = None if i is None else (i, j)
        self._labels = labels
        self.lam, self.pair_set, self.label_mode, self.member = lam, pair_set, label_mode, member

    @property
    def i(self) -> torch.Tensor:
        return self._listed()[0]

    @property
    def j(self) -> torch.Tensor:
        return self._listed()[1]

    def _listed(self):
        if self._pairs is None:
            self._pairs = batch_pairs(self._labels, self.pair_set)
        return self._pairs


def check_mixed_embeddings(m, count: int, embeddings: torch.Tensor, maker: str) -> None:
    """What ``maker`` (feature mixup's head, input mixup's model) returned for the ``count`` mixed
    examples must be their embeddings, [count, d] like the batch's: the fused kernels index it by
    the pairs and would read past a shorter or narrower tensor."""
    width = embeddings.shape[1]
    if not isinstance(m, torch.Tensor) or m.ndim != 2 or m.shape[0] != count or m.shape[1] != width:
        got = tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__
        raise ValueError(f"{maker} must return the embeddings of the {count} mixed examples, [{count}, {width}] "
                         f"like the batch's, got {got}")
    if m.device != embeddings.device or not m.dtype.is_floating_point:
        raise ValueError(f"{maker} must return floating-point embeddings on {embeddings.device}, "
                         f"got {m.dtype} on {m.device}")


def check_pair_set(pairs: str) -> None:
    if pairs != DEFAULT_PAIRS and pairs not in PAIR_SETS:
        raise ValueError(f"unknown pairs {pairs!r}; expected one of {[DEFAULT_PAIRS, *PAIR_SETS]}")


def check_label_mode(label_mode: str) -> None:
    if label_mode not in LABEL_MODES:
        raise ValueError(f"unknown label_mode {label_mode!r}; expected one of {list(LABEL_MODES)}")


def choose_pair_set(pairs: str, generator: Optional[torch.Generator] = None) -> str:
    """Resolve the paper's default "pos-neg/anc-neg" to one of the two, uniformly at random."""
    check_pair_set(pairs)
    if pairs != DEFAULT_PAIRS:
        return pairs
    pick = torch.randint(2, (1,), generator=generator).item()
    return ("pos-neg", "anc-neg")[pick]


def _uniform(generator: Optional[torch.Generator]) -> float:
    return torch.rand((), generator=generator, dtype=torch.float64).item()


def _gamma(shape: float, generator: Optional[torch.Generator]) -> float:
    """Gamma(shape, 1) by Marsaglia and Tsang, driven by ``generator`` (torch's samplers take none)."""
    if shape < 1.0:
        return _gamma(shape + 1.0, generator) * _uniform(generator) ** (1.0 / shape)
    d = shape - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    while True:
        z = torch.randn((), generator=generator, dtype=torch.float64).item()
        v = (1.0 + c * z) ** 3
        if v <= 0:
            continue
        u = _uniform(generator)
        if u > 0 and math.log(u) < 0.5 * z * z + d - d * v + d * math.log(v):
            return d * v


def sample_lam(mix_alpha: float, generator: Optional[torch.Generator] = None) -> float:
    """lam ~ Beta(mix_alpha, mix_alpha), one per call."""
    if not (is_real(mix_alpha) and mix_alpha > 0 and math.isfinite(mix_alpha)):
        raise ValueError(f"mix_alpha must be a finite number > 0, got {mix_alpha!r}")
    x = _gamma(float(mix_alpha), generator)
    y = _gamma(float(mix_alpha), generator)
    return x / (x + y) if x + y > 0 else 0.5


def batch_pairs(labels: torch.Tensor, pair_set: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The pairs (i, j) ``pair_set`` may mix: ordered pairs of different classes for pos-neg and
    anc-neg, unordered same-class pairs for pos-pos, every unordered pair for neg-neg.

    Which anchor mixes which pair is the membership rule's business (``rule_member``). Proxy-candidate
    losses have no anchor class: there every listed pair is a mixed anchor with interpolated labels.
    """
    b = labels.shape[0]
    if pair_set in ("pos-neg", "anc-neg"):
        keep = labels[:, None] != labels[None, :]
    else:
        keep = torch.ones(b, b, dtype=torch.bool, device=labels.device).triu_(1)
        if pair_set == "pos-pos":
            keep &= labels[:, None] == labels[None, :]
    i, j = keep.nonzero().unbind(1)  # row-major: by i, then j
    return i, j


def rule_member(
    pair_set: str,
    anchor_labels: torch.Tensor,
    anchor_index: Optional[torch.Tensor],
    label_i: torch.Tensor,
    label_j: torch.Tensor,
    i: torch.Tensor,
) -> torch.Tensor:
    """[A, M] mask of which mixed pairs belong to each anchor's mixing set (module docstring)."""
    pos_i = label_i[None, :] == anchor_labels[:, None]
    pos_j = label_j[None, :] == anchor_labels[:, None]
    if pair_set == "pos-neg" or (pair_set == "anc-neg" and anchor_index is None):
        return pos_i & ~pos_j
    if pair_set == "anc-neg":
        return (i[None, :] == anchor_index[:, None]) & ~pos_j
    if pair_set == "pos-pos":
        return pos_i & pos_j
    return ~pos_i & ~pos_j


def soft_labels(
    anchor_labels: torch.Tensor, label_i: torch.Tensor, label_j: torch.Tensor, lam: float, label_mode: str, dtype
) -> torch.Tensor:
    """[A, M] labels in [0, 1] of the mixed pairs for each anchor (1 = positive)."""
    pos_i = (label_i[None, :] == anchor_labels[:, None]).to(dtype)
    pos_j = (label_j[None, :] == anchor_labels[:, None]).to(dtype)
    if label_mode == "negative":
        return torch.zeros_like(pos_i)
    if label_mode == "dominant":
        return pos_i if lam >= 0.5 else pos_j
    return lam * pos_i + (1.0 - lam) * pos_j


def hard_negative_plan(
    embeddings: torch.Tensor, labels: torch.Tensor, pair_set: str, lam: float, label_mode: str, k: int
) -> MixPlan:
    """Input mixup's pairs: per anchor, its k most similar negatives (SPEC 1.3, paper B.2).

    pos-neg mixes each of P(a) + {a} with those negatives, anc-neg the anchor itself, neg-neg the
    negatives among themselves; pos-pos has no negatives and mixes all positive pairs.
    """
    if pair_set == "pos-pos":
        i, j = batch_pairs(labels, pair_set)
        return MixPlan(i, j, lam, pair_set, label_mode)
    b = labels.shape[0]
    with torch.no_grad():
        e = torch.nn.functional.normalize(embeddings.detach(), dim=1)
        sim = e @ e.T
        negative = labels[:, None] != labels[None, :]
        sim = sim.masked_fill(~negative, -math.inf)
        kk = min(k, b)
        top = sim.topk(kk, dim=1).indices  # [B, k]
        hard = torch.zeros(b, b, dtype=torch.bool, device=labels.device)
        hard.scatter_(1, top, True)
        hard &= negative
    # anchor a mixes (i, j) where first[a, i] and hard[a, j] (and i < j for neg-neg)
    if pair_set == "pos-neg":
        first = labels[:, None] == labels[None, :]
    elif pair_set == "anc-neg":
        first = torch.eye(b, dtype=torch.bool, device=labels.device)
    else:
        first = hard
    # the pairs some anchor mixes, as a product of [B, B] masks (no [B, B, B] one)
    used = (first.T.float() @ hard.float()) > 0
    if pair_set == "neg-neg":
        used = used.triu(1)
    i, j = used.nonzero(as_tuple=True)
    return MixPlan(i, j, lam, pair_set, label_mode, member=first[:, i] & hard[:, j])
