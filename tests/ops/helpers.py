"""Inputs and comparisons shared by the fused-op tests."""
from __future__ import annotations

import pytest
import torch
from hypothesis import assume
from hypothesis import strategies as st

from metrix_kernels.backends import cpu
from metrix_kernels.family import resolve

from .conftest import DEVICE, MAX_BATCH

PARAMS = {  # published-scale hyperparameters (exponent scales up to 80)
    "contrastive": {"pos_margin": 0.2, "neg_margin": 1.3},
    "lifted_structure": {"pos_margin": 0.1, "neg_margin": 1.0},
    "binomial_deviance": {"alpha": 2.0, "beta": 50.0, "base": 0.5},
    "multi_similarity": {"alpha": 17.97, "beta": 75.66, "base": 0.77},
    "proxy_anchor": {"margin": 0.1, "alpha": 32.0},
    "nca": {"softmax_scale": 4.0},
    "proxy_nca": {"softmax_scale": 3.0},
    "proxy_nca_pp": {"temperature": 1.0 / 9.0},
}

# lam as the kernels see it: a float32 scalar (a subnormal or float64-only lam has no float32 value),
# and 0 or at least 2^-100 (8e-31): the float32 kernels (triton, cuda) form w * exp(x - max), where a weight
# near float32's smallest normal (1.2e-38) underflows; the cpu kernels add log w and take any lam
LAMS = st.one_of(st.just(0.0), st.floats(2.0**-100, 1.0, width=32))


def loss(name):
    row, terms, _ = resolve(name, PARAMS[name])
    return row, terms


@st.composite
def batches(draw, max_size=MAX_BATCH, classes=(1, 6), dims=(1, 3, 8, 17, 33)):
    """(embeddings [B, d] float32 on DEVICE, labels [B], generator) with B from 1, odd d allowed."""
    size = draw(st.integers(1, max_size))
    dim = draw(st.sampled_from(dims))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    num_classes = draw(st.integers(*classes))
    labels = torch.randint(num_classes, (size,), generator=gen)
    embeddings = torch.randn(size, dim, generator=gen) * draw(st.sampled_from([0.3, 1.0, 4.0]))
    return embeddings.to(DEVICE), labels.to(DEVICE), gen


def proxies_for(labels, dim, gen, extra=2):
    count = max(int(labels.max()) + 1 if labels.numel() else 0, 2) + extra
    return torch.randn(count, dim, generator=gen).to(labels.device)


def assume_no_cancelling_mix(emb, i, j, lam):
    """The Gram op forms a mix's squared norm lam^2 + (1 - lam)^2 + 2 lam (1 - lam) <e_i, e_j> from
    float32 similarities, an error that grows as 1 / norm^2: nearly cancelling mixes (at d = 3, a pair
    almost antipodal at lam near 0.5) are beyond float32 tolerances, the float32 reference's too, and
    left out (mixes of unit norm below 0.25; README, Backends)."""
    unit = torch.nn.functional.normalize(emb.double(), dim=1)
    assume(not i.numel() or float((lam * unit[i] + (1 - lam) * unit[j]).norm(dim=1).min()) >= 0.25)


def leaves(*tensors, dtype=None):
    return [None if t is None else t.detach().to(dtype or t.dtype).requires_grad_(True) for t in tensors]


def grads(value, inputs):
    present = [t for t in inputs if t is not None]
    return torch.autograd.grad(value, present, allow_unused=True)


def close(actual, expected, rtol=2e-4, atol=2e-5):
    """Elementwise closeness relative to the scale of the expected tensor (infinities must match)."""
    if actual is None or expected is None:
        assert (actual is None or not actual.any()) and (expected is None or not expected.any())
        return
    expected = expected.to(actual.dtype) if expected.dtype != actual.dtype else expected
    finite = expected[torch.isfinite(expected)]
    scale = float(finite.detach().abs().max()) if finite.numel() else 1.0
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=atol * (1.0 + scale),
                               equal_nan=True)


def skip_unless_usable(backend: str) -> None:
    """The cpu backend runs these tests only on CPU tensors, from the built extension."""
    if backend == "cpu" and (DEVICE != "cpu" or not cpu.available()):
        pytest.skip("the cpu backend takes CPU tensors, from the built extension")
