"""The fused mix + pool op against reference.mix_features."""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from metrix_kernels import reference
from metrix_kernels.ops import mixpool
from metrix_kernels.pairs import MixPlan

from .conftest import DEVICE, EXAMPLES
from .helpers import close, leaves


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
    (f,) = leaves(features)
    pooled = mixpool(f, i, j, lam, "triton")
    (grad,) = torch.autograd.grad(pooled, f, grad_out.to(dtype))
    (f64,) = leaves(features, dtype=torch.float64)
    expected = reference.mix_features(f64, MixPlan(i, j, lam, "pos-neg", "interpolate"))
    (expected_grad,) = torch.autograd.grad(expected, f64, grad_out.double())
    tol = dict(rtol=2e-4, atol=2e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    assert pooled.dtype == dtype and grad.dtype == dtype
    close(pooled, expected, **tol)
    close(grad, expected_grad, **tol)
