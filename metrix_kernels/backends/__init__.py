"""Fused backends: the kernel contract every backend (triton, cpu, cuda) implements.

The ops layer (``metrix_kernels.ops``) owns the autograd.Functions and calls a backend module
through the functions below. A backend never imports the api. The pair ops (pairwise, gram_mixed)
compare the L2-normalized rows x / max(|x|, 1e-12) of their contiguous inputs. A backend named in
UNIT_ROWS_BACKENDS takes the rows raw with their norms |x| (float32 [N] each, unclamped: the keyword
norms = (first side's, second side's)) and normalizes them itself, without writing them normalized;
it returns gradients with respect to the raw rows (through the normalization). Its Gram functions
also take the keyword order (below), and it has the clean_and_gram functions. Every other backend
gets rows the ops layer has normalized (and permuted), and returns gradients with respect to those.
Statistics are float32 (float64 for float64 inputs).

Per-row statistics (``family.TermStats``), returned as one tensor ``stats`` [6, R]:
    0 pos_sum   sum_v w_pos * sigma_pos(x)    (log of it where sigma_pos.form == "exp"; -inf if empty)
    1 neg_sum   the same for the negative term
    2 pos_mass  sum_v w_pos          3 neg_mass  sum_v w_neg
    4 pos_nnz   #{v: w_pos > 0 and sigma_pos(x) > 0}   5 neg_nnz  (only needed when cfg.count_nonzero)
with x = sigma.scale * t(s) + sigma.shift, t in {s, d = sqrt(max(2 - 2s, 0)), d2 = max(2 - 2s, 0)}
and the derivatives of d and d2 taken as 0 where they are 0.

Pair weights. One side of a pair may be a mixed example with pair labels (label_i, label_j) and
index i; the other side is clean with label z and batch index a (-1 for a proxy). The soft label is
    interpolate: y = lam [label_i == z] + (1 - lam) [label_j == z]
    negative:    y = 0
    dominant:    y = [label_i == z] if lam >= 0.5 else [label_j == z]
Clean pairs are the special case label_i == label_j, lam = 1. Membership (rule codes below) says
whether a pair counts at all:  w_pos = member * y,  w_neg = member * (1 - y).

A backend module may set FLOAT64 = True when it computes float64 inputs in float64; the ops layer
hands every other backend float32 instead of float64.

Functions (R rows reduced over V columns):
    pairwise_forward(rows, row_label_i, row_label_j, row_index,
                     cols, col_label_i, col_label_j, col_index, lam, cfg, member_mask=None) -> stats
    pairwise_backward(<the same inputs>, stats, grad_pos_sum, grad_neg_sum) -> (grad_rows, grad_cols)
        s = <row, col>. cfg.mixed_rows says which side carries the pair labels. member_mask, when
        given, is an explicit bool [R, V] membership (input mixup's per-anchor hard negatives).
    gram_mixed_forward(anchors, anchor_label, anchor_index, emb, labels, lam, cfg) -> stats
    gram_mixed_backward(<the same inputs>, stats, grad_pos_sum, grad_neg_sum) -> (grad_anchors, grad_emb)
        Embedding mixup without mixed embeddings: candidates are the pairs (i, j) of ``emb``
        (ordered i != j for pos-neg / anc-neg, i < j for pos-pos / neg-neg), with
        s(a, ij) = (lam <a, e_i> + (1 - lam) <a, e_j>) / n_ij,
        n_ij = max(sqrt(lam^2 + (1 - lam)^2 + 2 lam (1 - lam) <e_i, e_j>), 1e-12).
        UNIT_ROWS_BACKENDS: with order (int64 [B], a permutation, or None), position p of emb (and of
        the anchors, when anchors is emb) is row order[p]; the labels are by position.
    Where one tensor is both sides (rows is cols, anchors is emb), a backend may return the sum of the
    two gradients in one of them and zeros in the other: autograd only ever sees their sum.
    UNIT_ROWS_BACKENDS only, the error function's two pair ops over one batch in one node:
    clean_and_gram_forward(emb, labels, sorted_labels, lam, clean_cfg, mixed_cfg, *, norm, order)
        -> (clean stats, mixed stats): pairwise_forward(emb x emb, labels, index = position) with
        clean_cfg and gram_mixed_forward(emb, emb, sorted_labels, anchor_index = position, order)
    clean_and_gram_backward(<the same inputs but the keywords>, clean_stats, mixed_stats, clean_grad_pos,
                            clean_grad_neg, mixed_grad_pos, mixed_grad_neg, *, norm, order) -> grad_emb
        the sum of the two ops' gradients, written into one buffer
    mixpool_forward(features [B, C, H, W], i [M], j [M], lam) -> (pooled [M, C], argmax [M, C])
    mixpool_backward(grad_pooled [M, C], features, i, j, lam, argmax) -> grad_features [B, C, H, W]
        pooled = mean_hw(m) + max_hw(m) of m = lam * f_i + (1 - lam) * f_j, m never materialized;
        argmax (the first maximum's position in H*W) is int32, or of mixpool_argmax_dtype(H * W).
Optional (the ops layer uses torch ops where a backend has none):
    mixpool_argmax_dtype(positions) -> the integer dtype of the backend's argmax (default int32)
    unit_rows_forward(x [N, d]) -> (y = x / norm, norm = max(|x|, 1e-12) [N, 1])
    unit_rows_backward(grad [N, d], y, norm) -> grad_x, the gradient of F.normalize(x, dim=-1)
    assemble_forward(row, terms, stats, weight) -> (loss [], saved)
        loss(stats[0]) + weight * loss(stats[1]) for one or two statistics tensors [6, A_k] (the
        second term only where there are two), loss(s) = family.assemble(row, terms, TermStats(*s));
        see assembly_codes; in the statistics' dtype
    assemble_backward(row, terms, stats, weight, saved, grad_loss []) -> (grad [6, A_k] per stats tensor)
        the gradients of the two term sums (rows 0, 1) and zeros for the counts (rows 2-5)
"""
from __future__ import annotations

