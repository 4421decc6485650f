"""The pairwise op against reference.term_stats on materialized similarities and weights."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from metrix_kernels import reference
from metrix_kernels.backends import LABEL_CODES, MEMBER_ALL, MEMBER_ALL_BUT_SELF, MEMBER_RULES, KernelConfig, cpu
from metrix_kernels.ops import pairwise
from metrix_kernels.ops._dispatch import UnitRows, normalize
from metrix_kernels.pairs import rule_member, soft_labels

from .conftest import DEVICE, EXAMPLES
from .helpers import LAMS, batches, close, grads, leaves, loss, skip_unless_usable

SIGMAS = ["contrastive", "lifted_structure", "binomial_deviance", "multi_similarity", "nca"]  # every form x input


def _expected(rows, cols, row_lab, col_lab, row_idx, col_idx, lam, member, label_mode, mixed_rows, mask):
    """Reference weights [R, V]: the clean side's (z, a) against the mixed side's (li, lj, i)."""
    if mixed_rows:
        (li, lj), mi, z, a = row_lab, row_idx, col_lab[0], col_idx
        flip = True
    else:
        (li, lj), mi, z, a = col_lab, col_idx, row_lab[0], row_idx
        flip = False
    y = soft_labels(z, li, lj, lam, label_mode, torch.float64)
    if mask is not None:
        keep = mask.T if flip else mask
    elif member == MEMBER_ALL:
        keep = torch.ones_like(y, dtype=torch.bool)
    elif member == MEMBER_ALL_BUT_SELF:
        keep = mi[None, :] != a[:, None]
    else:
        rule = {v: k for k, v in MEMBER_RULES.items()}[member]
        keep = rule_member(rule, z, a, li, lj, mi)
    w_pos, w_neg = keep * y, keep * (1.0 - y)
    return (w_pos.T, w_neg.T) if flip else (w_pos, w_neg)


@pytest.mark.parametrize("name", SIGMAS)
@settings(max_examples=EXAMPLES)
@given(data=st.data())
def test_pairwise_matches_term_stats(name, data):
    _, terms = loss(name)
    rows, row_y, gen = data.draw(batches())
    cols = torch.randn(data.draw(st.integers(1, 40)), rows.shape[1], generator=gen).to(rows.device)
    mixed_rows = data.draw(st.booleans())
    member = data.draw(st.sampled_from([MEMBER_ALL, MEMBER_ALL_BUT_SELF, *MEMBER_RULES.values(), "mask"]))
    label_mode = data.draw(st.sampled_from(sorted(LABEL_CODES)))
    lam = data.draw(LAMS)
    col_y = torch.randint(6, (cols.shape[0],), generator=gen).to(rows.device)
    col_y2 = torch.randint(6, (cols.shape[0],), generator=gen).to(rows.device)
    row_y2 = torch.randint(6, (rows.shape[0],), generator=gen).to(rows.device)
    row_idx = torch.arange(rows.shape[0], device=rows.device)
    col_idx = torch.randint(rows.shape[0], (cols.shape[0],), generator=gen).to(rows.device)
    row_lab, col_lab = ((row_y, row_y2), (col_y, col_y)) if mixed_rows else ((row_y, row_y), (col_y, col_y2))
    mask = None
    if member == "mask":
        mask = (torch.rand(rows.shape[0], cols.shape[0], generator=gen) < 0.5).to(rows.device)
        member, mixed_rows = MEMBER_ALL, False
        row_lab, col_lab = (row_y, row_y), (col_y, col_y2)
    cfg = KernelConfig(terms.sigma_pos, terms.sigma_neg, member, LABEL_CODES[label_mode], mixed_rows, True)

    # raw rows, of varied norms: the op compares their unit rows, and its gradients go through the normalization
    scale = torch.rand(rows.shape[0], 1, generator=gen).to(rows.device) * 3 + 0.1
    r, c = leaves(rows * scale, cols)
    stats = pairwise(r, row_lab, row_idx, c, col_lab, col_idx, lam, cfg, "triton", member_mask=mask)
    r64, c64 = leaves(r, c, dtype=torch.float64)
    w_pos, w_neg = _expected(r64, c64, row_lab, col_lab, row_idx, col_idx, lam, member, label_mode, mixed_rows,
                             mask)
    expected = reference.term_stats(reference.normalize(r64) @ reference.normalize(c64).T, w_pos, w_neg, terms)
    for actual, want in zip(stats, expected):
        close(actual, want.to(torch.float64))
    # every gradient, through a random combination of the two differentiable term sums
    u, v = torch.rand(2, rows.shape[0], generator=gen, dtype=torch.float64).to(rows.device)

    def combine(pos, neg):
        return (u * torch.where(torch.isfinite(pos), pos, 0.0)).sum() + (v * torch.where(torch.isfinite(neg), neg,
                                                                                         0.0)).sum()

    for actual, want in zip(grads(combine(stats[0].double(), stats[1].double()), [r, c]),
                            grads(combine(expected.pos_sum, expected.neg_sum), [r64, c64])):
        close(actual, want)


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 300), d=st.integers(1, 70), scale=st.sampled_from([1.0, 1e-3, 0.0]),
       dtype=st.sampled_from([torch.float64, torch.float32]),
       backend=st.sampled_from(["cpu", "triton", "formula"] if cpu.available() else ["triton", "formula"]),
       seed=st.integers(0, 2**31 - 1))
def test_normalize_matches_torch(rows, d, scale, dtype, backend, seed):
    """The fused paths' row normalization against F.normalize, zero rows included: the cpu kernels
    (threaded above 2^14 elements; where the extension is built, which bench/gpu_check.sh does not),
    the triton ones, and the torch formula of backends without them."""
    gen = torch.Generator().manual_seed(seed)
    on = DEVICE if backend == "triton" else "cpu"
    x = (torch.randn(rows, d, generator=gen, dtype=dtype) * scale).to(on)
    g = torch.randn(rows, d, generator=gen, dtype=dtype).to(on)
    a, b = x.clone().requires_grad_(), x.double().clone().requires_grad_()
    ours = UnitRows.apply(a, None) if backend == "formula" else normalize(a, dtype, backend)
    theirs = torch.nn.functional.normalize(b, dim=-1)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(ours.double(), theirs, rtol=tol, atol=tol)
    # the gradient is of the order |g| / |x|: float32 rounding scales with it
    size = float(g.abs().max()) / max(float(x.norm(dim=1).min()), 1e-12)
    torch.testing.assert_close(torch.autograd.grad(ours, a, g)[0].double(), torch.autograd.grad(theirs, b, g.double())[0],
                               rtol=tol, atol=tol * size)


@pytest.mark.parametrize("backend", ["triton", "cpu", "formula"])
def test_normalize_keeps_nan_rows(backend):
    """A row with a NaN comes out all NaN, as from F.normalize (a clamp that drops NaN would scale the
    row's finite entries by 1e12 instead); the other rows are untouched."""
    if backend == "cpu":
        skip_unless_usable(backend)
    x = torch.tensor([[1.0, float("nan"), 2.0], [3.0, 4.0, 0.0]], device="cpu" if backend == "cpu" else DEVICE)
    y = UnitRows.apply(x, None) if backend == "formula" else normalize(x, torch.float32, backend)
    assert torch.isnan(y[0]).all()
    close(y[1:], torch.nn.functional.normalize(x[1:], dim=-1))


def test_d2_gradient_at_zero_distance():
    """s = 1 exactly, where d2 = max(2 - 2s, 0) has a kink: the cpu kernels take the reference's
    derivative there, 0 (torch's own clamp_min has passed 1 or 0 at its bound, by version). Only
    visible in the gradient with respect to the unit rows, which the cpu backend returns: through the
    normalization the gradient along the row itself is projected away, and the triton backend returns
    the gradient through it, where the kink shows nowhere. The cuda backend's case is in
    tests/test_backend_cuda.py."""
    skip_unless_usable("cpu")
    _, terms = loss("nca")  # exp(-d2) on both terms
    rows = torch.tensor([[1.0, 0.0, 0.0]], device=DEVICE)
    cols = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.6, 0.8]], device=DEVICE)  # unit rows: s = 1 and 0 exactly
    row_y, col_y = torch.tensor([0], device=DEVICE), torch.tensor([0, 1], device=DEVICE)
    row_idx, col_idx = torch.tensor([0], device=DEVICE), torch.tensor([1, 2], device=DEVICE)
    cfg = KernelConfig(terms.sigma_pos, terms.sigma_neg, MEMBER_ALL, LABEL_CODES["interpolate"], False, False)
    args = (rows, row_y, row_y, row_idx, cols, col_y, col_y, col_idx, 1.0, cfg)
    stats = cpu.pairwise_forward(*args)
    ones = torch.ones(1, device=DEVICE)
    r64, c64 = leaves(rows, cols, dtype=torch.float64)
    w_pos = torch.tensor([[1.0, 0.0]], dtype=torch.float64, device=DEVICE)
    expected = reference.term_stats(r64 @ c64.T, w_pos, 1.0 - w_pos, terms)
    for actual, want in zip(stats[:2], expected[:2]):
        close(actual, want.to(torch.float64))
    for actual, want in zip(cpu.pairwise_backward(*args, stats, ones, ones),
                            grads(expected.pos_sum.sum() + expected.neg_sum.sum(), [r64, c64])):
        close(actual, want)


