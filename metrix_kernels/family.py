"""The loss family of the paper's Table 1, one declarative row per loss.

Every loss has the generic label form (SPEC 1.2)

    l(a) = tau( rho_pos( sum_v y_av * sigma_pos(s_av) ) + rho_neg( sum_v (1 - y_av) * sigma_neg(s_av) ) )

A row says what sigma, rho and tau are, who plays anchor and candidate, and how the per-anchor
losses are reduced. The reference and every fused backend read these rows; a fused backend only
has to produce the per-anchor term sums (``TermStats``), and ``assemble`` turns them into the loss
in plain PyTorch on vectors of length A (number of anchors).

Exponential sigmas are carried in log space: for them a term sum is log(sum_v w * exp(x_v)),
which stays finite for scales of 75 and more.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

SIGMA_FORMS = ("exp", "hinge", "softplus")  # exp(x), max(x, 0), log(1 + exp(x))
SIGMA_INPUTS = ("s", "d", "d2")  # cosine similarity, sphere distance sqrt(2 - 2s), its square
RHO_FORMS = ("identity", "log", "log1p", "neglog")
TAU_FORMS = ("identity", "relu", "softplus")
REDUCTIONS = ("mean", "mean_positive_anchors", "proxy_anchor", "nonzero_pairs")


@dataclass(frozen=True)
class Sigma:
    """sigma(s) = form(scale * t(s) + shift), t one of SIGMA_INPUTS."""

    form: str
    of: str
    scale: float
    shift: float

    def argument(self, s: torch.Tensor) -> torch.Tensor:
        """scale * t(s) + shift, differentiable; d and d2 have a zero gradient where they are 0 (d like
        torch.cdist; d2 written out, as torch's clamp_min has changed what it passes at its bound)."""
        if self.of == "s":
            t = s
        elif self.of == "d2":
            x = 2.0 - 2.0 * s
            t = torch.where(x > 0, x, x.detach().clamp_min(0.0))  # NaN stays NaN, as in the kernels
        else:
            t = sphere_distance(s)
        return self.scale * t + self.shift

    def value(self, x: torch.Tensor) -> torch.Tensor:
        if self.form == "exp":
            return torch.exp(x)
        if self.form == "hinge":
            return torch.relu(x)
        return _softplus(x)


def _softplus(x: torch.Tensor) -> torch.Tensor:
    """log(1 + exp(x)), exact in float64 (torch's softplus returns x itself above x = 20)."""
    return torch.logaddexp(x, torch.zeros_like(x))


@dataclass(frozen=True)
class Rho:
    """rho applied to a term sum; ``empty`` is the value of a term without label mass.

    ``empty="zero"`` is pytorch-metric-learning's masked log-sum-exp convention; ``"exact"`` keeps
    rho(0) (log 0 = -inf), which NCA needs so that a batch without negatives costs nothing.
    ``per_mass`` divides the sum by the label mass (binomial deviance's 1/|P| and 1/|N|).
    """

    form: str
    scale: float = 1.0
    per_mass: bool = False
    empty: str = "zero"

    @property
    def empty_value(self) -> float:
        """rho of a term without label mass."""
        if self.empty == "exact" and self.form in ("log", "neglog"):
            return -math.inf if self.form == "log" else math.inf
        return 0.0


class Terms(NamedTuple):
    sigma_pos: Sigma
    sigma_neg: Sigma
    rho_pos: Rho
    rho_neg: Rho
    tau: str


@dataclass(frozen=True)
class LossRow:
    name: str
    anchors: str  # "examples" | "proxies"
    candidates: str  # "examples" | "proxies"
    defaults: dict
    reduction: str
    terms: Callable[..., Terms]
    source: str  # the published setting its defaults reproduce, and how it relates to PML

    @property
    def uses_proxies(self) -> bool:
        return "proxies" in (self.anchors, self.candidates)


def sphere_distance(s: torch.Tensor) -> torch.Tensor:
    """d(s) = sqrt(max(2 - 2s, 0)) with gradient 0 where d = 0 instead of inf."""
    x = 2.0 - 2.0 * s
    positive = x > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, x, torch.ones_like(x))), torch.zeros_like(x))


def _contrastive(pos_margin, neg_margin):
    return Terms(
        Sigma("hinge", "d", 1.0, -pos_margin),
        Sigma("hinge", "d", -1.0, neg_margin),
        Rho("identity"),
        Rho("identity"),
        "identity",
    )


