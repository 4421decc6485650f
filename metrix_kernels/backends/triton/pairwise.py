"""Fused pairwise loss terms: rows [R, d] x cols [V, d] reduced to per-row statistics.

Forward: one program per row tile walks the column tiles; each similarity tile s of the unit rows
(accumulated over the width in chunks, common.unit_similarity) is turned into pair weights (labels
compared in the kernel) and folded into running per-row term statistics (online log-sum-exp for
exponential sigmas). Nothing of size R x V is stored.
Rows and columns come raw: the kernels divide each similarity tile by the rows' norms (N floats),
so the unit rows are never written and the op holds nothing of size [N, d] but its inputs.
Backward, by chunks of about d / 2 rows: a kernel recomputes the chunk's similarity tiles and weights
and writes dS = g_pos * dterm_pos/ds + g_neg * dterm_neg/ds from the saved term sums, over the norms;
two matrix products (cuBLAS) then give the gradients, dS @ cols and dS^T @ rows, and one pass takes
them through the normalization in place. The [chunk, V] block is half the size of the columns, so
memory stays O((R + V) d), while the products run at the card's matmul rate (a fused backward had to
recompute every similarity tile once per gradient-width chunk).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import LABEL_NEGATIVE
from .common import (
    INTERPRET,
    MIN_BLOCK,
    add_chunk_products,
    chunk_rows,
    dot_precision,
    interpretable,
    k_block,
    label_factor,
    pair_weights,
    sigma_codes,
    sigma_dx,
    sigma_x,
    term_grad,
    term_update,
    term_value,
    unit_similarity,
    zeros_like_free,
)
from .unit_rows import through_norms_


@triton.jit
def _weights(r_li, r_lj, r_ix, c_li, c_lj, c_ix, mask_ptr, offs_r, offs_v, R, V, label_lam,
             MEMBER: tl.constexpr, NEGATIVE: tl.constexpr, MIXED_ROWS: tl.constexpr, HAS_MASK: tl.constexpr):
    """Pair weights of a [BR, BV] tile; the clean side gives (z, a), the mixed side (li, lj, mi)."""
    in_r = offs_r < R
    in_v = offs_v < V
    valid = in_r[:, None] & in_v[None, :]
    if MIXED_ROWS:
        z = tl.load(c_li + offs_v, mask=in_v, other=-1)[None, :]
        a = tl.load(c_ix + offs_v, mask=in_v, other=-1)[None, :]
        li = tl.load(r_li + offs_r, mask=in_r, other=-2)[:, None]
        lj = tl.load(r_lj + offs_r, mask=in_r, other=-2)[:, None]
        mi = tl.load(r_ix + offs_r, mask=in_r, other=-2)[:, None]
    else:
        z = tl.load(r_li + offs_r, mask=in_r, other=-1)[:, None]
        a = tl.load(r_ix + offs_r, mask=in_r, other=-1)[:, None]
        li = tl.load(c_li + offs_v, mask=in_v, other=-2)[None, :]
        lj = tl.load(c_lj + offs_v, mask=in_v, other=-2)[None, :]
        mi = tl.load(c_ix + offs_v, mask=in_v, other=-2)[None, :]
    if HAS_MASK:
        explicit = tl.load(mask_ptr + offs_r[:, None] * V + offs_v[None, :], mask=valid, other=0) != 0
        return pair_weights(z, a, li, lj, mi, label_lam, valid & explicit, 0, NEGATIVE)
    else:
        return pair_weights(z, a, li, lj, mi, label_lam, valid, MEMBER, NEGATIVE)


@triton.jit(do_not_specialize=["R", "V"])
def _forward(rows, r_li, r_lj, r_ix, cols, c_li, c_lj, c_ix, mask_ptr, r_norm, c_norm, stats, R, V, D, label_lam,
             p_scale, p_shift, n_scale, n_shift,
             P_FORM: tl.constexpr, P_OF: tl.constexpr, N_FORM: tl.constexpr, N_OF: tl.constexpr,
             MEMBER: tl.constexpr, NEGATIVE: tl.constexpr, MIXED_ROWS: tl.constexpr, HAS_MASK: tl.constexpr,
             PRECISION: tl.constexpr, BR: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr):
    offs_r = tl.program_id(0) * BR + tl.arange(0, BR)
    zero = tl.zeros([BR], dtype=tl.float32)
    p_m, p_t, p_mass, p_nnz = zero - float("inf"), zero, zero, zero
    n_m, n_t, n_mass, n_nnz = zero - float("inf"), zero, zero, zero
    for v0 in range(0, V, BV):
        offs_v = v0 + tl.arange(0, BV)
        s, _ = unit_similarity(rows, r_norm, offs_r, offs_r < R, cols, c_norm, offs_v, offs_v < V, D, BR, BV, BK,
                               PRECISION)
        w_pos, w_neg = _weights(r_li, r_lj, r_ix, c_li, c_lj, c_ix, mask_ptr, offs_r, offs_v, R, V, label_lam,
                                MEMBER, NEGATIVE, MIXED_ROWS, HAS_MASK)
        p_m, p_t, p_mass, p_nnz = term_update(p_m, p_t, p_mass, p_nnz, sigma_x(s, p_scale, p_shift, P_OF),
                                              w_pos, P_FORM, False)
        n_m, n_t, n_mass, n_nnz = term_update(n_m, n_t, n_mass, n_nnz, sigma_x(s, n_scale, n_shift, N_OF),
                                              w_neg, N_FORM, False)
    out = offs_r < R
    tl.store(stats + offs_r, term_value(p_m, p_t, P_FORM), mask=out)
    tl.store(stats + R + offs_r, term_value(n_m, n_t, N_FORM), mask=out)
    tl.store(stats + 2 * R + offs_r, p_mass, mask=out)
    tl.store(stats + 3 * R + offs_r, n_mass, mask=out)
    tl.store(stats + 4 * R + offs_r, p_nnz, mask=out)
    tl.store(stats + 5 * R + offs_r, n_nnz, mask=out)


@triton.jit
def _grad_tile(rows, cols, D, offs_r, offs_v, r_li, r_lj, r_ix, c_li, c_lj, c_ix, mask_ptr, r_norm, c_norm, stats,
               g_pos, g_neg,
               R, V, label_lam, p_scale, p_shift, n_scale, n_shift,
               P_FORM: tl.constexpr, P_OF: tl.constexpr, N_FORM: tl.constexpr, N_OF: tl.constexpr,
               MEMBER: tl.constexpr, NEGATIVE: tl.constexpr, MIXED_ROWS: tl.constexpr, HAS_MASK: tl.constexpr,
               PRECISION: tl.constexpr, BR: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr):
    """dLoss/d<row, col> of a [BR, BV] tile of raw rows, norms held fixed (dLoss/ds / (|row| |col|)),
    recomputed from the rows' saved term sums."""
    in_r = offs_r < R
    s, norms = unit_similarity(rows, r_norm, offs_r, in_r, cols, c_norm, offs_v, offs_v < V, D, BR, BV, BK, PRECISION)
    w_pos, w_neg = _weights(r_li, r_lj, r_ix, c_li, c_lj, c_ix, mask_ptr, offs_r, offs_v, R, V, label_lam,
                            MEMBER, NEGATIVE, MIXED_ROWS, HAS_MASK)
    p_val = tl.load(stats + offs_r, mask=in_r, other=0.0)[:, None]
    n_val = tl.load(stats + R + offs_r, mask=in_r, other=0.0)[:, None]
    gp = tl.load(g_pos + offs_r, mask=in_r, other=0.0)[:, None]
    gn = tl.load(g_neg + offs_r, mask=in_r, other=0.0)[:, None]
    ds = gp * term_grad(sigma_x(s, p_scale, p_shift, P_OF), w_pos, p_val, P_FORM) * sigma_dx(s, p_scale, P_OF)
    ds += gn * term_grad(sigma_x(s, n_scale, n_shift, N_OF), w_neg, n_val, N_FORM) * sigma_dx(s, n_scale, N_OF)
    return ds / norms


