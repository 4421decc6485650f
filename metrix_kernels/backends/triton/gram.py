"""Embedding mixup through the Gram matrix: anchors x all mixed pairs (i, j) of the batch.

For unit e_i, e_j the anchor-to-mix similarity is (SPEC 1.3)
    s(a, ij) = (lam <a, e_i> + (1 - lam) <a, e_j>) / n_ij,  n_ij = sqrt(lam^2 + (1-lam)^2 + 2 lam (1-lam) <e_i, e_j>)
so a forward program holds an anchor tile, walks i tiles and, inside, j tiles: three similarity tiles
(<a, e_i>, <a, e_j>, <e_i, e_j>, each accumulated over the width in chunks) combined elementwise into
an [anchor, i, j] block, then folded into the per-anchor term statistics. No mixed embedding and no
B x B^2 tensor exists. Anchors and embeddings come raw: every similarity tile is divided by the
rows' norms, so their unit rows are never written either, and a class-sorted batch is read through
the sort's permutation (order), not copied. While the batch is small next to the width
(GRAM_WIDTHS), the similarity tiles are loaded from Gram matrices written first (one launch) instead
of recomputed over the width.
Membership lets whole (anchor tile, i tile) blocks be skipped: pos-neg / pos-pos need an i of the
anchor's class, anc-neg needs i = a. Unordered pair sets (pos-pos, neg-neg) walk j >= i only.

Backward, with g = dLoss/ds(a, ij) recomputed from the saved per-anchor term sums: the loss depends
on the embeddings only through P = <a, e_t> and G = <e_i, e_j>, so
    grad_a = dP @ E,   grad_E = dP^T @ A + dG @ E + dG^T @ E.
Two kernels write dP and dG by chunks of about d / 2 rows (each chunk is then half the size of the
embeddings), their columns at the rows' own places; cuBLAS products fold each chunk into the
gradients, taken through the normalization at the end, in place. One program per [16, 16] tile of
dP sums over the pairs its embedding t is part of (as i: all j; as j: the anchor's i), one per tile
of dG over the anchors that mix its i (a range per i tile, from the anchors' class grouping).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ...backends import LABEL_NEGATIVE, MEMBER_ANC_NEG, MEMBER_NEG_NEG, MEMBER_POS_NEG, MEMBER_POS_POS
from .common import (
    INTERPRET,
    add_chunk_products,
    chunk_rows,
    dot_precision,
    interpretable,
    label_factor,
    norm_products,
    padded_dim,
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

# The Gram matrices (anchors x embeddings, embeddings x embeddings) are written once per pass while
# the batch is at most this many times as large as the width d: they then take at most this many times
# the memory of the inputs, and the kernels load similarities instead of recomputing a product over
# the width for every tile (the small-batch kernels are bound by those products' latency).
GRAM_WIDTHS = 4


@triton.jit
def _ids(order, offs, inside, ORDER: tl.constexpr):
    """The rows at positions offs: order[offs] if ORDER (the op reads the batch through a permutation
    rather than a permuted copy), else offs."""
    if ORDER:
        ids = tl.load(order + offs, mask=inside, other=0)
    else:
        ids = offs
    return ids


@triton.jit
def _products(a_ptr, a_norm, b_ptr, b_norm, order, out, NA, B, D, BA: tl.constexpr, BB: tl.constexpr,
              BK: tl.constexpr, PRECISION: tl.constexpr, A_ORDER: tl.constexpr, B_ORDER: tl.constexpr):
    """out [NA, B] = the unit rows' a @ b^T by positions, in float32, one [BA, BB] tile per program."""
    offs_a = tl.program_id(0) * BA + tl.arange(0, BA)
    offs_b = tl.program_id(1) * BB + tl.arange(0, BB)
    in_a = offs_a < NA
    in_b = offs_b < B
    s, _ = unit_similarity(a_ptr, a_norm, _ids(order, offs_a, in_a, A_ORDER), in_a, b_ptr, b_norm,
                           _ids(order, offs_b, in_b, B_ORDER), in_b, D, BA, BB, BK, PRECISION)
    tl.store(out + offs_a[:, None] * B + offs_b[None, :], s, mask=in_a[:, None] & in_b[None, :])


