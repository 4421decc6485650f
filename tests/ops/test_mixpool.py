"""The fused mix + pool op against reference.mix_features."""
from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from metrix_kernels import reference
from metrix_kernels.backends.triton.mixpool import mixpool_backward, mixpool_forward
from metrix_kernels.ops import mixpool
from metrix_kernels.pairs import MixPlan

from .conftest import DEVICE, EXAMPLES
from .helpers import close, leaves

TOL = {
    torch.float32: dict(rtol=2e-4, atol=2e-5),
    torch.float16: dict(rtol=1e-2, atol=1e-2),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
}


def _check(features, i, j, lam, grad_out):
    """The op's pooled features and their gradient against the float64 reference on the same inputs."""
    dtype = features.dtype
    (f,) = leaves(features)
    pooled = mixpool(f, i, j, lam, "triton")
    (grad,) = torch.autograd.grad(pooled, f, grad_out.to(dtype))
    (f64,) = leaves(features, dtype=torch.float64)
    expected = reference.mix_features(f64, MixPlan(i, j, lam, "pos-neg", "interpolate"))
    (expected_grad,) = torch.autograd.grad(expected, f64, grad_out.double())
    assert pooled.dtype == dtype and grad.dtype == dtype
    close(pooled, expected, **TOL[dtype])
    close(grad, expected_grad, **TOL[dtype])
    return pooled, grad


@settings(max_examples=2 * EXAMPLES)
@given(
    b=st.integers(1, 5), c=st.integers(1, 70), h=st.integers(1, 5), w=st.integers(1, 4), pairs=st.integers(0, 12),
    lam=st.floats(0.0, 1.0), seed=st.integers(0, 2**31 - 1), dtype=st.sampled_from(["float32", "float16"]),
)
def test_mixpool_matches_reference(b, c, h, w, pairs, lam, seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, dtype)
    features = torch.randn(b, c, h, w, generator=gen).to(DEVICE, dtype)
    i = torch.randint(b, (pairs,), generator=gen).to(DEVICE)
    j = torch.randint(b, (pairs,), generator=gen).to(DEVICE)
    grad_out = torch.randn(pairs, c, generator=gen).to(DEVICE)
    # a tied max (half-precision maps, lam 0 or 1, i == j) has no single gradient: the reference splits
    # it, the kernels give it to the first maximum (test_mixpool_ties_go_to_first_maximum)
    mixed = (lam * features[i].double() + (1 - lam) * features[j].double()).flatten(2)
    assume(not ((mixed == mixed.amax(dim=2, keepdim=True)).sum(dim=2) > 1).any())
    _check(features, i, j, lam, grad_out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["one i", "one j", "one pair", "i == j"])
def test_mixpool_shared_indices(layout, dtype):
    """Many pairs on one example: its gradient sums all of them, in a fixed order.

    Each map's H*W values are 0.25 apart, so no half-precision rounding makes a tie for the max (the
    reference splits a tie's gradient, the kernel gives it to the first maximum).
    """
    b, c, h, w, pairs = 4, 5, 2, 3, 37
    gen = torch.Generator().manual_seed(len(layout))
    ranks = torch.argsort(torch.rand(b, c, h * w, generator=gen), dim=-1).view(b, c, h, w)
    features = (torch.rand(b, c, 1, 1, generator=gen) * 2 - 1 + 0.25 * ranks).to(DEVICE, dtype)
    i = torch.randint(b, (pairs,), generator=gen)
    j = torch.randint(b, (pairs,), generator=gen)
    if layout == "one i":
        i.fill_(1)
    elif layout == "one j":
        j.fill_(2)
    elif layout == "one pair":
        i.fill_(3)
        j.fill_(0)
    else:
        j = i
    grad_out = torch.randn(pairs, c, generator=gen).to(DEVICE)
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)  # no op of the forward or backward may refuse it
    try:
        pooled, grad = _check(features, i.to(DEVICE), j.to(DEVICE), 0.3, grad_out)
        again, grad_again = _check(features, i.to(DEVICE), j.to(DEVICE), 0.3, grad_out)
    finally:
        torch.use_deterministic_algorithms(deterministic)
    assert torch.equal(pooled, again) and torch.equal(grad, grad_again)


def test_mixpool_ties_go_to_first_maximum():
    """Constant maps: every position is a maximum, the first one takes the max's gradient."""
    b, c, h, w, lam = 3, 5, 2, 3, 0.25
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(b, c, 1, 1, generator=gen).expand(b, c, h, w).contiguous().to(DEVICE)
    i = torch.tensor([0, 2, 2, 1, 0]).to(DEVICE)
    j = torch.tensor([1, 2, 0, 1, 0]).to(DEVICE)
    grad_out = torch.randn(i.shape[0], c, generator=gen).to(DEVICE)
    pooled, argmax = mixpool_forward(features, i, j, lam)
    assert (argmax == 0).all()
    coef = torch.zeros(b, c, dtype=torch.float64, device=DEVICE)
    coef.index_add_(0, i, lam * grad_out.double()).index_add_(0, j, (1 - lam) * grad_out.double())
    expected = (coef / (h * w))[:, :, None].repeat(1, 1, h * w)
    expected[:, :, 0] += coef
    close(mixpool_backward(grad_out, features, i, j, lam, argmax), expected.view(b, c, h, w))