@triton.jit(do_not_specialize=["R", "V", "r0", "r1"])
def _grad_s(rows, r_li, r_lj, r_ix, cols, c_li, c_lj, c_ix, mask_ptr, r_norm, c_norm, stats, g_pos, g_neg, ds_out,
            r0, r1, R, V, D, label_lam, p_scale, p_shift, n_scale, n_shift,
            P_FORM: tl.constexpr, P_OF: tl.constexpr, N_FORM: tl.constexpr, N_OF: tl.constexpr,
            MEMBER: tl.constexpr, NEGATIVE: tl.constexpr, MIXED_ROWS: tl.constexpr, HAS_MASK: tl.constexpr,
            PRECISION: tl.constexpr, BR: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr):
    """_grad_tile of rows r0..r1 x all columns, one [BR, BV] tile per program, into ds_out [r1 - r0, V]."""
    offs_r = r0 + tl.program_id(0) * BR + tl.arange(0, BR)
    offs_v = tl.program_id(1) * BV + tl.arange(0, BV)
    ds = _grad_tile(rows, cols, D, offs_r, offs_v, r_li, r_lj, r_ix, c_li, c_lj, c_ix, mask_ptr, r_norm, c_norm,
                    stats, g_pos, g_neg,
                    R, V, label_lam, p_scale, p_shift, n_scale, n_shift, P_FORM, P_OF, N_FORM, N_OF, MEMBER,
                    NEGATIVE, MIXED_ROWS, HAS_MASK, PRECISION, BR, BV, BK)
    tl.store(ds_out + (offs_r - r0)[:, None] * V + offs_v[None, :], ds,
             mask=(offs_r < r1)[:, None] & (offs_v < V)[None, :])


def _blocks(d: int, dtype) -> tuple[int, int, int]:
    """(row tile, column tile, width chunk of the products)."""
    if INTERPRET:  # small tiles, so that small test batches span several tiles
        return MIN_BLOCK, MIN_BLOCK, k_block(d, dtype)
    return 64, 64, k_block(d, dtype)