@triton.jit
def _sim(g, a_ptr, a_norm, order, offs_a, n_a, b_ptr, b_norm, offs_b, n_b, D, BA: tl.constexpr, BB: tl.constexpr,
         BK: tl.constexpr, PRECISION: tl.constexpr, GRAM: tl.constexpr, A_ORDER: tl.constexpr,
         B_ORDER: tl.constexpr):
    """[BA, BB] similarities of the unit rows at positions offs_a of a_ptr (n_a of them, norms a_norm)
    to those at offs_b of b_ptr: loaded from the Gram matrix g [., n_b] if GRAM, else computed (zero
    outside the bounds either way)."""
    in_a = offs_a < n_a
    in_b = offs_b < n_b
    if GRAM:
        s = tl.load(g + offs_a[:, None].to(tl.int64) * n_b + offs_b[None, :], mask=in_a[:, None] & in_b[None, :],
                    other=0.0)
    else:
        s, _ = unit_similarity(a_ptr, a_norm, _ids(order, offs_a, in_a, A_ORDER), in_a, b_ptr, b_norm,
                               _ids(order, offs_b, in_b, B_ORDER), in_b, D, BA, BB, BK, PRECISION)
    return s


@triton.jit
def _i_range(idx, in_a, B, MEMBER: tl.constexpr):
    """The i positions an anchor tile can mix with: its own indices for anc-neg, else all."""
    if MEMBER == 3:
        lo = tl.min(tl.where(in_a, idx, B), axis=0).to(tl.int32)
        hi = tl.max(tl.where(in_a, idx + 1, 0), axis=0).to(tl.int32)
    else:
        lo = 0
        hi = B
    return lo, hi


@triton.jit
def _live(z, idx, li, offs_i, in_a, in_i, MEMBER: tl.constexpr):
    """Whether any anchor of the tile can have any i of the i tile in its mixing set."""
    both = in_a[:, None] & in_i[None, :]
    if MEMBER == 3:
        hit = both & (offs_i[None, :] == idx[:, None])
    elif MEMBER == 2 or MEMBER == 4:
        hit = both & (li[None, :] == z[:, None])
    else:
        hit = both
    return tl.max(tl.max(hit.to(tl.int32), axis=1), axis=0) > 0


@triton.jit
def _mixed(s_ai, s_aj, s_ij, z, idx, li, lj, offs_i, offs_j, in_a, in_i, in_j, lam, label_lam,
           MEMBER: tl.constexpr, NEGATIVE: tl.constexpr):
    """Similarities s [A, I, J] of anchors to the mixes, the mixes' norms n and root [I, J], weights."""
    root = tl.sqrt(tl.maximum(lam * lam + (1.0 - lam) * (1.0 - lam) + 2.0 * lam * (1.0 - lam) * s_ij, 0.0))
    n = tl.maximum(root, 1e-12)  # F.normalize's clamp of the mix's norm
    s = (lam * s_ai[:, :, None] + (1.0 - lam) * s_aj[:, None, :]) / n[None, :, :]
    if MEMBER == 4 or MEMBER == 5:
        order = offs_i[:, None] < offs_j[None, :]
    else:
        order = offs_i[:, None] != offs_j[None, :]
    valid = in_a[:, None, None] & (order & in_i[:, None] & in_j[None, :])[None, :, :]
    w_pos, w_neg = pair_weights(z[:, None, None], idx[:, None, None], li[None, :, None], lj[None, None, :],
                                offs_i[None, :, None], label_lam, valid, MEMBER, NEGATIVE)
    return s, n, root, w_pos, w_neg


