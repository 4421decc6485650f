"""Embedding mixup through the Gram matrix: anchors x all mixed pairs (i, j) of the batch.

For unit e_i, e_j the anchor-to-mix similarity is (SPEC 1.3)
    s(a, ij) = (lam <a, e_i> + (1 - lam) <a, e_j>) / n_ij,  n_ij = sqrt(lam^2 + (1-lam)^2 + 2 lam (1-lam) <e_i, e_j>)
so a program holds an anchor tile, walks i tiles and, inside, j tiles: three similarity tiles
(<a, e_i>, <a, e_j>, <e_i, e_j>, each accumulated over the width in chunks) combined elementwise into an [anchor, i, j] block, then folded into
the per-anchor term statistics. No mixed embedding and no B x B or B x B^2 tensor exists.
Membership lets whole (anchor tile, i tile) blocks be skipped: pos-neg / pos-pos need an i of the
anchor's class, anc-neg needs i = a. Unordered pair sets (pos-pos, neg-neg) walk j >= i only.

Backward, one launch with two kinds of programs (different reduction orders), each for one chunk of
the gradient's width:
  anchor programs (loops i, j):  grad_a = sum_ij g/n (lam e_i + (1-lam) e_j)
  embedding programs, for their tile x: once as i (loops a, j), once as j (loops a, i):
      grad_x += sum g/n * lam * a  + sum_a g * ds/d<e_i,e_j> * e_j   (x as i; symmetric as j)
with g = dLoss/ds(a, ij) recomputed from the saved per-anchor term sums.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...backends import LABEL_NEGATIVE, MEMBER_ANC_NEG, MEMBER_NEG_NEG, MEMBER_POS_NEG, MEMBER_POS_POS
from .common import (
    INTERPRET,
    dot_precision,
    interpretable,
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


@triton.jit(do_not_specialize=["NA", "B"])
def _forward(anchors, anchor_label, anchor_index, emb, labels, stats, NA, B, D, lam, label_lam,
             p_scale, p_shift, n_scale, n_shift,
             P_FORM: tl.constexpr, P_OF: tl.constexpr, N_FORM: tl.constexpr, N_OF: tl.constexpr,
             MEMBER: tl.constexpr, NEGATIVE: tl.constexpr, PRECISION: tl.constexpr,
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
            s_ai = similarity(anchors, offs_a, NA, emb, offs_i, B, D, BA, BE, BK, PRECISION)
            j_lo = i0 if (MEMBER == 4 or MEMBER == 5) else 0
            for j0 in range(j_lo, B, BE):
                offs_j = j0 + tl.arange(0, BE)
                in_j = offs_j < B
                lj = tl.load(labels + offs_j, mask=in_j, other=-2)
                s_aj = similarity(anchors, offs_a, NA, emb, offs_j, B, D, BA, BE, BK, PRECISION)
                s_ij = similarity(emb, offs_i, B, emb, offs_j, B, D, BE, BE, BK, PRECISION)
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


@triton.jit(do_not_specialize=["NA", "B"])
def _backward(anchors, anchor_label, anchor_index, emb, labels, stats, g_pos, g_neg, grad_anchors, grad_emb,
              NA, B, D, lam, label_lam, p_scale, p_shift, n_scale, n_shift,
              P_FORM: tl.constexpr, P_OF: tl.constexpr, N_FORM: tl.constexpr, N_OF: tl.constexpr,
              MEMBER: tl.constexpr, NEGATIVE: tl.constexpr, PRECISION: tl.constexpr,
              BA: tl.constexpr, BE: tl.constexpr, BK: tl.constexpr, BO: tl.constexpr):
    """Program (tile, chunk): the gradient of one anchor (or embedding) tile in output columns chunk*BO.."""
    pid = tl.program_id(0)
    anchor_tiles = tl.cdiv(NA, BA)
    offs_o = tl.program_id(1) * BO + tl.arange(0, BO)
    if pid < anchor_tiles:
        offs_a = pid * BA + tl.arange(0, BA)
        in_a, z, idx, p_val, n_val, gp, gn = _anchor_state(anchor_label, anchor_index, stats, g_pos, g_neg, offs_a, NA)
        acc = tl.zeros([BA, BO], dtype=tl.float32)
        i_lo, i_hi = _i_range(idx, in_a, B, MEMBER)
        for i0 in range(i_lo, i_hi, BE):
            offs_i = i0 + tl.arange(0, BE)
            in_i = offs_i < B
            li = tl.load(labels + offs_i, mask=in_i, other=-2)
            if _live(z, idx, li, offs_i, in_a, in_i, MEMBER):
                s_ai = similarity(anchors, offs_a, NA, emb, offs_i, B, D, BA, BE, BK, PRECISION)
                c_ai = tl.zeros([BA, BE], dtype=tl.float32)
                j_lo = i0 if (MEMBER == 4 or MEMBER == 5) else 0
                for j0 in range(j_lo, B, BE):
                    offs_j = j0 + tl.arange(0, BE)
                    in_j = offs_j < B
                    lj = tl.load(labels + offs_j, mask=in_j, other=-2)
                    s_aj = similarity(anchors, offs_a, NA, emb, offs_j, B, D, BA, BE, BK, PRECISION)
                    s_ij = similarity(emb, offs_i, B, emb, offs_j, B, D, BE, BE, BK, PRECISION)
                    over_n, d_ij = _mixed_grad(s_ai, s_aj, s_ij, z, idx, li, lj, offs_i, offs_j, in_a, in_i, in_j,
                                               lam, label_lam, p_val, n_val, gp, gn, p_scale, p_shift, n_scale, n_shift,
                                               P_FORM, P_OF, N_FORM, N_OF, MEMBER, NEGATIVE)
                    c_ai += lam * tl.sum(over_n, axis=2)
                    c_aj = (1.0 - lam) * tl.sum(over_n, axis=1)
                    x_j = load_chunk(emb, offs_j, B, offs_o, D)
                    acc = tl.dot(c_aj.to(x_j.dtype), x_j, acc, input_precision=PRECISION)
                x_i = load_chunk(emb, offs_i, B, offs_o, D)
                acc = tl.dot(c_ai.to(x_i.dtype), x_i, acc, input_precision=PRECISION)
        tl.store(grad_anchors + offs_a[:, None] * D + offs_o[None, :], acc,
                 mask=in_a[:, None] & (offs_o[None, :] < D))
    else:
        x0 = (pid - anchor_tiles) * BE
        offs_x = x0 + tl.arange(0, BE)
        in_x = offs_x < B
        lx = tl.load(labels + offs_x, mask=in_x, other=-2)
        acc = tl.zeros([BE, BO], dtype=tl.float32)
        mix = lam * (1.0 - lam)
        for a0 in range(0, NA, BA):
            offs_a = a0 + tl.arange(0, BA)
            in_a, z, idx, p_val, n_val, gp, gn = _anchor_state(anchor_label, anchor_index, stats, g_pos, g_neg,
                                                               offs_a, NA)
            s_ax = similarity(anchors, offs_a, NA, emb, offs_x, B, D, BA, BE, BK, PRECISION)
            # x as the first member i of the pairs
            if _live(z, idx, lx, offs_x, in_a, in_x, MEMBER):
                c_ai = tl.zeros([BA, BE], dtype=tl.float32)
                j_lo = x0 if (MEMBER == 4 or MEMBER == 5) else 0
                for j0 in range(j_lo, B, BE):
                    offs_j = j0 + tl.arange(0, BE)
                    in_j = offs_j < B
                    lj = tl.load(labels + offs_j, mask=in_j, other=-2)
                    s_aj = similarity(anchors, offs_a, NA, emb, offs_j, B, D, BA, BE, BK, PRECISION)
                    s_xj = similarity(emb, offs_x, B, emb, offs_j, B, D, BE, BE, BK, PRECISION)
                    over_n, d_ij = _mixed_grad(s_ax, s_aj, s_xj, z, idx, lx, lj, offs_x, offs_j, in_a, in_x, in_j,
                                               lam, label_lam, p_val, n_val, gp, gn, p_scale, p_shift, n_scale, n_shift,
                                               P_FORM, P_OF, N_FORM, N_OF, MEMBER, NEGATIVE)
                    c_ai += lam * tl.sum(over_n, axis=2)
                    c_ij = mix * tl.sum(d_ij, axis=0)
                    x_j = load_chunk(emb, offs_j, B, offs_o, D)
                    acc = tl.dot(c_ij.to(x_j.dtype), x_j, acc, input_precision=PRECISION)
                x_a = load_chunk(anchors, offs_a, NA, offs_o, D)
                acc = tl.dot(tl.trans(c_ai).to(x_a.dtype), x_a, acc, input_precision=PRECISION)
            # x as the second member j of the pairs
            c_aj = tl.zeros([BA, BE], dtype=tl.float32)
            i_lo, i_hi = _i_range(idx, in_a, B, MEMBER)
            if MEMBER == 4 or MEMBER == 5:
                i_hi = tl.minimum(i_hi, x0 + BE)
            for i0 in range(i_lo, i_hi, BE):
                offs_i = i0 + tl.arange(0, BE)
                in_i = offs_i < B
                li = tl.load(labels + offs_i, mask=in_i, other=-2)
                if _live(z, idx, li, offs_i, in_a, in_i, MEMBER):
                    s_ai = similarity(anchors, offs_a, NA, emb, offs_i, B, D, BA, BE, BK, PRECISION)
                    s_ix = similarity(emb, offs_i, B, emb, offs_x, B, D, BE, BE, BK, PRECISION)
                    over_n, d_ij = _mixed_grad(s_ai, s_ax, s_ix, z, idx, li, lx, offs_i, offs_x, in_a, in_i, in_x,
                                               lam, label_lam, p_val, n_val, gp, gn, p_scale, p_shift, n_scale, n_shift,
                                               P_FORM, P_OF, N_FORM, N_OF, MEMBER, NEGATIVE)
                    c_aj += (1.0 - lam) * tl.sum(over_n, axis=1)
                    c_ij = mix * tl.sum(d_ij, axis=0)
                    x_i = load_chunk(emb, offs_i, B, offs_o, D)
                    acc = tl.dot(tl.trans(c_ij).to(x_i.dtype), x_i, acc, input_precision=PRECISION)
            x_a = load_chunk(anchors, offs_a, NA, offs_o, D)
            acc = tl.dot(tl.trans(c_aj).to(x_a.dtype), x_a, acc, input_precision=PRECISION)
        tl.store(grad_emb + offs_x[:, None] * D + offs_o[None, :], acc, mask=in_x[:, None] & (offs_o[None, :] < D))


def _blocks(d: int) -> tuple[int, int, int, int]:
    """(anchor tile, embedding tile, width chunk of the products, width chunk of the gradients): the
    [A, I, J] blocks bound the tiles to 16, so a product step reads [16, 128] operands (8 KiB in
    float32); a [16, 512] gradient accumulator still fits the registers of 8 warps, so up to d = 512
    the backward computes each similarity tile once."""
    if INTERPRET:  # several chunks even at the tests' small d
        return 16, 16, 16, min(padded_dim(d), 32)
    return 16, 16, min(padded_dim(d), 128), min(padded_dim(d), 512)


def _launch_args(anchors, anchor_label, anchor_index, emb, labels, lam, cfg):
    if cfg.member not in (MEMBER_POS_NEG, MEMBER_ANC_NEG, MEMBER_POS_POS, MEMBER_NEG_NEG):
        raise ValueError(f"gram_mixed needs a pair-set membership rule, got {cfg.member}")
    p = sigma_codes(cfg.sigma_pos)
    n = sigma_codes(cfg.sigma_neg)
    scalars = (float(lam), label_factor(lam, cfg.label_mode), p[2], p[3], n[2], n[3])
    consts = dict(P_FORM=p[0], P_OF=p[1], N_FORM=n[0], N_OF=n[1], MEMBER=cfg.member, NEGATIVE=cfg.label_mode == LABEL_NEGATIVE,
                  PRECISION=dot_precision(anchors.dtype))
    return (anchors, anchor_label, anchor_index, emb, labels), scalars, consts


def gram_mixed_forward(anchors, anchor_label, anchor_index, emb, labels, lam, cfg):
    anchors, emb = interpretable(anchors), interpretable(emb)
    na, d = anchors.shape
    stats = torch.empty(6, na, device=anchors.device, dtype=torch.float32)
    if na == 0:
        return stats
    tensors, scalars, consts = _launch_args(anchors, anchor_label, anchor_index, emb, labels, lam, cfg)
    ba, be, bk, _ = _blocks(d)
    _forward[(triton.cdiv(na, ba),)](*tensors, stats, na, emb.shape[0], d, *scalars, **consts, BA=ba, BE=be, BK=bk,
                                     num_warps=4)
    return stats


def gram_mixed_backward(anchors, anchor_label, anchor_index, emb, labels, lam, cfg, stats, grad_pos_sum,
                        grad_neg_sum):
    dtype = anchors.dtype
    anchors, emb = interpretable(anchors), interpretable(emb)
    na, d = anchors.shape
    b = emb.shape[0]
    grad_anchors = torch.empty_like(anchors)
    grad_emb = torch.empty_like(emb)
    if na == 0 or b == 0:
        return grad_anchors.zero_(), grad_emb.zero_()
    tensors, scalars, consts = _launch_args(anchors, anchor_label, anchor_index, emb, labels, lam, cfg)
    ba, be, bk, bo = _blocks(d)
    grid = (triton.cdiv(na, ba) + triton.cdiv(b, be), triton.cdiv(d, bo))
    _backward[grid](*tensors, stats, grad_pos_sum.contiguous(), grad_neg_sum.contiguous(), grad_anchors, grad_emb,
                    na, b, d, *scalars, **consts, BA=ba, BE=be, BK=bk, BO=bo, num_warps=8)
    return grad_anchors.to(dtype), grad_emb.to(dtype)
