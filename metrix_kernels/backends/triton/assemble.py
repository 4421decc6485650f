"""The loss from per-anchor term statistics (family.assemble) in one launch each way.

family.assemble under autograd is some fifty small torch ops per call (forward and backward); at small
batches on a GPU their launches cost more than the similarity kernels. Here one program reduces the
statistics of one or two losses (an error function's clean and mixed parts) to their weighted sum,
and one launch writes the gradient of every anchor's two term sums, computed in closed form:

    loss_k = sum_a (reduced value of anchor a) / divisor,  d loss_k / d term = rho' (* tau') / divisor

with the divisors (anchors, anchors with a positive, or nonzero pairs) saved by the forward.
Codes: backends.assembly_codes (forms and reduction as tl.constexpr): RHO 0 identity, 1 log, 2 log1p,
3 neglog; TAU 0 identity, 1 relu, 2 softplus; REDUCTION 0 mean, 1 mean_positive_anchors,
2 proxy_anchor, 3 nonzero_pairs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...backends import assembly_codes
from ...family import LossRow, Terms
from .common import INTERPRET, softplus

BLOCK = 16 if INTERPRET else 1024  # anchors per step: interpreted tests then span several steps


@triton.jit
def _sigmoid(x):
    """tl.sigmoid's values without its exp(-x), which overflows below x = -88 (an interpreter warning)."""
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _rho(total, mass, scale, fill, EXP: tl.constexpr, RHO: tl.constexpr, PER_MASS: tl.constexpr):
    """(rho of the term, its derivative in the term sum); an empty term (mass <= 0) is (fill, 0)."""
    empty = mass <= 0
    if EXP:  # the term sum is a logarithm
        safe = tl.where(empty, 0.0, total)
        if RHO == 0:
            value = tl.exp(safe)
            slope = value
        elif RHO == 1:
            value = safe
            slope = tl.full(safe.shape, 1.0, tl.float32)
        elif RHO == 2:
            value = softplus(safe)
            slope = _sigmoid(safe)
        else:
            value = -safe
            slope = tl.full(safe.shape, -1.0, tl.float32)
    else:  # rho is the identity
        value = total
        slope = tl.full(total.shape, 1.0, tl.float32)
    if PER_MASS:
        per = tl.where(empty, 1.0, mass)
        value = value / per
        slope = slope / per
    return tl.where(empty, fill, scale * value), tl.where(empty, 0.0, scale * slope)


@triton.jit
def _tau(x, TAU: tl.constexpr):
    """(tau(x), tau'(x)), with relu' = 0 at 0 as torch takes it."""
    if TAU == 0:
        value = x
        slope = tl.full(x.shape, 1.0, tl.float32)
    elif TAU == 1:
        value = tl.maximum(x, 0.0, propagate_nan=tl.PropagateNan.ALL)  # NaN stays NaN, as torch.relu
        slope = tl.where(x > 0, 1.0, 0.0)
    else:
        value = softplus(x)
        slope = _sigmoid(x)
    return value, slope


@triton.jit
def _terms(stats, A, offs, p_scale, p_fill, n_scale, n_fill, P_EXP: tl.constexpr, N_EXP: tl.constexpr,
           P_RHO: tl.constexpr, N_RHO: tl.constexpr, P_PER_MASS: tl.constexpr, N_PER_MASS: tl.constexpr):
    """Per anchor of a block: (rho_pos, its slope, rho_neg, its slope, pos_mass, neg_mass)."""
    inside = offs < A
    pos_sum = tl.load(stats + offs, mask=inside, other=0.0)
    neg_sum = tl.load(stats + A + offs, mask=inside, other=0.0)
    pos_mass = tl.load(stats + 2 * A + offs, mask=inside, other=0.0)
    neg_mass = tl.load(stats + 3 * A + offs, mask=inside, other=0.0)
    pos, pos_slope = _rho(pos_sum, pos_mass, p_scale, p_fill, P_EXP, P_RHO, P_PER_MASS)
    neg, neg_slope = _rho(neg_sum, neg_mass, n_scale, n_fill, N_EXP, N_RHO, N_PER_MASS)
    return pos, pos_slope, neg, neg_slope, pos_mass, neg_mass