@triton.jit
def _mixed_grad(s_ai, s_aj, s_ij, z, idx, li, lj, offs_i, offs_j, in_a, in_i, in_j, lam, label_lam, p_val, n_val, gp, gn,
                p_scale, p_shift, n_scale, n_shift, P_FORM: tl.constexpr, P_OF: tl.constexpr,
                N_FORM: tl.constexpr, N_OF: tl.constexpr, MEMBER: tl.constexpr, NEGATIVE: tl.constexpr):
    """(g / n, g * ds/d<e_i, e_j> / (lam (1 - lam))) per [A, I, J], g = dLoss/ds(a, ij)."""
    s, n, root, w_pos, w_neg = _mixed(s_ai, s_aj, s_ij, z, idx, li, lj, offs_i, offs_j, in_a, in_i, in_j, lam,
                                      label_lam, MEMBER, NEGATIVE)
    g = gp[:, None, None] * term_grad(sigma_x(s, p_scale, p_shift, P_OF), w_pos, p_val[:, None, None], P_FORM) \
        * sigma_dx(s, p_scale, P_OF)
    g += gn[:, None, None] * term_grad(sigma_x(s, n_scale, n_shift, N_OF), w_neg, n_val[:, None, None], N_FORM) \
        * sigma_dx(s, n_scale, N_OF)
    over_n = g / n[None, :, :]
    # n = sqrt(q): ds/dq = -s / (2 n^2), dq/d<e_i,e_j> = 2 lam (1 - lam); none where the norm is clamped
    d_ij = tl.where((root > 1e-12)[None, :, :], -over_n * s / n[None, :, :], 0.0)
    return over_n, d_ij


@triton.jit
def _j_tile(anchors, emb, labels, g_ae, g_ee, a_norm, e_norm, order, offs_a, n_a, offs_i, j0, B, D, BA: tl.constexpr,
            BE: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr, GRAM: tl.constexpr, A_ORDER: tl.constexpr,
            E_ORDER: tl.constexpr):
    """A tile of second members j0..: (positions, in range, labels, <a, e_j> [BA, BE], <e_i, e_j> [BE, BE])."""
    offs_j = j0 + tl.arange(0, BE)
    in_j = offs_j < B
    lj = tl.load(labels + offs_j, mask=in_j, other=-2)
    s_aj = _sim(g_ae, anchors, a_norm, order, offs_a, n_a, emb, e_norm, offs_j, B, D, BA, BE, BK, PRECISION, GRAM,
                A_ORDER, E_ORDER)
    s_ij = _sim(g_ee, emb, e_norm, order, offs_i, B, emb, e_norm, offs_j, B, D, BE, BE, BK, PRECISION, GRAM, E_ORDER,
                E_ORDER)
    return offs_j, in_j, lj, s_aj, s_ij


@triton.jit(do_not_specialize=["NA", "B"])
def _forward(anchors, anchor_label, anchor_index, emb, labels, g_ae, g_ee, a_norm, e_norm, order, stats, NA, B, D, lam,
             label_lam, p_scale, p_shift, n_scale, n_shift,
             P_FORM: tl.constexpr, P_OF: tl.constexpr, N_FORM: tl.constexpr, N_OF: tl.constexpr,
             MEMBER: tl.constexpr, NEGATIVE: tl.constexpr, PRECISION: tl.constexpr, GRAM: tl.constexpr,
             A_ORDER: tl.constexpr, E_ORDER: tl.constexpr,
             BA: tl.constexpr, BE: tl.constexpr, BK: tl.constexpr):
    offs_a = tl.program_id(0) * BA + tl.arange(0, BA)
    in_a = offs_a < NA
    z = tl.load(anchor_label + offs_a, mask=in_a, other=-1)
    idx = tl.load(anchor_index + offs_a, mask=in_a, other=-1)
    zero = tl.zeros([BA], dtype=tl.float32)
    p_m, p_t, p_mass, p_nnz = zero - float("inf"), zero, zero, zero
    n_m, n_t, n_mass, n_nnz = zero - float("inf"), zero, zero, zero
    i_lo, i_hi = _i_range(idx, in_a, B, MEMBER)
    for i0 in range(i_lo, i_hi, BE):
        offs_i = i0 + tl.arange(0, BE)
        in_i = offs_i < B
        li = tl.load(labels + offs_i, mask=in_i, other=-2)
        if _live(z, idx, li, offs_i, in_a, in_i, MEMBER):
            s_ai = _sim(g_ae, anchors, a_norm, order, offs_a, NA, emb, e_norm, offs_i, B, D, BA, BE, BK, PRECISION,
                        GRAM, A_ORDER, E_ORDER)
            j_lo = i0 if (MEMBER == 4 or MEMBER == 5) else 0
            for j0 in range(j_lo, B, BE):
                offs_j, in_j, lj, s_aj, s_ij = _j_tile(anchors, emb, labels, g_ae, g_ee, a_norm, e_norm, order,
                                                       offs_a, NA, offs_i, j0, B, D, BA, BE, BK, PRECISION, GRAM,
                                                       A_ORDER, E_ORDER)
                s, n, root, w_pos, w_neg = _mixed(s_ai, s_aj, s_ij, z, idx, li, lj, offs_i, offs_j, in_a, in_i,
                                                  in_j, lam, label_lam, MEMBER, NEGATIVE)
                p_m, p_t, p_mass, p_nnz = term_update(p_m, p_t, p_mass, p_nnz, sigma_x(s, p_scale, p_shift, P_OF),
                                                      w_pos, P_FORM, True)
                n_m, n_t, n_mass, n_nnz = term_update(n_m, n_t, n_mass, n_nnz, sigma_x(s, n_scale, n_shift, N_OF),
                                                      w_neg, N_FORM, True)
    tl.store(stats + offs_a, term_value(p_m, p_t, P_FORM), mask=in_a)
    tl.store(stats + NA + offs_a, term_value(n_m, n_t, N_FORM), mask=in_a)
    tl.store(stats + 2 * NA + offs_a, p_mass, mask=in_a)
    tl.store(stats + 3 * NA + offs_a, n_mass, mask=in_a)
    tl.store(stats + 4 * NA + offs_a, p_nnz, mask=in_a)
    tl.store(stats + 5 * NA + offs_a, n_nnz, mask=in_a)