@pytest.mark.parametrize("backend", ["triton", "cpu"])
def test_tiny_lam_keeps_negative_weight(backend):
    """lam below float32's resolution at 1: a mixed pair whose soft label is 1 - lam keeps its
    negative weight lam, as in the reference (1 - y by subtraction would drop it). The cuda
    backend's case is in tests/test_backend_cuda.py."""
    skip_unless_usable(backend)
    _, terms = loss("multi_similarity")
    gen = torch.Generator().manual_seed(4)
    rows = torch.nn.functional.normalize(torch.randn(4, 5, generator=gen), dim=1).to(DEVICE)
    cols = torch.nn.functional.normalize(torch.randn(3, 5, generator=gen), dim=1).to(DEVICE)
    row_y, row_idx = torch.tensor([0, 1, 2, 0], device=DEVICE), torch.arange(4, device=DEVICE)
    col_labels = (torch.tensor([1, 2, 0], device=DEVICE), torch.tensor([0, 1, 2], device=DEVICE))
    col_idx = torch.tensor([1, 2, 0], device=DEVICE)
    lam = 1e-12
    cfg = KernelConfig(terms.sigma_pos, terms.sigma_neg, MEMBER_ALL, LABEL_CODES["interpolate"], False, True)
    r, c = leaves(rows, cols)
    stats = pairwise(r, (row_y, row_y), row_idx, c, col_labels, col_idx, lam, cfg, backend)
    r64, c64 = leaves(rows, cols, dtype=torch.float64)
    w_pos, w_neg = _expected(r64, c64, (row_y, row_y), col_labels, row_idx, col_idx, lam, MEMBER_ALL, "interpolate",
                             False, None)
    for actual, want in zip(stats, reference.term_stats(r64 @ c64.T, w_pos, w_neg, terms)):
        close(actual, want.to(torch.float64))
