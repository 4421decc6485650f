"""Backend "cpu" against the reference.

The kernel functions are checked against reference.term_stats on similarity and weight matrices
built here from the contract's definitions (metrix_kernels/backends/__init__.py), and their
backward against autograd of <g_pos, pos_sum> + <g_neg, neg_sum>; then metrix_loss(backend="cpu")
end to end against backend="reference" for every loss and pair set, loss and gradients.
"""
from __future__ import annotations

import subprocess
import sys
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given
from hypothesis import strategies as st

from metrix_kernels import FAMILY, metrix_loss, ops, reference
from metrix_kernels.backends import MEMBER_ALL_BUT_SELF, KernelConfig, MEMBER_RULES, cpu
from metrix_kernels.family import resolve

built = pytest.mark.skipif(not cpu.available(), reason="metrix_kernels._cpu is not built")

LOSSES = sorted(FAMILY)
DTYPES = (torch.float32, torch.float64)
PAIR_SETS = tuple(MEMBER_RULES)
# subnormal lam would overflow the reference's 1 / sum (the kernels take log w and stay exact);
# width 32: a lam normal in float64 can be subnormal in a float32 run (1.4e-45 was drawn once)
LAMS = st.floats(0, 1, width=32, allow_subnormal=False)
# published-scale hyperparameters: exponent scales up to 76
PARAMS = {
    "contrastive": {"pos_margin": 0.2, "neg_margin": 1.3},
    "lifted_structure": {"pos_margin": 0.1, "neg_margin": 1.0},
    "binomial_deviance": {"alpha": 2.0, "beta": 50.0, "base": 0.5},
    "multi_similarity": {"alpha": 17.97, "beta": 75.66, "base": 0.77},
    "proxy_anchor": {"margin": 0.1, "alpha": 32.0},
    "nca": {"softmax_scale": 4.0},
    "proxy_nca": {"softmax_scale": 3.0},
    "proxy_nca_pp": {"temperature": 1.0 / 9.0},
}


def terms_of(name):
    return resolve(name, PARAMS[name])[1]


def tol(dtype):
    # float32: the sphere distance's 1 / d near s = 1 amplifies the rounding of s; float64 is
    # computed and returned in float64, where the kernels agree with the reference to about 1e-8
    return dict(rtol=1e-3, atol=2e-4) if dtype == torch.float32 else dict(rtol=1e-7, atol=1e-7)


def close(actual, expected, dtype):
    """Closeness relative to the largest finite expected value; infinities must match."""
    expected = expected.to(torch.float64)
    finite = expected[torch.isfinite(expected)]
    scale = 1.0 + (float(finite.abs().max()) if finite.numel() else 0.0)
    t = tol(dtype)
    torch.testing.assert_close(actual.to(torch.float64), expected, rtol=t["rtol"], atol=t["atol"] * scale)


def contract_weights(rli, rlj, ridx, cli, clj, cidx, lam, cfg, mask):
    """w_pos, w_neg [R, V] as the contract defines them (mixed side (li, lj, i), clean side (z, a))."""
    if cfg.mixed_rows:
        li, lj, i, z, a = rli[:, None], rlj[:, None], ridx[:, None], cli[None], cidx[None]
    else:
        li, lj, i, z, a = cli[None], clj[None], cidx[None], rli[:, None], ridx[:, None]
    pi, pj = li == z, lj == z
    rules = [pi | ~pi, i != a, pi & ~pj, (i == a) & ~pj, pi & pj, ~pi & ~pj]
    member = (mask if mask is not None else rules[cfg.member]).to(torch.float64)
    pi, pj = pi.to(torch.float64), pj.to(torch.float64)
    y = [lam * pi + (1 - lam) * pj, torch.zeros_like(pi), pi if lam >= 0.5 else pj][cfg.label_mode]
    y = y.expand_as(member)
    return member * y, member * (1 - y)