def _lifted_structure(pos_margin, neg_margin):
    return Terms(
        Sigma("exp", "d", 1.0, -pos_margin),
        Sigma("exp", "d", -1.0, neg_margin),
        Rho("log"),
        Rho("log"),
        "relu",
    )


def _binomial_deviance(alpha, beta, base):
    return Terms(
        Sigma("softplus", "s", -alpha, alpha * base),
        Sigma("softplus", "s", beta, -beta * base),
        Rho("identity", per_mass=True),
        Rho("identity", per_mass=True),
        "identity",
    )


def _multi_similarity(alpha, beta, base):
    return Terms(
        Sigma("exp", "s", -alpha, alpha * base),
        Sigma("exp", "s", beta, -beta * base),
        Rho("log1p", 1.0 / alpha),
        Rho("log1p", 1.0 / beta),
        "identity",
    )


def _proxy_anchor(margin, alpha):
    return Terms(
        Sigma("exp", "s", -alpha, alpha * margin),
        Sigma("exp", "s", alpha, alpha * margin),
        Rho("log1p"),
        Rho("log1p"),
        "identity",
    )


def _nca_terms(scale, tau):
    sigma = Sigma("exp", "d2", -scale, 0.0)
    return Terms(sigma, sigma, Rho("neglog"), Rho("log", empty="exact"), tau)


def _nca(softmax_scale):
    return _nca_terms(softmax_scale, "softplus")


def _proxy_nca(softmax_scale):
    return _nca_terms(softmax_scale, "identity")


def _proxy_nca_pp(temperature):
    return _nca_terms(1.0 / temperature, "softplus")


FAMILY: dict[str, LossRow] = {
    row.name: row
    for row in (
        LossRow(
            "contrastive", "examples", "examples", {"pos_margin": 0.0, "neg_margin": 1.0},
            "nonzero_pairs", _contrastive,
            "Hadsell et al. 2006 on the sphere distance; PML ContrastiveLoss (LpDistance, "
            "AvgNonZeroReducer) with its defaults. The paper's recipe uses neg_margin=0.5.",
        ),
        LossRow(
            "lifted_structure", "examples", "examples", {"pos_margin": 0.0, "neg_margin": 1.0},
            "mean", _lifted_structure,
            "Generalized lifted structure of Hermans et al. 2017; PML GeneralizedLiftedStructureLoss "
            "with its defaults.",
        ),
        LossRow(
            "binomial_deviance", "examples", "examples", {"alpha": 2.0, "beta": 50.0, "base": 0.5},
            "mean", _binomial_deviance,
            "Yi et al. 2014 (alpha=2, margin 0.5, negative cost C=25, so beta = alpha * C = 50), "
            "each term averaged over its positives / negatives. Not in PML; names follow PML's "
            "MultiSimilarityLoss, from which it differs only in rho.",
        ),
        LossRow(
            "multi_similarity", "examples", "examples", {"alpha": 2.0, "beta": 50.0, "base": 0.5},
            "mean", _multi_similarity,
            "Wang et al. 2019; PML MultiSimilarityLoss with its defaults (the MS paper's). The "
            "Metrix paper uses alpha=17.97, beta=75.66, base=0.77 (Musgrave et al.).",
        ),
        LossRow(
            "proxy_anchor", "proxies", "examples", {"margin": 0.1, "alpha": 32.0},
            "proxy_anchor", _proxy_anchor,
            "Kim et al. 2020; PML ProxyAnchorLoss with its defaults (the paper's): positive terms "
            "averaged over proxies with a positive, negative terms over all proxies.",
        ),
        LossRow(
            "nca", "examples", "examples", {"softmax_scale": 1.0},
            "mean_positive_anchors", _nca,
            "Goldberger et al. 2005; PML NCALoss (squared distance, softmax over all other "
            "examples; anchors without a positive are left out of the mean).",
        ),
        LossRow(
            "proxy_nca", "examples", "proxies", {"softmax_scale": 1.0},
            "mean", _proxy_nca,
            "Movshovitz-Attias et al. 2017 as in the Metrix paper's Table 1 (tau = identity): the "
            "positive proxy is NOT in the denominator, -log(P / N). PML's ProxyNCALoss keeps it, "
            "-log(P / (P + N)); that form is proxy_nca_pp with temperature = 1 / softmax_scale.",
        ),
        LossRow(
            "proxy_nca_pp", "examples", "proxies", {"temperature": 1.0 / 9.0},
            "mean", _proxy_nca_pp,
            "Teh et al. 2020 (ProxyNCA++), temperature 1/9 as published; equals PML's ProxyNCALoss "
            "with softmax_scale = 1 / temperature.",
        ),
    )
}


