"""The backend's loss assembly (assemble_forward / assemble_backward) against family.assemble under
autograd in float64: every loss row, one or two statistics tensors (an error function's clean and
mixed parts, of equal or different anchor counts), empty terms, the loss and both term-sum gradients."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from metrix_kernels import FAMILY, ops
from metrix_kernels.family import LossRow, Rho, Sigma, TermStats, Terms, assemble

from .conftest import DEVICE, EXAMPLES
from .helpers import close, loss, skip_unless_usable

CASES = [("triton", torch.float32), ("cpu", torch.float32), ("cpu", torch.float64)]


def _term(draw, gen, anchors, exponential):
    """(sum, mass, nnz) of one term for each anchor; none, about a third or all of the terms are empty."""
    empty = torch.rand(anchors, generator=gen) < draw(st.sampled_from([0.0, 0.3, 1.0]))
    mass = torch.where(empty, 0.0, torch.rand(anchors, generator=gen) * 4 + 0.01)
    if exponential:  # log of the sum: any real, -inf when empty
        total = torch.where(empty, -math.inf, torch.randn(anchors, generator=gen) * 8)
    else:
        total = torch.where(empty, 0.0, torch.rand(anchors, generator=gen) * 3)
    nnz = torch.where(empty, 0.0, torch.randint(0, 5, (anchors,), generator=gen).float())
    return total, mass, nnz


# anchor counts around the interpreter's block of 16 and, on a GPU, past the compiled block of 1024
ANCHORS = [0, 1, 2, 15, 16, 17, 40] + ([1023, 2500] if DEVICE == "cuda" else [])


@st.composite
def statistics(draw, terms):
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    anchors = draw(st.sampled_from(ANCHORS))
    pos = _term(draw, gen, anchors, terms.sigma_pos.form == "exp")
    neg = _term(draw, gen, anchors, terms.sigma_neg.form == "exp")
    return torch.stack([pos[0], neg[0], pos[1], neg[1], pos[2], neg[2]]).to(DEVICE)


# A rho of the exponential term's sum itself (identity), and per-mass averaging of a log-sum: no row
# of FAMILY uses them, both kernels implement them.
SYNTHETIC = LossRow("synthetic", "examples", "examples", {}, "mean", lambda: None, "test only")
SYNTHETIC_TERMS = Terms(Sigma("exp", "s", 2.0, -1.0), Sigma("exp", "s", 3.0, 0.5), Rho("identity", scale=0.5),
                        Rho("log1p", per_mass=True), "softplus")


def _row(name):
    return (SYNTHETIC, SYNTHETIC_TERMS) if name == "synthetic" else loss(name)


def _formula(row, terms, stats):
    """The counts (rows 2-5) are data, not differentiated, as in the ops layer."""
    return assemble(row, terms, TermStats(stats[0], stats[1], *stats[2:].detach()))


@pytest.mark.parametrize("backend, dtype", CASES)
@pytest.mark.parametrize("name", sorted(FAMILY) + ["synthetic"])
@settings(max_examples=4 * EXAMPLES)
@given(data=st.data())
def test_assembly_matches_the_formula(name, backend, dtype, data):
    skip_unless_usable(backend)
    row, terms = _row(name)
    parts = [data.draw(statistics(terms)).to(dtype)]
    if data.draw(st.booleans()):
        same = data.draw(st.booleans())
        parts.append(data.draw(statistics(terms)).to(dtype) if not same else torch.roll(parts[0], 1, dims=1))
    weight = data.draw(st.sampled_from([0.0, 0.4, 1.7]))
    upstream = data.draw(st.sampled_from([1.0, -2.5]))

    got_in = [p.clone().requires_grad_(True) for p in parts]
    got = ops._assemble(row, terms, dtype, backend, *got_in, weight=weight)
    got_grads = torch.autograd.grad(got * upstream, got_in)

    want_in = [p.double().requires_grad_(True) for p in parts]
    want = _formula(row, terms, want_in[0])
    if len(parts) == 2:
        want = want + weight * _formula(row, terms, want_in[1])
    want_grads = torch.autograd.grad(want * upstream, want_in)

    tolerance = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else {}
    assert got.dtype == dtype and got.shape == ()
    close(got.detach(), want.detach(), **tolerance)
    for g, w in zip(got_grads, want_grads):
        assert torch.isfinite(g).all()
        close(g, w, **tolerance)
        assert not g[2:].any()  # the counts take no gradient


@pytest.mark.parametrize("backend", ["triton", "cpu"])
def test_assembly_keeps_the_embeddings_dtype(device, backend):
    skip_unless_usable(backend)
    row, terms = loss("multi_similarity")
    stats = torch.zeros(6, 3, device=device)
    stats[2:4] = 1.0
    assert ops._assemble(row, terms, torch.float16, backend, stats).dtype == torch.float16


@pytest.mark.parametrize("backend", ["triton", "cpu"])
def test_assembly_keeps_nan(device, backend):
    """A NaN term sum gives a NaN loss, as the formula does (lifted structure: tau is a relu, whose
    clamp must not drop the NaN)."""
    skip_unless_usable(backend)
    row, terms = loss("lifted_structure")
    stats = torch.ones(6, 3, device=device)
    stats[0, 1] = float("nan")
    assert torch.isnan(_formula(row, terms, stats))
    assert torch.isnan(ops._assemble(row, terms, torch.float32, backend, stats))