@triton.jit
def _anchor_state(anchor_label, anchor_index, stats, g_pos, g_neg, offs_a, NA):
    in_a = offs_a < NA
    z = tl.load(anchor_label + offs_a, mask=in_a, other=-1)
    idx = tl.load(anchor_index + offs_a, mask=in_a, other=-1)
    p_val = tl.load(stats + offs_a, mask=in_a, other=0.0)
    n_val = tl.load(stats + NA + offs_a, mask=in_a, other=0.0)
    gp = tl.load(g_pos + offs_a, mask=in_a, other=0.0)
    gn = tl.load(g_neg + offs_a, mask=in_a, other=0.0)
    return in_a, z, idx, p_val, n_val, gp, gn


@triton.jit(do_not_specialize=["NA", "B", "a0", "a1"])
def _grad_p(anchors, anchor_label, anchor_index, emb, labels, g_ae, g_ee, a_norm, e_norm, order, stats, g_pos, g_neg,
            i_ranges, dp_out, a0, a1, NA, B, D, lam, label_lam, p_scale, p_shift, n_scale, n_shift,
            P_FORM: tl.constexpr, P_OF: tl.constexpr, N_FORM: tl.constexpr, N_OF: tl.constexpr,
            MEMBER: tl.constexpr, NEGATIVE: tl.constexpr, PRECISION: tl.constexpr, GRAM: tl.constexpr,
            A_ORDER: tl.constexpr, E_ORDER: tl.constexpr, RANGES: tl.constexpr, BA: tl.constexpr, BE: tl.constexpr,
            BK: tl.constexpr):
    """dLoss/d<a, e_t> for anchors a0..a1 x embeddings t, one [BA, BE] tile per program, into dp_out:
    t as the first member of pairs (t, j), weight lam, and as the second of pairs (i, t), 1 - lam,
    with i walked over the anchor tile's range in i_ranges [2, anchor tiles] if RANGES."""
    offs_a = a0 + tl.program_id(0) * BA + tl.arange(0, BA)
    t0 = tl.program_id(1) * BE
    offs_t = t0 + tl.arange(0, BE)
    in_t = offs_t < B
    lt = tl.load(labels + offs_t, mask=in_t, other=-2)
    in_a, z, idx, p_val, n_val, gp, gn = _anchor_state(anchor_label, anchor_index, stats, g_pos, g_neg, offs_a, NA)
    in_a = in_a & (offs_a < a1)
    acc = tl.zeros([BA, BE], dtype=tl.float32)
    s_at = _sim(g_ae, anchors, a_norm, order, offs_a, a1, emb, e_norm, offs_t, B, D, BA, BE, BK, PRECISION, GRAM,
                A_ORDER, E_ORDER)
    if _live(z, idx, lt, offs_t, in_a, in_t, MEMBER):
        j_lo = t0 if (MEMBER == 4 or MEMBER == 5) else 0
        for j0 in range(j_lo, B, BE):
            offs_j, in_j, lj, s_aj, s_tj = _j_tile(anchors, emb, labels, g_ae, g_ee, a_norm, e_norm, order, offs_a, a1,
                                                   offs_t, j0, B, D, BA, BE, BK, PRECISION, GRAM, A_ORDER, E_ORDER)
            over_n, d_ij = _mixed_grad(s_at, s_aj, s_tj, z, idx, lt, lj, offs_t, offs_j, in_a, in_t, in_j,
                                       lam, label_lam, p_val, n_val, gp, gn, p_scale, p_shift, n_scale, n_shift,
                                       P_FORM, P_OF, N_FORM, N_OF, MEMBER, NEGATIVE)
            acc += lam * tl.sum(over_n, axis=2)
    if RANGES:
        tile = a0 // BA + tl.program_id(0)
        i_lo = tl.load(i_ranges + tile)
        i_hi = tl.load(i_ranges + tl.cdiv(NA, BA) + tile)
    else:
        i_lo, i_hi = _i_range(idx, in_a, B, MEMBER)
    if MEMBER == 4 or MEMBER == 5:
        i_hi = tl.minimum(i_hi, t0 + BE)
    for i0 in range(i_lo, i_hi, BE):
        offs_i = i0 + tl.arange(0, BE)
        in_i = offs_i < B
        li = tl.load(labels + offs_i, mask=in_i, other=-2)
        if _live(z, idx, li, offs_i, in_a, in_i, MEMBER):
            s_ai = _sim(g_ae, anchors, a_norm, order, offs_a, a1, emb, e_norm, offs_i, B, D, BA, BE, BK, PRECISION,
                        GRAM, A_ORDER, E_ORDER)
            s_it = _sim(g_ee, emb, e_norm, order, offs_i, B, emb, e_norm, offs_t, B, D, BE, BE, BK, PRECISION, GRAM,
                        E_ORDER, E_ORDER)
            over_n, d_ij = _mixed_grad(s_ai, s_at, s_it, z, idx, li, lt, offs_i, offs_t, in_a, in_i, in_t,
                                       lam, label_lam, p_val, n_val, gp, gn, p_scale, p_shift, n_scale, n_shift,
                                       P_FORM, P_OF, N_FORM, N_OF, MEMBER, NEGATIVE)
            acc += (1.0 - lam) * tl.sum(over_n, axis=1)
    # dLoss/d<raw a, raw e_t>, in the column of e_t's row
    ids_t = _ids(order, offs_t, in_t, E_ORDER)
    acc = acc / norm_products(a_norm, _ids(order, offs_a, in_a, A_ORDER), in_a, e_norm, ids_t, in_t)
    tl.store(dp_out + (offs_a - a0)[:, None] * B + ids_t[None, :], acc, mask=in_a[:, None] & in_t[None, :])