def loss_row(name: str) -> LossRow:
    if not isinstance(name, str) or name not in FAMILY:
        raise ValueError(f"unknown loss {name!r}; expected one of {sorted(FAMILY)}")
    return FAMILY[name]


def is_real(x) -> bool:
    """A real number (Python's or numpy's, e.g. from a sweep's grid), but not a bool: a bool given for
    a number is a mistake, not 0 or 1."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def resolve(name: str, params: dict) -> tuple[LossRow, Terms, dict]:
    """The row, its terms for the given hyperparameters (defaults filled in), and the full parameters."""
    row = loss_row(name)
    unknown = set(params) - set(row.defaults)
    if unknown:
        raise TypeError(
            f"loss {name!r} got unexpected parameter(s) {sorted(unknown)}; it takes {sorted(row.defaults)}"
        )
    full = {**row.defaults, **params}
    for key, value in full.items():
        if not is_real(value) or not math.isfinite(value):
            raise TypeError(f"loss parameter {key!r} must be a finite number, got {value!r}")
    full = {key: float(value) for key, value in full.items()}
    for key in ("alpha", "beta", "softmax_scale", "temperature"):
        if key in full and full[key] <= 0:
            raise ValueError(f"loss parameter {key!r} must be > 0, got {full[key]!r}")
    return row, row.terms(**full), full


class TermStats(NamedTuple):
    """Per-anchor statistics of the two terms; the only thing a fused backend must produce.

    pos_sum / neg_sum: sum_v w * sigma(x_v), or its logarithm where sigma is exponential (-inf when
    empty). The only differentiable fields. pos_mass / neg_mass: sum_v w (label mass).
    pos_nnz / neg_nnz: number of (a, v) with w > 0 and sigma(x_v) > 0 (used by "nonzero_pairs").
    """

    pos_sum: torch.Tensor
    neg_sum: torch.Tensor
    pos_mass: torch.Tensor
    neg_mass: torch.Tensor
    pos_nnz: torch.Tensor
    neg_nnz: torch.Tensor


def _rho(rho: Rho, sigma: Sigma, total: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """rho(term) per anchor, NaN-free in value and gradient for empty terms."""
    empty = mass <= 0
    if sigma.form == "exp":
        # total is log of the sum; -inf where empty: swap in a harmless 0 before differentiating.
        safe = torch.where(empty, 0.0, total)
        value = {
            "identity": lambda t: torch.exp(t),
            "log": lambda t: t,
            "log1p": _softplus,
            "neglog": lambda t: -t,
        }[rho.form](safe)
    else:
        if rho.form != "identity":
            raise ValueError(f"rho {rho.form!r} needs an exponential sigma")
        value = total
    if rho.per_mass:
        value = value / torch.where(empty, 1.0, mass)
    if rho.scale != 1.0:
        value = rho.scale * value
    return torch.where(empty, rho.empty_value, value)


def _tau(form: str, x: torch.Tensor) -> torch.Tensor:
    if form == "identity":
        return x
    if form == "relu":
        return torch.relu(x)
    return _softplus(x)


def assemble(row: LossRow, terms: Terms, stats: TermStats) -> torch.Tensor:
    """The reduced loss from per-anchor term statistics (rho, tau, then the row's reduction).

    Statistics [..., A] give losses [...]: several losses of one row over the same number of
    anchors are assembled in one pass (a fused error function's clean and mixed parts).
    """
    pos = _rho(terms.rho_pos, terms.sigma_pos, stats.pos_sum, stats.pos_mass)
    neg = _rho(terms.rho_neg, terms.sigma_neg, stats.neg_sum, stats.neg_mass)
    has_pos = stats.pos_mass > 0
    anchors = pos.shape[-1]
    if row.reduction == "proxy_anchor":
        return pos.sum(-1) / has_pos.sum(-1).clamp_min(1) + neg.sum(-1) / max(anchors, 1)
    if row.reduction == "nonzero_pairs":
        return pos.sum(-1) / stats.pos_nnz.sum(-1).clamp_min(1) + neg.sum(-1) / stats.neg_nnz.sum(-1).clamp_min(1)
    if row.reduction == "mean_positive_anchors":
        # anchors without a positive (-log 0) are not averaged, as in PML's NCALoss.
        loss = _tau(terms.tau, pos + neg)
        return torch.where(has_pos, loss, torch.zeros_like(loss)).sum(-1) / has_pos.sum(-1).clamp_min(1)
    loss = _tau(terms.tau, pos + neg)
    return loss.sum(-1) / max(anchors, 1)
