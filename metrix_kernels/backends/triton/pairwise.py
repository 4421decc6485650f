"""Fused pairwise loss terms: rows [R, d] x cols [V, d] reduced to per-row statistics.

Forward: one program per row tile walks the column tiles; each similarity tile s = rows @ cols^T
(accumulated over the width in chunks, common.similarity) is turned into pair weights (labels
compared in the kernel) and folded into running per-row term statistics (online log-sum-exp for
exponential sigmas). Nothing of size R x V is stored.
Backward: one launch, two kinds of programs, each for one chunk of the gradient's width. Row
programs walk the column tiles and accumulate dS @ cols; column programs walk the row tiles and
accumulate dS^T @ rows. Both recompute s and the weights and get
dS = g_pos * dterm_pos/ds + g_neg * dterm_neg/ds from the saved term sums.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import LABEL_NEGATIVE
from .common import (
    INTERPRET,
    MIN_BLOCK,
    dot_precision,
    interpretable,
    k_block,
    label_factor,
    load_chunk,
    padded_dim,
    pair_weights,
    sigma_codes,
    sigma_dx,
    sigma_x,
    similarity,
    term_grad,
    term_update,
    term_value,
)


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
def _forward(rows, r_li, r_lj, r_ix, cols, c_li, c_lj, c_ix, mask_ptr, stats, R, V, D, label_lam,
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
        s = similarity(rows, offs_r, R, cols, offs_v, V, D, BR, BV, BK, PRECISION)
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
def _grad_tile(rows, cols, D, offs_r, offs_v, r_li, r_lj, r_ix, c_li, c_lj, c_ix, mask_ptr, stats, g_pos, g_neg,
               R, V, label_lam, p_scale, p_shift, n_scale, n_shift,
               P_FORM: tl.constexpr, P_OF: tl.constexpr, N_FORM: tl.constexpr, N_OF: tl.constexpr,
               MEMBER: tl.constexpr, NEGATIVE: tl.constexpr, MIXED_ROWS: tl.constexpr, HAS_MASK: tl.constexpr,
               PRECISION: tl.constexpr, BR: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr):
    """dLoss/ds of a [BR, BV] tile, recomputed from the rows' saved term sums."""
    in_r = offs_r < R
    s = similarity(rows, offs_r, R, cols, offs_v, V, D, BR, BV, BK, PRECISION)
    w_pos, w_neg = _weights(r_li, r_lj, r_ix, c_li, c_lj, c_ix, mask_ptr, offs_r, offs_v, R, V, label_lam,
                            MEMBER, NEGATIVE, MIXED_ROWS, HAS_MASK)
    p_val = tl.load(stats + offs_r, mask=in_r, other=0.0)[:, None]
    n_val = tl.load(stats + R + offs_r, mask=in_r, other=0.0)[:, None]
    gp = tl.load(g_pos + offs_r, mask=in_r, other=0.0)[:, None]
    gn = tl.load(g_neg + offs_r, mask=in_r, other=0.0)[:, None]
    ds = gp * term_grad(sigma_x(s, p_scale, p_shift, P_OF), w_pos, p_val, P_FORM) * sigma_dx(s, p_scale, P_OF)
    ds += gn * term_grad(sigma_x(s, n_scale, n_shift, N_OF), w_neg, n_val, N_FORM) * sigma_dx(s, n_scale, N_OF)
    return ds


@triton.jit(do_not_specialize=["R", "V"])
def _backward(rows, r_li, r_lj, r_ix, cols, c_li, c_lj, c_ix, mask_ptr, stats, g_pos, g_neg, grad_rows, grad_cols,
              R, V, D, label_lam, p_scale, p_shift, n_scale, n_shift,
              P_FORM: tl.constexpr, P_OF: tl.constexpr, N_FORM: tl.constexpr, N_OF: tl.constexpr,
              MEMBER: tl.constexpr, NEGATIVE: tl.constexpr, MIXED_ROWS: tl.constexpr, HAS_MASK: tl.constexpr,
              PRECISION: tl.constexpr, BR: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr, BO: tl.constexpr):
    """Program (tile, chunk): the gradient of one row (or column) tile in output columns chunk*BO.."""
    pid = tl.program_id(0)
    row_tiles = tl.cdiv(R, BR)
    offs_o = tl.program_id(1) * BO + tl.arange(0, BO)
    if pid < row_tiles:
        offs_r = pid * BR + tl.arange(0, BR)
        acc = tl.zeros([BR, BO], dtype=tl.float32)
        for v0 in range(0, V, BV):
            offs_v = v0 + tl.arange(0, BV)
            ds = _grad_tile(rows, cols, D, offs_r, offs_v, r_li, r_lj, r_ix, c_li, c_lj, c_ix, mask_ptr, stats,
                            g_pos, g_neg, R, V, label_lam, p_scale, p_shift, n_scale, n_shift, P_FORM, P_OF, N_FORM,
                            N_OF, MEMBER, NEGATIVE, MIXED_ROWS, HAS_MASK, PRECISION, BR, BV, BK)
            x_c = load_chunk(cols, offs_v, V, offs_o, D)
            acc = tl.dot(ds.to(x_c.dtype), x_c, acc, input_precision=PRECISION)
        tl.store(grad_rows + offs_r[:, None] * D + offs_o[None, :], acc,
                 mask=(offs_r[:, None] < R) & (offs_o[None, :] < D))
    else:
        offs_v = (pid - row_tiles) * BV + tl.arange(0, BV)
        acc = tl.zeros([BV, BO], dtype=tl.float32)
        for r0 in range(0, R, BR):
            offs_r = r0 + tl.arange(0, BR)
            ds = _grad_tile(rows, cols, D, offs_r, offs_v, r_li, r_lj, r_ix, c_li, c_lj, c_ix, mask_ptr, stats,
                            g_pos, g_neg, R, V, label_lam, p_scale, p_shift, n_scale, n_shift, P_FORM, P_OF, N_FORM,
                            N_OF, MEMBER, NEGATIVE, MIXED_ROWS, HAS_MASK, PRECISION, BR, BV, BK)
            x_r = load_chunk(rows, offs_r, R, offs_o, D)
            acc = tl.dot(tl.trans(ds).to(x_r.dtype), x_r, acc, input_precision=PRECISION)
        tl.store(grad_cols + offs_v[:, None] * D + offs_o[None, :], acc,
                 mask=(offs_v[:, None] < V) & (offs_o[None, :] < D))