@triton.jit(do_not_specialize=["NA", "B", "i0", "i1"])
def _grad_g(anchors, anchor_label, anchor_index, emb, labels, g_ae, g_ee, a_norm, e_norm, order, stats, g_pos, g_neg,
            anchor_ranges, dg_out, i0, i1, NA, B, D, lam, label_lam, p_scale, p_shift, n_scale, n_shift,
            P_FORM: tl.constexpr, P_OF: tl.constexpr, N_FORM: tl.constexpr, N_OF: tl.constexpr,
            MEMBER: tl.constexpr, NEGATIVE: tl.constexpr, PRECISION: tl.constexpr, GRAM: tl.constexpr,
            A_ORDER: tl.constexpr, E_ORDER: tl.constexpr, RANGES: tl.constexpr, BA: tl.constexpr, BE: tl.constexpr,
            BK: tl.constexpr):
    """dLoss/d<e_i, e_j> for i in i0..i1 x all j, one [BE, BE] tile per program, into dg_out; the anchors
    walked are those of the i tile's range in anchor_ranges [2, i tiles] if RANGES, else all."""
    tile = i0 // BE + tl.program_id(0)
    offs_i = tile * BE + tl.arange(0, BE)
    j0 = tl.program_id(1) * BE
    offs_j = j0 + tl.arange(0, BE)
    in_i = offs_i < i1
    in_j = offs_j < B
    acc = tl.zeros([BE, BE], dtype=tl.float32)
    if (MEMBER != 4 and MEMBER != 5) | (j0 + BE > tile * BE):  # unordered pairs need i < j
        li = tl.load(labels + offs_i, mask=in_i, other=-2)
        lj = tl.load(labels + offs_j, mask=in_j, other=-2)
        s_ij = _sim(g_ee, emb, e_norm, order, offs_i, B, emb, e_norm, offs_j, B, D, BE, BE, BK, PRECISION, GRAM,
                    E_ORDER, E_ORDER)
        a_lo = 0
        a_hi = NA
        if RANGES:
            a_lo = tl.load(anchor_ranges + tile)
            a_hi = tl.load(anchor_ranges + tl.cdiv(B, BE) + tile)
        for a_start in range(a_lo, a_hi, BA):
            offs_a = a_start + tl.arange(0, BA)
            in_a, z, idx, p_val, n_val, gp, gn = _anchor_state(anchor_label, anchor_index, stats, g_pos, g_neg,
                                                               offs_a, NA)
            if _live(z, idx, li, offs_i, in_a, in_i, MEMBER):
                s_ai = _sim(g_ae, anchors, a_norm, order, offs_a, NA, emb, e_norm, offs_i, B, D, BA, BE, BK,
                            PRECISION, GRAM, A_ORDER, E_ORDER)
                s_aj = _sim(g_ae, anchors, a_norm, order, offs_a, NA, emb, e_norm, offs_j, B, D, BA, BE, BK,
                            PRECISION, GRAM, A_ORDER, E_ORDER)
                over_n, d_ij = _mixed_grad(s_ai, s_aj, s_ij, z, idx, li, lj, offs_i, offs_j, in_a, in_i, in_j,
                                           lam, label_lam, p_val, n_val, gp, gn, p_scale, p_shift, n_scale, n_shift,
                                           P_FORM, P_OF, N_FORM, N_OF, MEMBER, NEGATIVE)
                acc += lam * (1.0 - lam) * tl.sum(d_ij, axis=0)
    # dLoss/d<raw e_i, raw e_j>, in the column of e_j's row
    ids_j = _ids(order, offs_j, in_j, E_ORDER)
    acc = acc / norm_products(e_norm, _ids(order, offs_i, in_i, E_ORDER), in_i, e_norm, ids_j, in_j)
    tl.store(dg_out + (offs_i - i0)[:, None] * B + ids_j[None, :], acc, mask=in_i[:, None] & in_j[None, :])


