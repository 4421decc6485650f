"""Feature mixup fused with global average + global max pooling (the paper's pooling).

Forward: one program per (pair, channel block) reads the two [channels, H*W] maps, mixes them in
registers and writes mean + max and the max's position; the [M, C, H, W] mixed maps never exist.
Backward: the gradient of the mean spreads evenly over H*W and the max's goes to its argmax, each
split lam / (1 - lam) between the pair's two maps. Pairs share maps, so one kernel scatters with
atomics into a float32 [B, C] mean coefficient and the [B, C, H*W] max gradient, and a second
adds the two up (in place when the features are float32).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _forward(features, pair_i, pair_j, pooled, argmax, C, HW, lam, BC: tl.constexpr, BHW: tl.constexpr):
    p = tl.program_id(0)
    offs_c = tl.program_id(1) * BC + tl.arange(0, BC)
    offs_hw = tl.arange(0, BHW)
    valid = (offs_c[:, None] < C) & (offs_hw[None, :] < HW)
    i = tl.load(pair_i + p).to(tl.int64)
    j = tl.load(pair_j + p).to(tl.int64)
    at = offs_c[:, None] * HW + offs_hw[None, :]
    f_i = tl.load(features + i * C * HW + at, mask=valid, other=0.0).to(tl.float32)
    f_j = tl.load(features + j * C * HW + at, mask=valid, other=0.0).to(tl.float32)
    m = lam * f_i + (1.0 - lam) * f_j
    top = tl.where(valid, m, float("-inf"))
    where = tl.argmax(top, axis=1)
    value = tl.sum(m, axis=1) / HW + tl.max(top, axis=1)
    in_c = offs_c < C
    tl.store(pooled + p * C + offs_c, value, mask=in_c)
    tl.store(argmax + p * C + offs_c, where.to(tl.int32), mask=in_c)


@triton.jit
def _scatter(grad_pooled, pair_i, pair_j, argmax, mean_coef, grad_max, C, HW, lam, BC: tl.constexpr):
    p = tl.program_id(0)
    offs_c = tl.program_id(1) * BC + tl.arange(0, BC)
    in_c = offs_c < C
    i = tl.load(pair_i + p).to(tl.int64)
    j = tl.load(pair_j + p).to(tl.int64)
    g = tl.load(grad_pooled + p * C + offs_c, mask=in_c, other=0.0).to(tl.float32)
    top = tl.load(argmax + p * C + offs_c, mask=in_c, other=0).to(tl.int64)
    tl.atomic_add(mean_coef + i * C + offs_c, lam * g, mask=in_c)
    tl.atomic_add(mean_coef + j * C + offs_c, (1.0 - lam) * g, mask=in_c)
    tl.atomic_add(grad_max + (i * C + offs_c) * HW + top, lam * g, mask=in_c)
    tl.atomic_add(grad_max + (j * C + offs_c) * HW + top, (1.0 - lam) * g, mask=in_c)


@triton.jit
def _combine(mean_coef, grad_max, out, N, HW, BN: tl.constexpr, BHW: tl.constexpr):
    offs_n = tl.program_id(0) * BN + tl.arange(0, BN)
    offs_hw = tl.arange(0, BHW)
    valid = (offs_n[:, None] < N) & (offs_hw[None, :] < HW)
    at = offs_n[:, None].to(tl.int64) * HW + offs_hw[None, :]
    coef = tl.load(mean_coef + offs_n, mask=offs_n < N, other=0.0)
    g = tl.load(grad_max + at, mask=valid, other=0.0) + coef[:, None] / HW
    tl.store(out + at, g, mask=valid)


def _blocks(hw: int) -> tuple[int, int]:
    """(channel block, padded H*W): a program holds [channels, H*W] of two maps."""
    bhw = triton.next_power_of_2(hw)
    return max(1, min(64, 4096 // bhw)), bhw


def mixpool_forward(features, i, j, lam):
    b, c, h, w = features.shape
    m = i.shape[0]
    pooled = torch.empty(m, c, device=features.device, dtype=features.dtype)
    argmax = torch.empty(m, c, device=features.device, dtype=torch.int32)
    if m == 0 or c == 0:
        return pooled, argmax
    bc, bhw = _blocks(h * w)
    _forward[(m, triton.cdiv(c, bc))](features, i, j, pooled, argmax, c, h * w, float(lam), BC=bc, BHW=bhw)
    return pooled, argmax


def mixpool_backward(grad_pooled, features, i, j, lam, argmax):
    b, c, h, w = features.shape
    m = i.shape[0]
    mean_coef = torch.zeros(b, c, device=features.device, dtype=torch.float32)
    grad_max = torch.zeros(b, c, h, w, device=features.device, dtype=torch.float32)
    if m == 0 or c == 0:
        return grad_max.to(features.dtype)
    bc, bhw = _blocks(h * w)
    _scatter[(m, triton.cdiv(c, bc))](grad_pooled.contiguous(), i, j, argmax, mean_coef, grad_max, c, h * w,
                                      float(lam), BC=bc)
    out = grad_max if features.dtype == torch.float32 else torch.empty_like(features)
    _combine[(triton.cdiv(b * c, bc),)](mean_coef, grad_max, out, b * c, h * w, BN=bc, BHW=bhw)
    return out