def _blocks(d: int, dtype) -> tuple[int, int, int, int]:
    """(row tile, column tile, width chunk of the products, width chunk of the gradients).

    The backward grid splits the gradient's width into chunks of at most 128 columns, so that its
    [64, 128] accumulator stays in registers; each chunk recomputes the similarity tiles."""
    if INTERPRET:  # small tiles, so that small test batches span several tiles and chunks
        return MIN_BLOCK, MIN_BLOCK, k_block(d, dtype), min(padded_dim(d), 2 * MIN_BLOCK)
    return 64, 64, k_block(d, dtype), min(padded_dim(d), 128)


def _launch_args(rows, row_label_i, row_label_j, row_index, cols, col_label_i, col_label_j, col_index,
                 member_mask, lam, cfg):
    p = sigma_codes(cfg.sigma_pos)
    n = sigma_codes(cfg.sigma_neg)
    mask = member_mask if member_mask is not None else row_label_i  # a dummy pointer when unused
    tensors = (rows, row_label_i, row_label_j, row_index, cols, col_label_i, col_label_j, col_index, mask)
    scalars = (label_factor(lam, cfg.label_mode), p[2], p[3], n[2], n[3])
    consts = dict(P_FORM=p[0], P_OF=p[1], N_FORM=n[0], N_OF=n[1], MEMBER=cfg.member, NEGATIVE=cfg.label_mode == LABEL_NEGATIVE,
                  MIXED_ROWS=bool(cfg.mixed_rows), HAS_MASK=member_mask is not None,
                  PRECISION=dot_precision(rows.dtype))
    return tensors, scalars, consts


def pairwise_forward(rows, row_label_i, row_label_j, row_index, cols, col_label_i, col_label_j, col_index,
                     lam, cfg, member_mask=None):
    rows, cols = interpretable(rows), interpretable(cols)
    r, d = rows.shape
    v = cols.shape[0]
    stats = torch.empty(6, r, device=rows.device, dtype=torch.float32)
    if r == 0:
        return stats
    tensors, scalars, consts = _launch_args(rows, row_label_i, row_label_j, row_index, cols, col_label_i,
                                            col_label_j, col_index, member_mask, lam, cfg)
    br, bv, bk, _ = _blocks(d, rows.dtype)
    _forward[(triton.cdiv(r, br),)](*tensors, stats, r, v, d, *scalars, **consts, BR=br, BV=bv, BK=bk, num_warps=4)
    return stats


def pairwise_backward(rows, row_label_i, row_label_j, row_index, cols, col_label_i, col_label_j, col_index,
                      lam, cfg, stats, grad_pos_sum, grad_neg_sum, member_mask=None):
    dtype = rows.dtype
    rows, cols = interpretable(rows), interpretable(cols)
    r, d = rows.shape
    v = cols.shape[0]
    grad_rows = torch.empty_like(rows)
    grad_cols = torch.empty_like(cols)
    if r == 0 or v == 0:
        return grad_rows.zero_(), grad_cols.zero_()
    tensors, scalars, consts = _launch_args(rows, row_label_i, row_label_j, row_index, cols, col_label_i,
                                            col_label_j, col_index, member_mask, lam, cfg)
    br, bv, bk, bo = _blocks(d, rows.dtype)
    grid = (triton.cdiv(r, br) + triton.cdiv(v, bv), triton.cdiv(d, bo))
    _backward[grid](*tensors, stats, grad_pos_sum.contiguous(), grad_neg_sum.contiguous(), grad_rows, grad_cols,
                    r, v, d, *scalars, **consts, BR=br, BV=bv, BK=bk, BO=bo, num_warps=8)
    return grad_rows.to(dtype), grad_cols.to(dtype)