def check_stats(stats, expected, dtype, count_nonzero=True):
    # the backend contract: float64 statistics for float64 inputs, float32 otherwise
    assert stats.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert stats.shape == (6, expected.pos_sum.shape[0])
    for k, field in enumerate(expected[: 6 if count_nonzero else 4]):
        close(stats[k], field.detach(), dtype)


def check_backward(grads, expected_value, inputs, dtype):
    want = torch.autograd.grad(expected_value, inputs, allow_unused=True)
    for got, exp, x in zip(grads, want, inputs):
        assert got.dtype == dtype and got.shape == x.shape
        close(got, torch.zeros_like(x) if exp is None else exp, dtype)


def weighted_sum(stats, g_pos, g_neg):
    """<g_pos, pos_sum> + <g_neg, neg_sum>, leaving out empty (-inf) terms."""
    pos = torch.where(torch.isfinite(stats.pos_sum), stats.pos_sum, torch.zeros_like(stats.pos_sum))
    neg = torch.where(torch.isfinite(stats.neg_sum), stats.neg_sum, torch.zeros_like(stats.neg_sum))
    return (g_pos * pos).sum() + (g_neg * neg).sum()


def unit(n, d, gen, dtype):
    # d >= 3 in the tests: in one or two dimensions near-equal or opposite vectors are common, and
    # there the sphere distance (1 / d) and the mix norm (1 / n_ij) amplify float32 rounding past any tolerance
    return F.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=1).to(dtype)


@built
@given(
    loss=st.sampled_from(LOSSES), dtype=st.sampled_from(DTYPES), rows=st.integers(0, 37), cols=st.integers(0, 45),
    dim=st.sampled_from([3, 16, 33]), classes=st.integers(1, 5), member=st.integers(0, 5),
    label_mode=st.integers(0, 2), mixed_rows=st.booleans(), use_mask=st.booleans(), lam=LAMS,
    seed=st.integers(0, 2**31 - 1),
)
def test_pairwise(loss, dtype, rows, cols, dim, classes, member, label_mode, mixed_rows, use_mask, lam, seed):
    check_pairwise(loss, dtype, rows, cols, dim, classes, member, label_mode, mixed_rows, use_mask, lam, seed)