from typing import NamedTuple

from ..family import REDUCTIONS, RHO_FORMS, TAU_FORMS, LossRow, Sigma, Terms

# membership rules (SPEC 1.3 and pairs.rule_member); z = the clean side's label, a its index
MEMBER_ALL = 0  # every pair (proxy anchors or proxy candidates, clean)
MEMBER_ALL_BUT_SELF = 1  # clean examples against themselves: col_index != row_index
MEMBER_POS_NEG = 2  # label_i == z, label_j != z
MEMBER_ANC_NEG = 3  # i == a, label_j != z   (the ops layer maps it to POS_NEG for proxy anchors)
MEMBER_POS_POS = 4  # label_i == z, label_j == z
MEMBER_NEG_NEG = 5  # label_i != z, label_j != z
MEMBER_RULES = {
    "pos-neg": MEMBER_POS_NEG,
    "anc-neg": MEMBER_ANC_NEG,
    "pos-pos": MEMBER_POS_POS,
    "neg-neg": MEMBER_NEG_NEG,
}

LABEL_INTERPOLATE, LABEL_NEGATIVE, LABEL_DOMINANT = 0, 1, 2
LABEL_CODES = {"interpolate": LABEL_INTERPOLATE, "negative": LABEL_NEGATIVE, "dominant": LABEL_DOMINANT}


# the backends whose pair ops normalize their rows inside their kernels (a constant that compiled
# code reads without importing the backend)
UNIT_ROWS_BACKENDS = frozenset({"triton"})


class KernelConfig(NamedTuple):
    sigma_pos: Sigma
    sigma_neg: Sigma
    member: int
    label_mode: int = LABEL_INTERPOLATE
    mixed_rows: bool = False
    count_nonzero: bool = False


class AssemblyCodes(NamedTuple):
    """A row's rho, tau and reduction as the assembly kernels take them: rho forms and tau as indices
    in family.RHO_FORMS / TAU_FORMS, reduction in family.REDUCTIONS; *_exp: the term sum is a log."""

    p_exp: bool
    p_rho: int
    p_per_mass: bool
    p_scale: float
    p_fill: float
    n_exp: bool
    n_rho: int
    n_per_mass: bool
    n_scale: float
    n_fill: float
    tau: int
    reduction: int


def assembly_codes(row: LossRow, terms: Terms) -> AssemblyCodes:
    codes = []
    for sigma, rho in ((terms.sigma_pos, terms.rho_pos), (terms.sigma_neg, terms.rho_neg)):
        if sigma.form != "exp" and rho.form != "identity":  # as family.assemble
            raise ValueError(f"rho {rho.form!r} needs an exponential sigma")
        codes += [sigma.form == "exp", RHO_FORMS.index(rho.form), rho.per_mass, float(rho.scale), rho.empty_value]
    return AssemblyCodes(*codes, TAU_FORMS.index(terms.tau), REDUCTIONS.index(row.reduction))
