"""Row normalization y = x / max(|x|, 1e-12) (F.normalize's) and its backward, one launch each way:
torch's formula takes three launches forward and six backward, a fixed cost that shows next to the
loss kernels at small batches. float32 accumulation (float64 rows in float64, for direct calls: the ops
layer hands this backend float32)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import INTERPRET

EPS = 1e-12  # F.normalize's


@triton.jit
def _tile(offs_r, d0, N, D, BD: tl.constexpr):
    """(offsets, mask) of the [rows, BD] tile at column d0."""
    offs_d = d0 + tl.arange(0, BD)
    return offs_r[:, None] * D + offs_d[None, :], (offs_r < N)[:, None] & (offs_d < D)[None, :]


@triton.jit
def _forward(x, y, norm, N, D, EPS: tl.constexpr, WIDE: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr):
    offs_r = tl.program_id(0) * BR + tl.arange(0, BR)
    acc = tl.zeros([BR], dtype=tl.float64 if WIDE else tl.float32)
    for d0 in range(0, D, BD):
        at, inside = _tile(offs_r, d0, N, D, BD)
        v = tl.load(x + at, mask=inside, other=0.0).to(acc.dtype)
        acc += tl.sum(v * v, axis=1)
    # a bare constant would be float32; NaN rows stay NaN, as in F.normalize
    n = tl.maximum(tl.sqrt(acc), tl.full([BR], EPS, acc.dtype), propagate_nan=tl.PropagateNan.ALL)
    tl.store(norm + offs_r, n, mask=offs_r < N)
    for d0 in range(0, D, BD):
        at, inside = _tile(offs_r, d0, N, D, BD)
        v = tl.load(x + at, mask=inside, other=0.0).to(acc.dtype)
        tl.store(y + at, (v / n[:, None]).to(y.dtype.element_ty), mask=inside)


@triton.jit
def _backward(grad, y, norm, out, N, D, EPS: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr):
    """dx = (g - y <g, y>) / |x|, or g / eps where the norm was clamped (no gradient through the norm);
    computed in the norm's dtype."""
    offs_r = tl.program_id(0) * BR + tl.arange(0, BR)
    n = tl.load(norm + offs_r, mask=offs_r < N, other=1.0)
    along = tl.zeros([BR], dtype=n.dtype)
    for d0 in range(0, D, BD):
        at, inside = _tile(offs_r, d0, N, D, BD)
        g = tl.load(grad + at, mask=inside, other=0.0).to(n.dtype)
        along += tl.sum(g * tl.load(y + at, mask=inside, other=0.0).to(n.dtype), axis=1)
    along = tl.where(n > tl.full([BR], EPS, n.dtype), along, 0.0)
    for d0 in range(0, D, BD):
        at, inside = _tile(offs_r, d0, N, D, BD)
        g = tl.load(grad + at, mask=inside, other=0.0).to(n.dtype)
        u = tl.load(y + at, mask=inside, other=0.0).to(n.dtype)
        tl.store(out + at, ((g - u * along[:, None]) / n[:, None]).to(out.dtype.element_ty), mask=inside)


def _blocks(d: int) -> tuple[int, int]:
    """(rows per program, width chunk): 16 rows under the interpreter (few programs), else 4 rows of up
    to 256 columns, so that the [M, d] mixed rows of feature mixup spread over many programs."""
    chunk = min(max(16, triton.next_power_of_2(d)), 256)
    return (16, chunk) if INTERPRET else (4, chunk)


def unit_rows_forward(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.contiguous()
    n, d = x.shape
    wide = x.dtype == torch.float64
    y = torch.empty_like(x)
    norm = torch.empty(n, 1, device=x.device, dtype=torch.float64 if wide else torch.float32)
    if n:
        br, bd = _blocks(d)
        _forward[(triton.cdiv(n, br),)](x, y, norm, n, d, EPS=EPS, WIDE=wide, BR=br, BD=bd, num_warps=4)
    return y, norm


def unit_rows_backward(grad: torch.Tensor, y: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    n, d = y.shape
    out = torch.empty_like(y)
    if n:
        br, bd = _blocks(d)
        _backward[(triton.cdiv(n, br),)](grad.contiguous(), y, norm, out, n, d, EPS=EPS, BR=br, BD=bd, num_warps=4)
    return out