@built
@pytest.mark.parametrize("pair_set", ["pos-neg", "anc-neg", "pos-pos"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_pairwise_large_groups(pair_set, dtype):
    # the grouped path (mixed columns, no mask) with groups of several hundred columns: the
    # backward splits a group's columns into work items of 128
    check_pairwise("multi_similarity", dtype, 30, 700, 16, 2, MEMBER_RULES[pair_set], 0, False, False, 0.3, 5,
                   indices=3)


def check_pairwise(loss, dtype, rows, cols, dim, classes, member, label_mode, mixed_rows, use_mask, lam, seed,
                   indices=6):
    """cpu.pairwise_forward / backward against the contract's weights (indices in [-1, indices))."""
    gen = torch.Generator().manual_seed(seed)
    terms = terms_of(loss)
    cfg = KernelConfig(terms.sigma_pos, terms.sigma_neg, member, label_mode, mixed_rows, True)
    r, c = unit(rows, dim, gen, dtype), unit(cols, dim, gen, dtype)
    lab = [torch.randint(classes, (n,), generator=gen) for n in (rows, rows, cols, cols)]
    ridx, cidx = (torch.randint(-1, indices, (n,), generator=gen) for n in (rows, cols))
    mask = torch.rand(rows, cols, generator=gen) < 0.6 if use_mask else None
    args = (r, lab[0], lab[1], ridx, c, lab[2], lab[3], cidx, lam, cfg)

    stats = cpu.pairwise_forward(*args, member_mask=mask)
    r64, c64 = (x.detach().double().requires_grad_(True) for x in (r, c))
    w_pos, w_neg = contract_weights(lab[0], lab[1], ridx, lab[2], lab[3], cidx, lam, cfg, mask)
    expected = reference.term_stats(r64 @ c64.T, w_pos, w_neg, terms)
    check_stats(stats, expected, dtype)

    g_pos, g_neg = torch.randn(2, rows, generator=gen, dtype=torch.float64)
    grads = cpu.pairwise_backward(*args, stats, g_pos.to(dtype), g_neg.to(dtype), member_mask=mask)
    check_backward(grads, weighted_sum(expected, g_pos, g_neg), (r64, c64), dtype)


def mixed_candidates(labels, pair_set):
    """The candidate pairs (i, j) of the Gram op: ordered i != j, or i < j for pos-pos / neg-neg."""
    b = labels.shape[0]
    i, j = torch.meshgrid(torch.arange(b), torch.arange(b), indexing="ij")
    keep = i < j if pair_set in ("pos-pos", "neg-neg") else i != j
    return i[keep], j[keep]


@built
@given(
    loss=st.sampled_from(LOSSES), dtype=st.sampled_from(DTYPES), batch=st.integers(1, 24),
    dim=st.sampled_from([3, 16, 33]), classes=st.integers(1, 5), pair_set=st.sampled_from(PAIR_SETS),
    label_mode=st.integers(0, 2), proxy_anchors=st.booleans(), lam=LAMS, seed=st.integers(0, 2**31 - 1),
)
def test_gram_mixed(loss, dtype, batch, dim, classes, pair_set, label_mode, proxy_anchors, lam, seed):
    # lam near 0 or 1 mixes an anchor with (almost) itself: d ~ 0, where 1 / d turns float32's
    # rounding of s into tangent gradients of ~1e-4 whose exact value is 0 (float64 covers the case)
    assume(dtype == torch.float64 or 0.01 < lam < 0.99)
    gen = torch.Generator().manual_seed(seed)
    terms = terms_of(loss)
    member = MEMBER_RULES[pair_set]
    cfg = KernelConfig(terms.sigma_pos, terms.sigma_neg, member, label_mode, False, True)
    emb = unit(batch, dim, gen, dtype)
    labels = torch.randint(classes, (batch,), generator=gen)
    if proxy_anchors:
        anchors = unit(classes + 1, dim, gen, dtype)
        anchor_label, anchor_index = torch.arange(classes + 1), torch.full((classes + 1,), -1)
    else:
        anchors, anchor_label, anchor_index = emb, labels, torch.arange(batch)
    args = (anchors, anchor_label, anchor_index, emb, labels, lam, cfg)

    stats = cpu.gram_mixed_forward(*args)
    a64, e64 = (x.detach().double().requires_grad_(True) for x in (anchors, emb))
    i, j = mixed_candidates(labels, pair_set)
    mixed = F.normalize(lam * e64[i] + (1 - lam) * e64[j], dim=1)
    anchor_side = e64 if not proxy_anchors else a64
    # a proxy anchor has no index: anc-neg means pos-neg for it (pairs.rule_member)
    rule_cfg = cfg._replace(member=MEMBER_RULES["pos-neg"]) if proxy_anchors and pair_set == "anc-neg" else cfg
    w_pos, w_neg = contract_weights(anchor_label, anchor_label, anchor_index, labels[i], labels[j], i, lam,
                                    rule_cfg, None)
    expected = reference.term_stats(anchor_side @ mixed.T, w_pos, w_neg, terms)
    check_stats(stats, expected, dtype)

    g_pos, g_neg = torch.randn(2, anchors.shape[0], generator=gen, dtype=torch.float64)
    grad_anchors, grad_emb = cpu.gram_mixed_backward(*args, stats, g_pos.to(dtype), g_neg.to(dtype))
    value = weighted_sum(expected, g_pos, g_neg)
    # The Gram identity holds for unit embeddings, so the kernel's gradient is exact along the
    # sphere only; the ops layer's normalization drops the radial part: compare tangent parts.
    if proxy_anchors:
        want_anchors, want_emb = torch.autograd.grad(value, (a64, e64))
        close(grad_anchors, want_anchors, dtype)
    else:  # anchors and emb are one tensor: the two gradients add up
        (want_emb,) = torch.autograd.grad(value, (e64,))
        grad_emb = grad_emb + grad_anchors
    close(tangent(grad_emb.double(), e64), tangent(want_emb, e64), dtype)


def tangent(g, e):
    e = e.detach()
    return g - (g * e).sum(1, keepdim=True) * e


@built
@given(
    dtype=st.sampled_from(DTYPES), batch=st.integers(1, 6), pairs=st.integers(0, 12), channels=st.integers(1, 20),
    height=st.integers(1, 4), width=st.integers(1, 5), lam=LAMS, seed=st.integers(0, 2**31 - 1),
)
def test_mixpool(dtype, batch, pairs, channels, height, width, lam, seed):
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, channels, height, width, generator=gen, dtype=torch.float64)
    i, j = torch.randint(batch, (2, pairs), generator=gen)
    pooled, argmax = cpu.mixpool_forward(features.to(dtype), i, j, lam)
    f64 = features.clone().requires_grad_(True)
    expected = reference.pool(lam * f64[i] + (1 - lam) * f64[j])
    assert argmax.dtype == cpu.mixpool_argmax_dtype(height * width) and pooled.dtype == dtype
    close(pooled, expected.detach(), dtype)
    grad_pooled = torch.randn(pairs, channels, generator=gen, dtype=torch.float64)
    grad = cpu.mixpool_backward(grad_pooled.to(dtype), features.to(dtype), i, j, lam, argmax)
    (want,) = torch.autograd.grad((expected * grad_pooled).sum(), (f64,))
    close(grad, want, dtype)


@built
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("height, width, small", [(2, 2, True), (2, 2, False), (16, 16, True), (16, 16, False),
                                                  (16, 17, False)])
def test_mixpool_argmax_widths(dtype, height, width, small):
    """The kernels take a uint8 or an int32 argmax, on both backward paths (compares in registers up
    to 8 positions, a store at the argmax beyond): the same gradient either way. cpu.py picks uint8
    up to 256 positions."""
    gen = torch.Generator().manual_seed(height * width)
    features = torch.randn(3, 11, height, width, generator=gen, dtype=torch.float64)
    i, j = torch.tensor([0, 1, 2, 2, 0]), torch.tensor([1, 1, 0, 2, 2])
    f = features.to(dtype)
    pooled, argmax = cpu._lib().mixpool_forward(f, i, j, 0.3, small)
    assert argmax.dtype == (torch.uint8 if small else torch.int32)
    assert cpu.mixpool_argmax_dtype(height * width) == (torch.uint8 if height * width <= 256 else torch.int32)
    f64 = features.clone().requires_grad_(True)
    expected = reference.pool(0.3 * f64[i] + 0.7 * f64[j])
    close(pooled, expected.detach(), dtype)
    grad_pooled = torch.randn(5, 11, generator=gen, dtype=torch.float64)
    (want,) = torch.autograd.grad((expected * grad_pooled).sum(), (f64,))
    close(cpu.mixpool_backward(grad_pooled.to(dtype), f, i, j, 0.3, argmax), want, dtype)


@built
def test_mixpool_uint8_argmax_refuses_large_maps():
    features = torch.zeros(2, 3, 16, 17)
    with pytest.raises(RuntimeError, match="uint8 argmax holds at most 256 positions"):
        cpu._lib().mixpool_forward(features, torch.tensor([0]), torch.tensor([1]), 0.5, True)


@built
def test_inputs_that_require_grad_over_many_tiles():
    """The ops layer hands over leaves that require grad; every worker thread must cope."""
    gen = torch.Generator().manual_seed(0)
    terms = terms_of("multi_similarity")
    e = unit(300, 16, gen, torch.float32).requires_grad_(True)
    labels, index = torch.arange(300) // 8, torch.arange(300)
    cfg = KernelConfig(terms.sigma_pos, terms.sigma_neg, 1)
    stats = cpu.pairwise_forward(e, labels, labels, index, e, labels, labels, index, 1.0, cfg)
    g = torch.ones(300)
    cpu.pairwise_backward(e, labels, labels, index, e, labels, labels, index, 1.0, cfg, stats, g, g)
    cfg = cfg._replace(member=MEMBER_RULES["pos-neg"])
    stats = cpu.gram_mixed_forward(e, labels, index, e, labels, 0.3, cfg)
    cpu.gram_mixed_backward(e, labels, index, e, labels, 0.3, cfg, stats, g, g)


@built
@pytest.mark.parametrize("op", ["pairwise", "gram"])
def test_backward_reuses_forward_products_only_on_the_same_inputs(op):
    """A forward on inputs that require grad leaves its products to the backward on the very same,
    unmodified tensors; a backward on other tensors, or after an in-place change, recomputes them."""
    gen = torch.Generator().manual_seed(0)
    terms = terms_of("multi_similarity")
    labels, index = torch.arange(40) // 4, torch.arange(40)
    g_pos, g_neg = torch.rand(2, 40, generator=gen)
    if op == "pairwise":
        cfg = KernelConfig(terms.sigma_pos, terms.sigma_neg, MEMBER_ALL_BUT_SELF)
        args = (labels, labels, index)
        forward = lambda e: cpu.pairwise_forward(e, *args, e, *args, 1.0, cfg)
        backward = lambda e, st: cpu.pairwise_backward(e, *args, e, *args, 1.0, cfg, st, g_pos, g_neg)
    else:
        cfg = KernelConfig(terms.sigma_pos, terms.sigma_neg, MEMBER_RULES["pos-neg"])
        forward = lambda e: cpu.gram_mixed_forward(e, labels, index, e, labels, 0.3, cfg)
        backward = lambda e, st: cpu.gram_mixed_backward(e, labels, index, e, labels, 0.3, cfg, st, g_pos, g_neg)
    e = unit(40, 16, gen, torch.float32).requires_grad_(True)
    stats = forward(e)
    assert op in cpu._kept
    reused = backward(e, stats)
    assert op not in cpu._kept
    forward(e)
    other = e.detach().clone().requires_grad_(True)
    for got, want in zip(backward(other, stats), reused):  # recomputed
        torch.testing.assert_close(got, want)
    forward(e)
    with torch.no_grad():
        e.add_(0.1 * torch.randn(40, 16, generator=gen))  # stale products must not be used
    stale = backward(e, stats)
    fresh = backward(e.detach().clone(), stats)
    for got, want in zip(stale, fresh):
        torch.testing.assert_close(got, want)


@built
def test_half_inputs_run_in_float32():
    gen = torch.Generator().manual_seed(0)
    terms = terms_of("multi_similarity")
    cfg = KernelConfig(terms.sigma_pos, terms.sigma_neg, 1)
    e = unit(20, 8, gen, torch.float32)
    labels, index = torch.arange(20) // 4, torch.arange(20)
    args = (labels, labels, index)
    want = cpu.pairwise_forward(e, *args, e, *args, 1.0, cfg)
    got = cpu.pairwise_forward(e.bfloat16(), *args, e.bfloat16(), *args, 1.0, cfg)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    g = torch.ones(20)
    grads = cpu.pairwise_backward(e.bfloat16(), *args, e.bfloat16(), *args, 1.0, cfg, got, g, g)
    assert all(x.dtype == torch.bfloat16 for x in grads)


# ---- end to end: metrix_loss(backend="cpu") against backend="reference" ----------------------------

def _e2e_inputs(loss, dtype, batch, dim, classes, seed):
    gen = torch.Generator().manual_seed(seed)
    emb = torch.randn(batch, dim, generator=gen, dtype=torch.float64).to(dtype)
    labels = torch.randint(classes, (batch,), generator=gen)
    proxies = torch.randn(classes + 1, dim, generator=gen, dtype=torch.float64).to(dtype)
    return emb, labels, (proxies if FAMILY[loss].uses_proxies else None)


def _loss_and_grads(backend, emb, labels, proxies, **kw):
    leaves = [emb.detach().clone().requires_grad_(True)]
    if proxies is not None:
        leaves.append(proxies.detach().clone().requires_grad_(True))
    value = metrix_loss(leaves[0], labels, proxies=leaves[1] if proxies is not None else None, backend=backend, **kw)
    return value.detach(), torch.autograd.grad(value, leaves, allow_unused=True)


def _e2e_close(actual, expected, dtype):
    # float64 runs in float64 here (cpu.FLOAT64), up to the float32 statistics of the contract
    close(actual, expected, dtype)


@built
@given(
    loss=st.sampled_from(LOSSES), dtype=st.sampled_from(DTYPES), pairs=st.sampled_from((None,) + PAIR_SETS),
    batch=st.integers(1, 20), dim=st.sampled_from([3, 5, 16]), classes=st.integers(1, 4),
    label_mode=st.sampled_from(["interpolate", "negative", "dominant"]), lam=LAMS,
    seed=st.integers(0, 2**31 - 1),
)
def test_metrix_loss_embedding_mixup(loss, dtype, pairs, batch, dim, classes, label_mode, lam, seed):
    emb, labels, proxies = _e2e_inputs(loss, dtype, batch, dim, classes, seed)
    kw = dict(loss=loss, mixup=None if pairs is None else "embedding", pairs=pairs or "pos-neg", lam=lam,
              label_mode=label_mode, weight=0.7, **PARAMS[loss])
    got, got_grads = _loss_and_grads("cpu", emb, labels, proxies, **kw)
    want, want_grads = _loss_and_grads("reference", emb, labels, proxies, **kw)
    assert got.dtype == dtype and cpu.FLOAT64
    _e2e_close(got, want, dtype)
    for g, w in zip(got_grads, want_grads):
        _e2e_close(g, w, dtype)


@built
@pytest.mark.parametrize("loss", ["proxy_nca", "proxy_nca_pp"])
@pytest.mark.parametrize("pairs", ["pos-neg", "neg-neg"])
def test_embedding_mixes_against_proxies_by_blocks(loss, pairs):
    """Proxy-candidate losses make their embedding mixes a block of rows at a time, remade in the
    backward pass: blocks of B = 12 rows (8 blocks for pos-neg, 6 for neg-neg) give the reference's
    loss and gradients."""
    emb, labels, proxies = _e2e_inputs(loss, torch.float32, 12, 5, 3, seed=7)
    kw = dict(loss=loss, mixup="embedding", pairs=pairs, lam=0.3, weight=0.7, **PARAMS[loss])
    with mock.patch.object(ops, "MIX_BLOCK_ELEMENTS", 1):
        got, got_grads = _loss_and_grads("cpu", emb, labels, proxies, **kw)
    want, want_grads = _loss_and_grads("reference", emb, labels, proxies, **kw)
    _e2e_close(got, want, torch.float32)
    for g, w in zip(got_grads, want_grads):
        _e2e_close(g, w, torch.float32)


@built
@given(
    loss=st.sampled_from(LOSSES), mixup=st.sampled_from(["feature", "input"]), pairs=st.sampled_from(PAIR_SETS),
    batch=st.integers(1, 12), classes=st.integers(1, 4), lam=LAMS, seed=st.integers(0, 2**31 - 1),
)
def test_metrix_loss_feature_and_input_mixup(loss, mixup, pairs, batch, classes, lam, seed):
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, 3, 2, 3, generator=gen)
    head = torch.nn.Linear(3, 4)
    torch.nn.init.normal_(head.weight, generator=gen)
    inputs = torch.randn(batch, 6, generator=gen)
    model = torch.nn.Linear(6, 4)
    torch.nn.init.normal_(model.weight, generator=gen)
    emb = head(reference.pool(features)) if mixup == "feature" else model(inputs)
    labels = torch.randint(classes, (batch,), generator=gen)
    proxies = torch.randn(classes + 1, 4, generator=gen) if FAMILY[loss].uses_proxies else None
    kw = dict(loss=loss, mixup=mixup, pairs=pairs, lam=lam, proxies=proxies, features=features, head=head,
              inputs=inputs, model=model, hard_negatives=2, **PARAMS[loss])
    results = []
    for backend in ("cpu", "reference"):
        value = metrix_loss(emb, labels, backend=backend, **kw)
        params = list(head.parameters()) + list(model.parameters())
        results.append((value.detach(), torch.autograd.grad(value, params, allow_unused=True, retain_graph=True)))
    (got, got_grads), (want, want_grads) = results
    _e2e_close(got, want, torch.float32)
    for g, w in zip(got_grads, want_grads):
        if g is None or w is None:
            assert (g is None or not g.any()) and (w is None or not w.any())
        else:
            _e2e_close(g, w, torch.float32)