@triton.jit
def _reduce(stats, A, divisors, p_scale, p_fill, n_scale, n_fill, P_EXP: tl.constexpr, N_EXP: tl.constexpr,
            P_RHO: tl.constexpr, N_RHO: tl.constexpr, P_PER_MASS: tl.constexpr, N_PER_MASS: tl.constexpr,
            TAU: tl.constexpr, REDUCTION: tl.constexpr, BLOCK: tl.constexpr):
    """One loss of family.assemble's reductions; stores its two divisors, returns the loss."""
    sum_p = tl.zeros([BLOCK], dtype=tl.float32)
    sum_n = tl.zeros([BLOCK], dtype=tl.float32)
    count_p = tl.zeros([BLOCK], dtype=tl.float32)
    count_n = tl.zeros([BLOCK], dtype=tl.float32)
    for a0 in range(0, A, BLOCK):
        offs = a0 + tl.arange(0, BLOCK)
        inside = offs < A
        pos, _, neg, _, pos_mass, _ = _terms(stats, A, offs, p_scale, p_fill, n_scale, n_fill, P_EXP, N_EXP,
                                             P_RHO, N_RHO, P_PER_MASS, N_PER_MASS)
        if REDUCTION <= 1:  # tau per anchor, then the mean over all anchors / those with a positive
            loss, _ = _tau(pos + neg, TAU)
            if REDUCTION == 1:
                inside = inside & (pos_mass > 0)
            sum_p += tl.where(inside, loss, 0.0)
            count_p += inside.to(tl.float32)
        else:  # each term summed over anchors on its own, then divided
            sum_p += tl.where(inside, pos, 0.0)
            sum_n += tl.where(inside, neg, 0.0)
            if REDUCTION == 2:  # proxy anchor: positives over proxies with a positive, negatives over all
                count_p += (inside & (pos_mass > 0)).to(tl.float32)
                count_n += inside.to(tl.float32)
            else:  # over the nonzero pairs
                count_p += tl.load(stats + 4 * A + offs, mask=inside, other=0.0)
                count_n += tl.load(stats + 5 * A + offs, mask=inside, other=0.0)
    div_p = tl.maximum(tl.sum(count_p, axis=0), 1.0)
    div_n = tl.maximum(tl.sum(count_n, axis=0), 1.0)
    tl.store(divisors, div_p)
    tl.store(divisors + 1, div_n)
    return tl.sum(sum_p, axis=0) / div_p + tl.sum(sum_n, axis=0) / div_n


@triton.jit
def _forward(stats0, A0, stats1, A1, weight1, divisors, out, p_scale, p_fill, n_scale, n_fill,
             P_EXP: tl.constexpr, N_EXP: tl.constexpr, P_RHO: tl.constexpr, N_RHO: tl.constexpr,
             P_PER_MASS: tl.constexpr, N_PER_MASS: tl.constexpr, TAU: tl.constexpr, REDUCTION: tl.constexpr,
             TWO: tl.constexpr, BLOCK: tl.constexpr):
    loss = _reduce(stats0, A0, divisors, p_scale, p_fill, n_scale, n_fill, P_EXP, N_EXP, P_RHO, N_RHO,
                   P_PER_MASS, N_PER_MASS, TAU, REDUCTION, BLOCK)
    if TWO:
        loss += weight1 * _reduce(stats1, A1, divisors + 2, p_scale, p_fill, n_scale, n_fill, P_EXP, N_EXP, P_RHO,
                                  N_RHO, P_PER_MASS, N_PER_MASS, TAU, REDUCTION, BLOCK)
    tl.store(out, loss)