def _blocks(d: int) -> tuple[int, int, int]:
    """(anchor tile, embedding tile, width chunk of the products): the [A, I, J] blocks bound the tiles
    to 16, so a product step reads [16, 128] operands (8 KiB in float32)."""
    if INTERPRET:
        return 16, 16, 16
    return 16, 16, min(padded_dim(d), 128)


def _products_of(a, a_norm, b, b_norm, order, a_order, b_order, precision):
    """The unit rows' a @ b^T [positions of a, positions of b] in float32, by the kernels' own similarity
    products; a side's positions are rows of order where its flag says so."""
    out = torch.empty(a.shape[0], b.shape[0], device=a.device, dtype=torch.float32)
    tile = 16 if INTERPRET else 32
    _products[(triton.cdiv(a.shape[0], tile), triton.cdiv(b.shape[0], tile))](
        a, a_norm, b, b_norm, order, out, a.shape[0], b.shape[0], a.shape[1], BA=tile, BB=tile,
        BK=_blocks(a.shape[1])[2], PRECISION=precision, A_ORDER=a_order, B_ORDER=b_order, num_warps=4)
    return out


def _launch_args(anchors, anchor_label, anchor_index, emb, labels, lam, cfg, norms, order, same):
    """(tensors, scalars, constants) of the kernels; the tensors end with the Gram matrices (anchors x
    embeddings, embeddings x embeddings; one when the anchors are the embeddings) where GRAM_WIDTHS
    allows them, else with placeholders, the norms (anchors', embeddings') and the order."""
    if cfg.member not in (MEMBER_POS_NEG, MEMBER_ANC_NEG, MEMBER_POS_POS, MEMBER_NEG_NEG):
        raise ValueError(f"gram_mixed needs a pair-set membership rule, got {cfg.member}")
    p = sigma_codes(cfg.sigma_pos)
    n = sigma_codes(cfg.sigma_neg)
    scalars = (float(lam), label_factor(lam, cfg.label_mode), p[2], p[3], n[2], n[3])
    precision = dot_precision(anchors.dtype)
    gram = 0 < emb.shape[0] <= GRAM_WIDTHS * emb.shape[1]
    e_order = order is not None
    a_order = same and e_order
    consts = dict(P_FORM=p[0], P_OF=p[1], N_FORM=n[0], N_OF=n[1], MEMBER=cfg.member,
                  NEGATIVE=cfg.label_mode == LABEL_NEGATIVE, PRECISION=precision, GRAM=gram, A_ORDER=a_order,
                  E_ORDER=e_order)
    a_norm, e_norm = norms
    order = order if e_order else labels  # a dummy pointer when unused
    if gram:
        g_ee = _products_of(emb, e_norm, emb, e_norm, order, e_order, e_order, precision)
        g_ae = g_ee if same else _products_of(anchors, a_norm, emb, e_norm, order, a_order, e_order, precision)
    else:
        g_ae = g_ee = emb
    return (anchors, anchor_label, anchor_index, emb, labels, g_ae, g_ee, a_norm, e_norm, order), scalars, consts


