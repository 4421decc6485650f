"""Feature mixup fused with global average + global max pooling (the paper's pooling).

Forward: the pairs are sorted by i (on the device, no host sync) and cut into chunks of at most
CHUNK pairs sharing an i. One program per (chunk, channel block) loads f_i's [channels, H*W] block
once, then for each of its pairs reads f_j, mixes in registers and writes mean + max and the max's
position at the pair's original row; the [M, C, H, W] mixed maps never exist.
Backward: the gradient of the mean spreads evenly over H*W and the max's goes to its argmax, each
split lam / (1 - lam) between the pair's two maps. One program per (example, channel block) walks
every pair that uses the example (as i or as j, through a CSR of the stably sorted indices) and
sums their gradients in registers, writing its block of the gradient once: no atomics, no zeroed
buffers, and a fixed summation order, so the result is deterministic.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Pairs per forward program: f_i is re-read once per CHUNK pairs (about 3% on top of the f_j reads),
# while a crowded i is still spread over several programs.
CHUNK = 32


@triton.jit
def _forward(features, order, pair_i, pair_j, bounds, pooled, argmax, C, HW, lam,
             BC: tl.constexpr, BHW: tl.constexpr):
    start = tl.load(bounds + tl.program_id(0))
    end = tl.load(bounds + tl.program_id(0) + 1)
    if start < end:  # the grid is an upper bound on the number of chunks; the spare programs idle
        offs_c = tl.program_id(1) * BC + tl.arange(0, BC)
        offs_hw = tl.arange(0, BHW)
        in_c = offs_c < C
        valid = in_c[:, None] & (offs_hw[None, :] < HW)
        at = offs_c[:, None] * HW + offs_hw[None, :]
        i = tl.load(pair_i + tl.load(order + start)).to(tl.int64)
        lam_f_i = lam * tl.load(features + i * C * HW + at, mask=valid, other=0.0).to(tl.float32)
        for t in range(start, end):
            p = tl.load(order + t).to(tl.int64)
            j = tl.load(pair_j + p).to(tl.int64)
            f_j = tl.load(features + j * C * HW + at, mask=valid, other=0.0).to(tl.float32)
            m = lam_f_i + (1.0 - lam) * f_j
            top = tl.where(valid, m, float("-inf"))
            value = tl.sum(m, axis=1) / HW + tl.max(top, axis=1)
            tl.store(pooled + p * C + offs_c, value, mask=in_c)
            tl.store(argmax + p * C + offs_c, tl.argmax(top, axis=1).to(tl.int32), mask=in_c)


@triton.jit
def _backward(grad_pooled, argmax, order, offsets, out, M, C, HW, lam, BC: tl.constexpr, BHW: tl.constexpr):
    b = tl.program_id(0)
    offs_c = tl.program_id(1) * BC + tl.arange(0, BC)
    offs_hw = tl.arange(0, BHW)
    in_c = offs_c < C
    coef = tl.zeros([BC], dtype=tl.float32)  # the mean's gradient, spread over H*W at the end
    grad_max = tl.zeros([BC, BHW], dtype=tl.float32)
    for t in range(tl.load(offsets + b), tl.load(offsets + b + 1)):
        q = tl.load(order + t)  # entry q < M: pair q uses b as i; else pair q - M uses it as j
        as_i = q < M
        p = tl.where(as_i, q, q - M).to(tl.int64)
        g = tl.where(as_i, lam, 1.0 - lam) * tl.load(grad_pooled + p * C + offs_c, mask=in_c, other=0.0).to(tl.float32)
        top = tl.load(argmax + p * C + offs_c, mask=in_c, other=0)
        coef += g
        # scatter to the argmax as a one-hot over the register block
        grad_max += tl.where(offs_hw[None, :] == top[:, None], g[:, None], 0.0)
    at = (b.to(tl.int64) * C + offs_c[:, None]) * HW + offs_hw[None, :]
    tl.store(out + at, grad_max + coef[:, None] / HW, mask=in_c[:, None] & (offs_hw[None, :] < HW))


def _blocks(hw: int) -> tuple[int, int]:
    """(channel block, padded H*W): a [channels, H*W] register block of about 4096 elements."""
    bhw = triton.next_power_of_2(hw)
    return max(1, min(64, 4096 // bhw)), bhw


def _chunks(i: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, bounds): pairs order[bounds[k]:bounds[k + 1]] share an i, at most CHUNK of them.

    Chunk k starts at the (k + 1)-th sorted position whose rank within its i's group is a multiple
    of CHUNK. Their count depends on the data, so ``bounds`` covers an upper bound on it that the
    host knows without a sync (each nonempty group wastes less than one chunk); later chunks are empty.
    """
    m = i.shape[0]
    order = torch.argsort(i, stable=True)
    counts = torch.bincount(i, minlength=b)
    group_start = torch.cumsum(counts, 0) - counts
    rank = torch.arange(m, device=i.device) - group_start[i[order]]
    started = torch.cumsum(rank % CHUNK == 0, 0)
    n = min(m, (m + min(b, m) * (CHUNK - 1)) // CHUNK)
    return order, torch.searchsorted(started, torch.arange(1, n + 2, device=i.device))


def mixpool_forward(features, i, j, lam):
    b, c, h, w = features.shape
    m = i.shape[0]
    pooled = torch.empty(m, c, device=features.device, dtype=features.dtype)
    argmax = torch.empty(m, c, device=features.device, dtype=torch.int32)
    if m == 0 or c == 0:
        return pooled, argmax
    bc, bhw = _blocks(h * w)
    order, bounds = _chunks(i, b)
    # chunks vary fastest, so the programs in flight share a channel block and its f_j stay in L2
    _forward[(bounds.shape[0] - 1, triton.cdiv(c, bc))](features, order, i, j, bounds, pooled, argmax, c, h * w,
                                                        float(lam), BC=bc, BHW=bhw, num_warps=4)
    return pooled, argmax


def mixpool_backward(grad_pooled, features, i, j, lam, argmax):
    b, c, h, w = features.shape
    m = i.shape[0]
    if m == 0 or c == 0:
        return torch.zeros_like(features)
    both = torch.cat([i, j])
    order = torch.argsort(both, stable=True)  # stable: each example sums its pairs in a fixed order
    offsets = torch.zeros(b + 1, device=features.device, dtype=torch.int64)
    offsets[1:] = torch.cumsum(torch.bincount(both, minlength=b), 0)
    out = torch.empty(b, c, h, w, device=features.device, dtype=features.dtype)
    bc, bhw = _blocks(h * w)
    _backward[(b, triton.cdiv(c, bc))](grad_pooled.contiguous(), argmax, order, offsets, out, m, c, h * w,
                                       float(lam), BC=bc, BHW=bhw, num_warps=4)
    return out