@triton.jit
def _grad_block(stats, A, divisors, scale, grad, p_scale, p_fill, n_scale, n_fill, P_EXP: tl.constexpr,
                N_EXP: tl.constexpr, P_RHO: tl.constexpr, N_RHO: tl.constexpr, P_PER_MASS: tl.constexpr,
                N_PER_MASS: tl.constexpr, TAU: tl.constexpr, REDUCTION: tl.constexpr, BLOCK: tl.constexpr):
    """scale * d loss / d (pos_sum, neg_sum) of a block of anchors, written as rows 0 and 1 of grad
    [6, A] (the counts' rows 2-5 get zeros)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < A
    pos, pos_slope, neg, neg_slope, pos_mass, neg_mass = _terms(stats, A, offs, p_scale, p_fill, n_scale, n_fill,
                                                                P_EXP, N_EXP, P_RHO, N_RHO, P_PER_MASS, N_PER_MASS)
    div_p = tl.load(divisors)
    div_n = tl.load(divisors + 1)
    if REDUCTION <= 1:
        _, outer = _tau(pos + neg, TAU)
        # an empty term's slope is 0 even where tau' is not finite (both terms empty)
        keep_neg = neg_mass > 0
        if REDUCTION == 1:  # anchors without a positive are left out
            keep_neg = keep_neg & (pos_mass > 0)
        g_pos = tl.where(pos_mass > 0, outer * pos_slope, 0.0) / div_p
        g_neg = tl.where(keep_neg, outer * neg_slope, 0.0) / div_p
    else:
        g_pos = pos_slope / div_p
        g_neg = neg_slope / div_n
    tl.store(grad + offs, scale * g_pos, mask=inside)
    tl.store(grad + A + offs, scale * g_neg, mask=inside)
    for row in tl.static_range(2, 6):
        tl.store(grad + row * A + offs, tl.zeros([BLOCK], dtype=tl.float32), mask=inside)


@triton.jit
def _backward(stats0, A0, stats1, A1, weight1, divisors, grad_loss, grad0, grad1, p_scale, p_fill, n_scale, n_fill,
              P_EXP: tl.constexpr, N_EXP: tl.constexpr, P_RHO: tl.constexpr, N_RHO: tl.constexpr,
              P_PER_MASS: tl.constexpr, N_PER_MASS: tl.constexpr, TAU: tl.constexpr, REDUCTION: tl.constexpr,
              BLOCK: tl.constexpr):
    g = tl.load(grad_loss).to(tl.float32)
    if tl.program_id(1) == 0:
        _grad_block(stats0, A0, divisors, g, grad0, p_scale, p_fill, n_scale, n_fill, P_EXP, N_EXP, P_RHO, N_RHO,
                    P_PER_MASS, N_PER_MASS, TAU, REDUCTION, BLOCK)
    else:
        _grad_block(stats1, A1, divisors + 2, g * weight1, grad1, p_scale, p_fill, n_scale, n_fill, P_EXP, N_EXP,
                    P_RHO, N_RHO, P_PER_MASS, N_PER_MASS, TAU, REDUCTION, BLOCK)


def _codes(row: LossRow, terms: Terms) -> tuple[tuple[float, ...], dict]:
    c = assembly_codes(row, terms)
    consts = dict(P_EXP=c.p_exp, N_EXP=c.n_exp, P_RHO=c.p_rho, N_RHO=c.n_rho, P_PER_MASS=c.p_per_mass,
                  N_PER_MASS=c.n_per_mass, TAU=c.tau, REDUCTION=c.reduction)
    return (c.p_scale, c.p_fill, c.n_scale, c.n_fill), consts


def _pair(stats):
    """(stats0, A0, stats1, A1) of a launch: the second tensor is the first again when there is one."""
    if any(s.dtype != torch.float32 or s.dim() != 2 or s.shape[0] != 6 for s in stats):
        raise TypeError(f"assemble takes float32 statistics [6, A], got {[(s.dtype, tuple(s.shape)) for s in stats]}")
    first = stats[0].contiguous()
    second = stats[1].contiguous() if len(stats) == 2 else first
    return first, first.shape[1], second, second.shape[1]


def assemble_forward(row: LossRow, terms: Terms, stats: tuple, weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """family.assemble(stats[0]) + weight * family.assemble(stats[1]) (the second where given) of float32
    [6, A_k] statistics: (loss [] float32, divisors [2, 2] for assemble_backward)."""
    scalars, consts = _codes(row, terms)
    first = stats[0]
    loss = torch.empty((), device=first.device, dtype=torch.float32)
    divisors = torch.empty(2, 2, device=first.device, dtype=torch.float32)
    _forward[(1,)](*_pair(stats), float(weight), divisors, loss, *scalars, **consts, TWO=len(stats) == 2,
                   BLOCK=BLOCK, num_warps=4)
    return loss, divisors


def assemble_backward(row: LossRow, terms: Terms, stats: tuple, weight: float, divisors: torch.Tensor,
                      grad_loss: torch.Tensor) -> tuple:
    """The gradient [6, A_k] of each statistics tensor (zeros in the count rows 2-5)."""
    scalars, consts = _codes(row, terms)
    pair = _pair(stats)
    grads = tuple(torch.empty(s.shape, device=s.device, dtype=s.dtype) for s in stats)
    width = max(s.shape[1] for s in stats)
    if width:
        _backward[(triton.cdiv(width, BLOCK), len(stats))](
            *pair, float(weight), divisors, grad_loss.contiguous(), grads[0], grads[-1], *scalars,
            **consts, BLOCK=BLOCK, num_warps=4)
    return grads