@built
def test_auto_picks_cpu_on_cpu_tensors(monkeypatch):
    calls = []
    original = cpu.pairwise_forward
    monkeypatch.setattr(cpu, "pairwise_forward", lambda *a, **k: calls.append(1) or original(*a, **k))
    emb, labels = torch.randn(8, 4), torch.arange(8) // 2
    metrix_loss(emb, labels, mixup=None, backend="auto")
    assert calls


def test_missing_extension_warns_and_falls_back():
    """Without the compiled module: no ImportError, one logged warning, backend="auto" -> reference."""
    script = (
        "import sys; sys.modules['metrix_kernels._cpu'] = None\n"
        "import torch\n"
        "from metrix_kernels import metrix_loss\n"
        "from metrix_kernels.backends import cpu\n"
        "assert not cpu.available()\n"
        "emb, labels = torch.randn(8, 4), torch.arange(8) // 2\n"
        "auto = metrix_loss(emb, labels, lam=0.5, pairs='pos-neg', backend='auto')\n"
        "ref = metrix_loss(emb, labels, lam=0.5, pairs='pos-neg', backend='reference')\n"
        "assert torch.equal(auto, ref)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "compiled CPU kernels are not available" in done.stderr


@built
@pytest.mark.parametrize("op", ["pairwise", "gram"])
def test_threaded_backward_is_deterministic(op):
    """With several threads, the backwards that sum per-thread buffers (the grouped pairwise path's
    row gradients, the Gram op's private dG under neg-neg) give the same bits on every run: work goes
    to threads round-robin and the buffers are summed in thread order (the trainer's resume and
    reproducibility rest on it; the other tests run one thread)."""
    gen = torch.Generator().manual_seed(11)
    terms = terms_of("multi_similarity")
    labels = torch.arange(120) % 5
    e = unit(120, 16, gen, torch.float32)
    if op == "pairwise":
        i = torch.randint(120, (3000,), generator=gen)
        j = torch.randint(120, (3000,), generator=gen)
        cols = unit(3000, 16, gen, torch.float32)
        cfg = KernelConfig(terms.sigma_pos, terms.sigma_neg, MEMBER_RULES["pos-neg"], 0, False, True)
        args = (e, labels, labels, torch.arange(120), cols, labels[i], labels[j], i, 0.3, cfg)
        forward, backward = cpu.pairwise_forward, cpu.pairwise_backward
    else:
        cfg = KernelConfig(terms.sigma_pos, terms.sigma_neg, MEMBER_RULES["neg-neg"], 0, False, True)
        args = (e, labels, torch.arange(120), e, labels, 0.3, cfg)
        forward, backward = cpu.gram_mixed_forward, cpu.gram_mixed_backward
    g = torch.rand(2, 120, generator=gen)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        stats = forward(*args)
        runs = [backward(*args, stats, g[0], g[1]) for _ in range(8)]
    finally:
        torch.set_num_threads(threads)
    for run in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(run, runs[0]))