def gram_mixed_forward(anchors, anchor_label, anchor_index, emb, labels, lam, cfg, *, norms, order=None):
    same = anchors is emb
    anchors, emb = interpretable(anchors), interpretable(emb)
    na, d = anchors.shape
    stats = torch.empty(6, na, device=anchors.device, dtype=torch.float32)
    if na == 0:
        return stats
    tensors, scalars, consts = _launch_args(anchors, anchor_label, anchor_index, emb, labels, lam, cfg, norms, order,
                                            same)
    ba, be, bk = _blocks(d)
    _forward[(triton.cdiv(na, ba),)](*tensors, stats, na, emb.shape[0], d, *scalars, **consts, BA=ba, BE=be, BK=bk,
                                     num_warps=4)
    return stats


def _tile_ranges(tile_keys, keys, size):
    """[2, tiles] int32: for each tile of ``size`` consecutive tile_keys, the positions [lo, hi) of the
    keys lying in the tile's key range; every position when the keys are not grouped (sorted). The ops
    layer sorts pos-neg / anc-neg batches by class and proxies come in class order, so a tile of
    anchors then meets only the i of its classes, and a tile of i only the anchors of its classes.
    No host sync."""
    tiles = triton.cdiv(tile_keys.shape[0], size)
    keys, tile_keys = keys.to(torch.int64).contiguous(), tile_keys.to(torch.int64)
    pad = tiles * size - tile_keys.shape[0]
    lo = F.pad(tile_keys, (0, pad), value=2**62).view(tiles, size).amin(1)
    hi = F.pad(tile_keys, (0, pad), value=-(2**62)).view(tiles, size).amax(1)
    ranges = torch.stack([torch.searchsorted(keys, lo), torch.searchsorted(keys, hi, right=True)])
    full = torch.stack([torch.zeros_like(lo), torch.full_like(lo, keys.shape[0])])
    grouped = (keys[1:] >= keys[:-1]).all()
    return torch.where(grouped, ranges, full).to(torch.int32).contiguous()