def _launch_args(rows, row_label_i, row_label_j, row_index, cols, col_label_i, col_label_j, col_index,
                 member_mask, lam, cfg, norms):
    p = sigma_codes(cfg.sigma_pos)
    n = sigma_codes(cfg.sigma_neg)
    mask = member_mask if member_mask is not None else row_label_i  # a dummy pointer when unused
    tensors = (rows, row_label_i, row_label_j, row_index, cols, col_label_i, col_label_j, col_index, mask, *norms)
    scalars = (label_factor(lam, cfg.label_mode), p[2], p[3], n[2], n[3])
    consts = dict(P_FORM=p[0], P_OF=p[1], N_FORM=n[0], N_OF=n[1], MEMBER=cfg.member, NEGATIVE=cfg.label_mode == LABEL_NEGATIVE,
                  MIXED_ROWS=bool(cfg.mixed_rows), HAS_MASK=member_mask is not None,
                  PRECISION=dot_precision(rows.dtype))
    return tensors, scalars, consts


def pairwise_forward(rows, row_label_i, row_label_j, row_index, cols, col_label_i, col_label_j, col_index,
                     lam, cfg, member_mask=None, *, norms):
    rows, cols = interpretable(rows), interpretable(cols)
    r, d = rows.shape
    v = cols.shape[0]
    stats = torch.empty(6, r, device=rows.device, dtype=torch.float32)
    if r == 0:
        return stats
    tensors, scalars, consts = _launch_args(rows, row_label_i, row_label_j, row_index, cols, col_label_i,
                                            col_label_j, col_index, member_mask, lam, cfg, norms)
    br, bv, bk = _blocks(d, rows.dtype)
    _forward[(triton.cdiv(r, br),)](*tensors, stats, r, v, d, *scalars, **consts, BR=br, BV=bv, BK=bk, num_warps=4)
    return stats


def pairwise_backward(rows, row_label_i, row_label_j, row_index, cols, col_label_i, col_label_j, col_index,
                      lam, cfg, stats, grad_pos_sum, grad_neg_sum, member_mask=None, *, norms):
    """add_pairwise_grads into new buffers, then a last pass takes each gradient through its rows'
    normalization, in place."""
    dtype = rows.dtype
    same = rows is cols  # one gradient buffer, the sum of both (backends contract)
    if rows.shape[0] == 0 or cols.shape[0] == 0:
        return torch.zeros_like(rows, dtype=dtype), torch.zeros_like(cols, dtype=dtype)
    grad_cols = torch.empty(cols.shape, device=rows.device, dtype=torch.float32)
    grad_rows = grad_cols if same else torch.empty(rows.shape, device=rows.device, dtype=torch.float32)
    add_pairwise_grads(rows, row_label_i, row_label_j, row_index, cols, col_label_i, col_label_j, col_index, lam, cfg,
                       stats, grad_pos_sum, grad_neg_sum, member_mask, norms, grad_rows, grad_cols)
    through_norms_(grad_rows, interpretable(rows), norms[0])
    if same:
        return grad_rows.to(dtype), zeros_like_free(cols, dtype)
    return grad_rows.to(dtype), through_norms_(grad_cols, interpretable(cols), norms[1]).to(dtype)


def add_pairwise_grads(rows, row_label_i, row_label_j, row_index, cols, col_label_i, col_label_j, col_index,
                       lam, cfg, stats, grad_pos_sum, grad_neg_sum, member_mask, norms, grad_rows, grad_cols,
                       accumulate=False):
    """The gradients with the norms held fixed, written into the float32 grad_rows and grad_cols (one
    buffer when rows is cols), or added to them if accumulate. Chunks of rows: a kernel recomputes the
    chunk's similarity tiles and writes dLoss/ds (over the norms), then two matrix products (torch, i.e.
    cuBLAS) turn it into dS @ cols for the chunk's rows and dS^T @ rows added to the columns'."""
    same = rows is cols
    rows, cols = interpretable(rows), interpretable(cols)
    r, d = rows.shape
    v = cols.shape[0]
    tensors, scalars, consts = _launch_args(rows, row_label_i, row_label_j, row_index, cols, col_label_i,
                                            col_label_j, col_index, member_mask, lam, cfg, norms)
    br, bv, bk = _blocks(d, rows.dtype)
    chunk = min(chunk_rows(d, br), r)
    ds = torch.empty(chunk, v, device=rows.device, dtype=torch.float32)
    rows32, cols32 = rows.float(), cols.float()
    g_pos, g_neg = grad_pos_sum.contiguous(), grad_neg_sum.contiguous()
    for r0 in range(0, r, chunk):
        r1 = min(r0 + chunk, r)
        _grad_s[(triton.cdiv(r1 - r0, br), triton.cdiv(v, bv))](
            *tensors, stats, g_pos, g_neg, ds, r0, r1, r, v, d, *scalars, **consts, BR=br, BV=bv, BK=bk,
            num_warps=4)
        add_chunk_products(ds[: r1 - r0], r0, r1, rows32, cols32, grad_rows, grad_cols, same, accumulate=accumulate)
