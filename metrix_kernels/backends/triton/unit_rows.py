"""Row normalization y = x / max(|x|, 1e-12) (F.normalize's) and its backward, one launch each way:
torch's formula takes three launches forward and six backward, a fixed cost that shows next to the
loss kernels at small batches. float32 accumulation (float64 rows in float64, for direct calls: the ops
layer hands this backend float32). The pair ops normalize their rows inside their kernels: they take
the norms alone and turn their gradients in place (through_norms_)."""
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
def _backward(grad, v, norm, out, N, D, EPS: tl.constexpr, RAW: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr):
    """The gradient through the normalization, computed in the norm's dtype (none through the norm
    where it was clamped), with y = v, or y = v / |x| if RAW:
        grad = dLoss/dy:                               dx = (g - y <g, y>) / |x|
        RAW: v = x, grad = dLoss/dx with |x| held fixed:  dx = g - y <g, y>
    (the same, the second g being the first over |x|); out may be grad itself. norm may be |x|
    unclamped: it is clamped here."""
    offs_r = tl.program_id(0) * BR + tl.arange(0, BR)
    n = tl.load(norm + offs_r, mask=offs_r < N, other=1.0)
    n = tl.maximum(n, tl.full([BR], EPS, n.dtype), propagate_nan=tl.PropagateNan.ALL)
    along = tl.zeros([BR], dtype=n.dtype)
    for d0 in range(0, D, BD):
        at, inside = _tile(offs_r, d0, N, D, BD)
        g = tl.load(grad + at, mask=inside, other=0.0).to(n.dtype)
        along += tl.sum(g * _unit(v, at, inside, n, RAW), axis=1)
    along = tl.where(n > tl.full([BR], EPS, n.dtype), along, 0.0)
    for d0 in range(0, D, BD):
        at, inside = _tile(offs_r, d0, N, D, BD)
        dx = tl.load(grad + at, mask=inside, other=0.0).to(n.dtype) - _unit(v, at, inside, n, RAW) * along[:, None]
        if not RAW:
            dx = dx / n[:, None]
        tl.store(out + at, dx.to(out.dtype.element_ty), mask=inside)


@triton.jit
def _unit(v, at, inside, n, RAW: tl.constexpr):
    """A tile of unit rows: v's, or v's over their norms n if RAW (then exactly +-1 in d = 1, where the
    projection then cancels exactly, as with normalized rows)."""
    u = tl.load(v + at, mask=inside, other=0.0).to(n.dtype)
    if RAW:
        u = u / n[:, None]
    return u


def _blocks(d: int) -> tuple[int, int]:
    """(rows per program, width chunk): 16 rows under the interpreter (few programs), else 4 rows of up
    to 256 columns, so that the [M, d] mixed rows of feature mixup spread over many programs."""
    chunk = min(max(16, triton.next_power_of_2(d)), 256)
    return (16, chunk) if INTERPRET else (4, chunk)


def _launch_backward(grad, v, norm, out, raw):
    n, d = v.shape
    if n:
        br, bd = _blocks(d)
        _backward[(triton.cdiv(n, br),)](grad, v, norm, out, n, d, EPS=EPS, RAW=raw, BR=br, BD=bd, num_warps=4)
    return out


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
    return _launch_backward(grad.contiguous(), y, norm, torch.empty_like(y), raw=False)


def through_norms_(grad: torch.Tensor, x: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """grad [N, d] (dLoss/dx with the norms held fixed, contiguous float32), turned in place into
    dLoss/dx through x / max(|x|, 1e-12), from norm = |x| [N] float32."""
    return _launch_backward(grad, x, norm, grad, raw=True)
