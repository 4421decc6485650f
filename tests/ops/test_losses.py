"""ops.clean_loss / ops.mixed_loss / ops.error_function (and metrix_loss with backend="triton") against
the reference: every loss, every mixup, loss and every gradient."""
from __future__ import annotations

from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from metrix_kernels import FAMILY, metrix_loss, ops, reference
from metrix_kernels.pairs import LABEL_MODES, PAIR_SETS, MixPlan, batch_pairs, hard_negative_plan

from .conftest import DEVICE, EXAMPLES
from .helpers import LAMS, PARAMS, assume_no_cancelling_mix, batches, close, grads, leaves, loss, proxies_for

LOSSES = sorted(FAMILY)


def _both(fn_fused, fn_reference, inputs, dtype=torch.float64):
    """Loss and gradients of the fused path on ``inputs`` and of the reference on float64 copies."""
    fused = fn_fused(inputs)
    copies = leaves(*inputs, dtype=dtype)
    expected = fn_reference(copies)
    return (fused, grads(fused, inputs)), (expected, grads(expected, copies))


def _check(result, rtol=2e-4, atol=2e-5):
    (loss_value, loss_grads), (want, want_grads) = result
    close(loss_value.detach(), want.detach(), rtol, atol)
    for got, expected in zip(loss_grads, want_grads):
        close(got, expected, rtol, atol)


@pytest.mark.parametrize("name", LOSSES)
@settings(max_examples=EXAMPLES)
@given(data=st.data())
def test_clean_loss(name, data):
    row, terms = loss(name)
    # d >= 3: in d = 1 every normalized gradient is 0 up to float32 rounding of large raw gradients, and
    # in d = 2 near-parallel pairs are common, where d(s) = sqrt(2 - 2s) is ill-conditioned in float32
    emb, labels, gen = data.draw(batches(dims=(3, 17, 33)))
    proxies = proxies_for(labels, emb.shape[1], gen) if row.uses_proxies else None
    inputs = leaves(emb, proxies)
    _check(_both(lambda x: ops.clean_loss(row, terms, x[0], labels, x[1], "triton"),
                 lambda x: reference.clean_loss(row, terms, x[0], labels, x[1]), inputs))


@pytest.mark.parametrize("name", LOSSES)
@settings(max_examples=EXAMPLES)
@given(data=st.data())
def test_embedding_mixed_loss(name, data):
    row, terms = loss(name)
    emb, labels, gen = data.draw(batches(max_size=20, classes=(1, 4), dims=(3, 8, 17)))
    proxies = proxies_for(labels, emb.shape[1], gen) if row.uses_proxies else None
    pair_set = data.draw(st.sampled_from(PAIR_SETS))
    i, j = batch_pairs(labels, pair_set)
    plan = MixPlan(i, j, data.draw(st.floats(0.05, 0.95)), pair_set, data.draw(st.sampled_from(LABEL_MODES)))
    assume_no_cancelling_mix(emb, i, j, plan.lam)
    inputs = leaves(emb, proxies)
    # the mixed loss alone, or the error function (clean + weight * mixed from one normalized, sorted batch)
    fused, expected = data.draw(st.sampled_from([
        (lambda x: ops.mixed_loss(row, terms, x[0], labels, x[1], plan, "embedding", backend="triton"),
         lambda x: reference.mixed_loss(row, terms, x[0], labels, x[1], plan, "embedding")),
        (lambda x: ops.error_function(row, terms, x[0], labels, x[1], plan, "embedding", weight=0.7, backend="triton"),
         lambda x: reference.error_function(row, terms, x[0], labels, x[1], plan, "embedding", weight=0.7)),
    ]))
    # proxy-candidate losses make the mixes a block of rows at a time: one block, or blocks of B rows
    with mock.patch.object(ops, "MIX_BLOCK_ELEMENTS", data.draw(st.sampled_from([ops.MIX_BLOCK_ELEMENTS, 1]))):
        _check(_both(fused, expected, inputs), atol=1e-4)


