"""Device helpers shared by the Triton kernels: pair weights, sigma, and the per-row term reductions.

Codes are compile-time constants (tl.constexpr) so that each loss compiles to its own kernel:
    FORM  0 exp (term kept in log space), 1 hinge, 2 softplus
    OF    0 s, 1 d = sqrt(max(2 - 2s, 0)), 2 d2 = max(2 - 2s, 0)
    MEMBER as in metrix_kernels.backends; NEGATIVE for label_mode "negative".
Reductions over a tile go over every axis but the first (the row / anchor axis): tiles are 2-D for
pairwise kernels and 3-D (anchor x i x j) for the Gram kernels, hence the THREE_D flags.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ...family import Sigma
from .. import LABEL_DOMINANT

FORMS = {"exp": 0, "hinge": 1, "softplus": 2}
INPUTS = {"s": 0, "d": 1, "d2": 2}
MIN_BLOCK = 16  # tl.dot's smallest tile side
# Interpreted kernels (CPU tests) run at the smallest tiles, so small batches span several tiles.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def interpretable(x):
    """The interpreter's tl.dot misreads bfloat16 (triton 3.8): interpreted bfloat16 runs in float32."""
    return x.float() if INTERPRET and x.dtype == torch.bfloat16 else x


def zeros_like_free(x, dtype):
    """Zeros of x's shape that take no memory (one element, expanded): the gradient a backward returns
    for the second side of an op whose two sides are one tensor, their sum going to the first. (Made
    per call: a cached element could sit in a CUDA graph's memory pool and be overwritten.)"""
    return torch.zeros((), device=x.device, dtype=dtype).expand(x.shape)


def add_chunk_products(block, r0, r1, rows, cols, grad_rows, grad_cols, same, row_ids=None, accumulate=False):
    """Fold one chunk of derivatives block = dLoss/d<row, col> (rows at positions r0:r1 x all cols, in
    cols' row order) into the gradients: grad_rows gets block @ cols at those rows, grad_cols
    block^T @ those rows. The positions are rows row_ids[r0:r1] where row_ids is given (a permutation;
    only where the rows are the columns), else r0:r1. The first chunk (r0 = 0) writes grad_cols unless
    accumulating, and later ones add to it; each chunk writes its rows' share (adds it, when the rows
    are the columns and grad_rows is grad_cols): no zero-filled buffers."""
    chunk = rows[r0:r1] if row_ids is None else rows[row_ids[r0:r1]]
    if r0 == 0 and not accumulate:
        torch.mm(block.T, chunk, out=grad_cols)
    else:
        grad_cols.addmm_(block.T, chunk)
    if not same and not accumulate:
        torch.mm(block, cols, out=grad_rows[r0:r1])
    elif row_ids is None:  # the rows are the columns, or accumulating
        grad_rows[r0:r1].addmm_(block, cols)
    else:
        grad_rows.index_add_(0, row_ids[r0:r1], block @ cols)