def gram_mixed_backward(anchors, anchor_label, anchor_index, emb, labels, lam, cfg, stats, grad_pos_sum,
                        grad_neg_sum, *, norms, order=None):
    """add_gram_grads into new buffers, then a last pass takes each gradient through its rows'
    normalization, in place."""
    dtype = anchors.dtype
    same = anchors is emb  # one gradient buffer, the sum of both (backends contract)
    if anchors.shape[0] == 0 or emb.shape[0] == 0:
        return torch.zeros_like(anchors, dtype=dtype), torch.zeros_like(emb, dtype=dtype)
    grad_emb = torch.empty(emb.shape, device=emb.device, dtype=torch.float32)
    grad_anchors = grad_emb if same else torch.empty(anchors.shape, device=emb.device, dtype=torch.float32)
    add_gram_grads(anchors, anchor_label, anchor_index, emb, labels, lam, cfg, stats, grad_pos_sum, grad_neg_sum, norms,
                   order, grad_anchors, grad_emb)
    through_norms_(grad_emb, interpretable(emb), norms[1])
    if same:
        return grad_anchors.to(dtype), zeros_like_free(emb, dtype)
    return through_norms_(grad_anchors, interpretable(anchors), norms[0]).to(dtype), grad_emb.to(dtype)


def add_gram_grads(anchors, anchor_label, anchor_index, emb, labels, lam, cfg, stats, grad_pos_sum, grad_neg_sum,
                   norms, order, grad_anchors, grad_emb, accumulate=False):
    """The gradients with the norms held fixed, written into the float32 grad_anchors and grad_emb (one
    buffer when anchors is emb), or added to them if accumulate. Two kernels write, by chunks of rows,
    dLoss/d<a, e_t> (anchors x embeddings) and dLoss/d<e_i, e_j> (embeddings x embeddings) over the
    rows' norms; matrix products (cuBLAS) turn each chunk into its share of the gradients."""
    same = anchors is emb
    anchors, emb = interpretable(anchors), interpretable(emb)
    na, d = anchors.shape
    b = emb.shape[0]
    tensors, scalars, consts = _launch_args(anchors, anchor_label, anchor_index, emb, labels, lam, cfg, norms, order,
                                            same)
    ba, be, bk = _blocks(d)
    grads = (stats, grad_pos_sum.contiguous(), grad_neg_sum.contiguous())
    a32, e32 = anchors.float(), emb.float()
    chunk = chunk_rows(d, 16)
    block = torch.empty(min(chunk, max(na, b)), b, device=anchors.device, dtype=torch.float32)
    # Walking every tile of the other side is cheap for small batches; past that, ranges pay off.
    # Membership ties i to the anchor by class (pos-neg, pos-pos) or by index (anc-neg).
    use_ranges = cfg.member != MEMBER_NEG_NEG and triton.cdiv(max(na, b), ba) > (1 if INTERPRET else 64)
    i_ranges = anchor_ranges = labels  # dummy pointers when unused
    if use_ranges:
        positions = torch.arange(b, device=labels.device)
        anchor_keys, keys = (anchor_index, positions) if cfg.member == MEMBER_ANC_NEG else (anchor_label, labels)
        i_ranges, anchor_ranges = _tile_ranges(anchor_keys, keys, ba), _tile_ranges(keys, anchor_keys, be)
    for a0 in range(0, na, chunk):
        a1 = min(a0 + chunk, na)
        _grad_p[(triton.cdiv(a1 - a0, ba), triton.cdiv(b, be))](
            *tensors, *grads, i_ranges, block, a0, a1, na, b, d, *scalars, **consts, RANGES=use_ranges, BA=ba,
            BE=be, BK=bk, num_warps=4)
        add_chunk_products(block[: a1 - a0], a0, a1, a32, e32, grad_anchors, grad_emb, same,
                           row_ids=order if same else None, accumulate=accumulate)
    for i0 in range(0, b, chunk):
        i1 = min(i0 + chunk, b)
        _grad_g[(triton.cdiv(i1 - i0, be), triton.cdiv(b, be))](
            *tensors, *grads, anchor_ranges, block, i0, i1, na, b, d, *scalars, **consts, RANGES=use_ranges, BA=ba, BE=be,
            BK=bk, num_warps=4)
        add_chunk_products(block[: i1 - i0], i0, i1, e32, e32, grad_emb, grad_emb, True, row_ids=order,
                           accumulate=True)