@pytest.mark.parametrize("name", LOSSES)
@settings(max_examples=max(1, EXAMPLES - 1))
@given(data=st.data())
def test_feature_mixed_loss(name, data):
    row, terms = loss(name)
    emb, labels, gen = data.draw(batches(max_size=6, classes=(1, 3), dims=(3, 5)))
    proxies = proxies_for(labels, emb.shape[1], gen) if row.uses_proxies else None
    features = torch.randn(emb.shape[0], 7, 2, 3, generator=gen).to(DEVICE)
    head = torch.nn.Linear(7, emb.shape[1]).to(DEVICE)
    pair_set = data.draw(st.sampled_from(PAIR_SETS))
    i, j = batch_pairs(labels, pair_set)
    plan = MixPlan(i, j, data.draw(LAMS), pair_set, data.draw(st.sampled_from(LABEL_MODES)))
    inputs = leaves(emb, proxies, features, head.weight, head.bias)

    weight = data.draw(st.sampled_from([None, 0.7]))  # None: the mixed loss alone, else the error function

    def fused(x):
        fn = lambda pooled: torch.nn.functional.linear(pooled, x[3], x[4])
        if weight is None:
            return ops.mixed_loss(row, terms, x[0], labels, x[1], plan, "feature", x[2], fn, backend="triton")
        return ops.error_function(row, terms, x[0], labels, x[1], plan, "feature", x[2], fn, weight=weight,
                                  backend="triton")

    def expected(x):
        fn = lambda pooled: torch.nn.functional.linear(pooled, x[3], x[4])
        if weight is None:
            return reference.mixed_loss(row, terms, x[0], labels, x[1], plan, "feature", x[2], fn)
        return reference.error_function(row, terms, x[0], labels, x[1], plan, "feature", x[2], fn, weight=weight)

    _check(_both(fused, expected, inputs), atol=1e-4)


@pytest.mark.parametrize("name", LOSSES)
@settings(max_examples=max(1, EXAMPLES - 1))
@given(data=st.data())
def test_input_mixed_loss(name, data):
    row, terms = loss(name)
    emb, labels, gen = data.draw(batches(max_size=20, classes=(1, 4), dims=(3, 8)))
    proxies = proxies_for(labels, emb.shape[1], gen) if row.uses_proxies else None
    x_in = torch.randn(emb.shape[0], 5, generator=gen).to(DEVICE)
    weight = torch.randn(emb.shape[1], 5, generator=gen).to(DEVICE)
    plan = hard_negative_plan(emb, labels, data.draw(st.sampled_from(PAIR_SETS)), data.draw(LAMS),
                              data.draw(st.sampled_from(LABEL_MODES)), data.draw(st.integers(1, 3)))
    inputs = leaves(emb, proxies, x_in, weight)

    def fused(x):
        model = lambda batch: batch @ x[3].T
        return ops.mixed_loss(row, terms, x[0], labels, x[1], plan, "input", inputs=x[2], model=model,
                              backend="triton")

    def expected(x):
        model = lambda batch: batch @ x[3].T
        return reference.mixed_loss(row, terms, x[0], labels, x[1], plan, "input", inputs=x[2], model=model)

    _check(_both(fused, expected, inputs), atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["multi_similarity", "proxy_anchor", "contrastive"])
def test_half_precision(name, dtype):
    """Half inputs, float32 accumulation: close to the float32 reference on the same rounded inputs."""
    row, terms = loss(name)
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(4, (21,), generator=gen).to(DEVICE)
    emb = torch.randn(21, 19, generator=gen).to(DEVICE, dtype)
    proxies = proxies_for(labels, 19, gen).to(dtype) if row.uses_proxies else None
    i, j = batch_pairs(labels, "pos-neg")
    plan = MixPlan(i, j, 0.35, "pos-neg", "interpolate")
    inputs = leaves(emb, proxies)

    def fused(x):
        return ops.error_function(row, terms, x[0], labels, x[1], plan, "embedding", backend="triton")

    def expected(x):
        return reference.error_function(row, terms, x[0], labels, x[1], plan, "embedding")

    result = _both(fused, expected, inputs, dtype=torch.float32)
    assert result[0][0].dtype == dtype and all(g.dtype == dtype for g in result[0][1])
    _check(result, rtol=3e-2, atol=3e-2)


def test_metrix_loss_routes_to_triton(device):
    gen = torch.Generator().manual_seed(1)
    emb = torch.randn(13, 6, generator=gen).to(device)
    labels = torch.randint(3, (13,), generator=gen).to(device)
    kwargs = dict(loss="multi_similarity", mixup="embedding", pairs="pos-neg", lam=0.4, **PARAMS["multi_similarity"])
    (fused,) = leaves(emb)
    (plain,) = leaves(emb)
    got = metrix_loss(fused, labels, backend="triton", **kwargs)
    want = metrix_loss(plain, labels, backend="reference", **kwargs)
    close(got, want)
    close(*grads(got, [fused]), *grads(want, [plain]))


def test_unavailable_backend_names_the_available_ones(device):
    emb, labels = torch.randn(4, 3, device=device), torch.tensor([0, 0, 1, 1], device=device)
    with pytest.raises(ValueError, match="available"):
        metrix_loss(emb, labels, backend="cuda" if device == "cpu" else "cpu")