def chunk_rows(d: int, tile: int) -> int:
    """Rows per backward chunk: a multiple of the tile with [chunk, N] float32 derivatives at most half
    the size of the [N, d] float32 rows, so the backward holds the gradient and half as much again."""
    return tile if INTERPRET else max(tile, d // 2 // tile * tile)


def sigma_codes(sigma: Sigma) -> tuple[int, int, float, float]:
    return FORMS[sigma.form], INPUTS[sigma.of], float(sigma.scale), float(sigma.shift)


def padded_dim(d: int) -> int:
    return max(MIN_BLOCK, triton.next_power_of_2(d))


def label_factor(lam: float, label_mode: int) -> float:
    """The label's weight on the first member of a pair: lam when interpolating; 1 or 0 for
    "dominant" (the pair is labelled by its dominant example); unused for "negative"."""
    if label_mode == LABEL_DOMINANT:
        return 1.0 if lam >= 0.5 else 0.0
    return float(lam)


def dot_precision(dtype) -> str:
    """float32 inputs: three TF32 tensor-core products per dot, which keeps float32 accuracy (plain
    "ieee" runs on the CUDA cores, about 100x slower); half inputs use tensor cores natively."""
    return "tf32x3" if dtype.itemsize >= 4 else "tf32"


def k_block(d: int, dtype) -> int:
    """The embedding-width chunk of similarity products: 32 float32 or 64 half columns (a 64-row
    tile chunk is then 8 KiB), smaller only when d is."""
    return 16 if INTERPRET else min(padded_dim(d), 32 if dtype.itemsize >= 4 else 64)


@triton.jit
def similarity(a_ptr, ids_a, in_a, b_ptr, ids_b, in_b, D, BA: tl.constexpr, BB: tl.constexpr, BK: tl.constexpr,
               PRECISION: tl.constexpr):
    """s [BA, BB] = rows ids_a of a @ rows ids_b of b ^T (zero where in_a / in_b are false), walking the
    width D in BK chunks (float32 accumulation), so no operand is ever wider than BK columns."""
    s = tl.zeros([BA, BB], dtype=tl.float32)
    for k0 in range(0, D, BK):
        offs_k = k0 + tl.arange(0, BK)
        in_k = (offs_k < D)[None, :]
        x = tl.load(a_ptr + ids_a[:, None] * D + offs_k[None, :], mask=in_a[:, None] & in_k, other=0.0)
        y = tl.load(b_ptr + ids_b[:, None] * D + offs_k[None, :], mask=in_b[:, None] & in_k, other=0.0)
        s = tl.dot(x, tl.trans(y), s, input_precision=PRECISION)
    return s


@triton.jit
def norm_products(a_norm, ids_a, in_a, b_norm, ids_b, in_b):
    """[BA, BB] max(|a|, 1e-12) max(|b|, 1e-12) of rows ids_a and ids_b from their norms (1 where in_a /
    in_b are false; NaN stays NaN, as in F.normalize)."""
    na = tl.maximum(tl.load(a_norm + ids_a, mask=in_a, other=1.0), 1e-12, propagate_nan=tl.PropagateNan.ALL)
    nb = tl.maximum(tl.load(b_norm + ids_b, mask=in_b, other=1.0), 1e-12, propagate_nan=tl.PropagateNan.ALL)
    return na[:, None] * nb[None, :]


@triton.jit
def unit_similarity(a_ptr, a_norm, ids_a, in_a, b_ptr, b_norm, ids_b, in_b, D, BA: tl.constexpr, BB: tl.constexpr,
                    BK: tl.constexpr, PRECISION: tl.constexpr):
    """(s, norms) [BA, BB]: the similarity of the unit rows ids_a of a and ids_b of b, from raw rows and
    their norms, and the norms' products it divides by. Divided, not multiplied by a reciprocal:
    parallel rows in d = 1 then give s = +-1 exactly, as normalized rows do."""
    norms = norm_products(a_norm, ids_a, in_a, b_norm, ids_b, in_b)
    return similarity(a_ptr, ids_a, in_a, b_ptr, ids_b, in_b, D, BA, BB, BK, PRECISION) / norms, norms


@triton.jit
def row_sum(t, THREE_D: tl.constexpr):
    if THREE_D:
        return tl.sum(tl.sum(t, axis=2), axis=1)
    else:
        return tl.sum(t, axis=1)


@triton.jit
def row_max(t, THREE_D: tl.constexpr):
    if THREE_D:
        return tl.max(tl.max(t, axis=2), axis=1)
    else:
        return tl.max(t, axis=1)


@triton.jit
def expand(v, THREE_D: tl.constexpr):
    """A per-row vector broadcast against a tile."""
    if THREE_D:
        return v[:, None, None]
    else:
        return v[:, None]


@triton.jit
def pair_weights(z, a, li, lj, mi, label_lam, valid, MEMBER: tl.constexpr, NEGATIVE: tl.constexpr):
    """(w_pos, w_neg) of pairs between a clean side (label z, index a) and a mixed side (labels li, lj,
    index mi); clean pairs are li == lj. Arguments broadcast to the tile. The soft label is
    label_lam [li == z] + (1 - label_lam) [lj == z] (see label_factor), or 0 when NEGATIVE; y and
    1 - y are each one of 0, 1, lam, 1 - lam: 1 - y formed by subtraction would lose a lam below
    float32's resolution at 1."""
    pi = li == z
    pj = lj == z
    if NEGATIVE:
        y = tl.where(pi & pj, 0.0, 0.0)
        not_y = tl.where(pi & pj, 1.0, 1.0)
    else:
        y = tl.where(pi, tl.where(pj, 1.0, label_lam), tl.where(pj, 1.0 - label_lam, 0.0))
        not_y = tl.where(pi, tl.where(pj, 0.0, 1.0 - label_lam), tl.where(pj, label_lam, 1.0))
    if MEMBER == 0:
        member = valid
    elif MEMBER == 1:
        member = valid & (mi != a)
    elif MEMBER == 2:
        member = valid & pi & (pj == 0)
    elif MEMBER == 3:
        member = valid & (mi == a) & (pj == 0)
    elif MEMBER == 4:
        member = valid & pi & pj
    else:
        member = valid & (pi == 0) & (pj == 0)
    return tl.where(member, y, 0.0), tl.where(member, not_y, 0.0)


@triton.jit
def sigma_x(s, scale, shift, OF: tl.constexpr):
    """x = scale * t(s) + shift."""
    if OF == 0:
        t = s
    elif OF == 1:
        t = tl.sqrt(tl.maximum(2.0 - 2.0 * s, 0.0))
    else:
        t = tl.maximum(2.0 - 2.0 * s, 0.0)
    return scale * t + shift


@triton.jit
def sigma_dx(s, scale, OF: tl.constexpr):
    """dx/ds, with the derivatives of d and d2 taken as 0 where they are 0."""
    u = 2.0 - 2.0 * s
    if OF == 0:
        g = scale + 0.0 * s
    elif OF == 1:
        d = tl.sqrt(tl.where(u > 0, u, 1.0))
        g = tl.where(u > 0, -scale / d, 0.0)
    else:
        g = tl.where(u > 0, -2.0 * scale, 0.0)
    return g


@triton.jit
def softplus(x):
    """log(1 + exp(x)) without overflow."""
    return tl.maximum(x, 0.0, propagate_nan=tl.PropagateNan.ALL) + tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def term_update(m, total, mass, nnz, x, w, FORM: tl.constexpr, THREE_D: tl.constexpr):
    """Fold a tile of arguments x with weights w into a row's running term statistics.

    exp: online log-sum-exp (m running max of used x, total = sum w exp(x - m)); else a plain sum."""
    used = w > 0
    if FORM == 0:
        m_new = tl.maximum(m, row_max(tl.where(used, x, float("-inf")), THREE_D))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.where(used, w * tl.exp(x - expand(m_safe, THREE_D)), 0.0)
        total = total * tl.exp(m - m_safe) + row_sum(p, THREE_D)
        m = m_new
        counted = used
    else:
        if FORM == 1:
            value = tl.maximum(x, 0.0)
            counted = used & (x > 0)
        else:
            value = softplus(x)
            counted = used  # softplus > 0 everywhere, though it may underflow in float32
        total = total + row_sum(tl.where(used, w * value, 0.0), THREE_D)
    mass = mass + row_sum(w, THREE_D)
    nnz = nnz + row_sum(counted.to(tl.float32), THREE_D)
    return m, total, mass, nnz


@triton.jit
def term_value(m, total, FORM: tl.constexpr):
    """The term sum: log(total) + m for exp (-inf when empty), total otherwise."""
    if FORM == 0:
        out = tl.where(total > 0, m + tl.log(tl.where(total > 0, total, 1.0)), float("-inf"))
    else:
        out = total
    return out


@triton.jit
def term_grad(x, w, value, FORM: tl.constexpr):
    """d(term sum)/dx per pair, value = the row's term sum broadcast to the tile."""
    if FORM == 0:
        safe = tl.where(value == float("-inf"), 0.0, value)
        g = tl.where(w > 0, w * tl.exp(x - safe), 0.0)
    elif FORM == 1:
        g = tl.where(x > 0, w, 0.0)
    else:
        g = w * tl.sigmoid(x)
    return g
