"""Properties of the mixed loss (SPEC 1.3) and of the mixing machinery, on the reference."""
from __future__ import annotations

import math
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import LOSSES, PAIR_SETS, batches
from metrix_kernels import FAMILY, metrix_loss, reference
from metrix_kernels.family import resolve
from metrix_kernels.pairs import (
    DEFAULT_PAIRS,
    MixPlan,
    batch_pairs,
    choose_pair_set,
    hard_negative_plan,
    rule_member,
    sample_lam,
    soft_labels,
)

MIXUPS = ("embedding", "feature", "input")
EXAMPLE_CANDIDATES = [name for name in LOSSES if FAMILY[name].candidates == "examples"]


def linear(n_in, n_out, gen):
    net = torch.nn.Linear(n_in, n_out).double()
    with torch.no_grad():
        net.weight.copy_(torch.randn(net.weight.shape, generator=gen, dtype=torch.float64))
        net.bias.copy_(torch.randn(net.bias.shape, generator=gen, dtype=torch.float64))
    return net


def mixup_inputs(mixup, embeddings):
    """(metrix_loss keywords, leaf tensors to differentiate) for a mixup type.

    Feature maps [B, 3, 2, 2] or inputs [B, 4] are a fixed random projection of the batch's
    embeddings (so permuting the batch permutes them); a fixed float64 head / model maps them back
    to embeddings [B, d].
    """
    if mixup in (None, "embedding"):
        emb = embeddings.clone().requires_grad_()
        return {"embeddings": emb}, [emb]
    gen = torch.Generator().manual_seed(0)
    b, dim = embeddings.shape
    channels, size = (3, 12) if mixup == "feature" else (4, 4)
    source = embeddings @ torch.randn(dim, size, generator=gen, dtype=torch.float64)
    net = linear(channels, dim, gen)
    if mixup == "feature":
        features = source.reshape(b, 3, 2, 2).requires_grad_()
        kwargs = {"features": features, "head": net, "embeddings": net(reference.pool(features))}
        return kwargs, [features, *net.parameters()]
    inputs = source.requires_grad_()
    return {"inputs": inputs, "model": net, "embeddings": net(inputs)}, [inputs, *net.parameters()]


def total_loss(loss, mixup, embeddings, labels, proxies, pairs, lam, weight=0.7, **extra):
    kwargs, leaves = mixup_inputs(mixup, embeddings)
    if proxies is not None:
        proxies = proxies.clone().requires_grad_()
        leaves.append(proxies)
    value = metrix_loss(
        labels=labels, loss=loss, mixup=mixup, pairs=pairs, lam=lam, weight=weight,
        proxies=proxies, backend="reference", **kwargs, **extra,
    )
    return value, leaves


# --- lam = 1 under pos-neg -------------------------------------------------------------------


@given(batch=batches(), alpha=st.floats(0.5, 10), base=st.floats(0, 1))
def test_lam_one_pos_neg_is_a_clean_positive_term(batch, alpha, base):
    """With lam = 1 the mix (i, n) is e_i, labelled positive with weight 1 and no negative weight:
    per anchor (1/alpha) log(1 + |N(a)| sum_{i: y_i = y_a} exp(-alpha (s_ai - base))), i = a included."""
    params = {"alpha": alpha, "beta": 50.0, "base": base}
    row, terms, _ = resolve("multi_similarity", params)
    emb, labels = batch.embeddings, batch.labels
    plan = MixPlan(*batch_pairs(labels, "pos-neg"), 1.0, "pos-neg", "interpolate")
    value = reference.mixed_loss(row, terms, emb, labels, None, plan).item()

    e = torch.nn.functional.normalize(emb, dim=1).tolist()
    y = labels.tolist()
    per_anchor = []
    for a in range(len(y)):
        n_neg = sum(1 for c in y if c != y[a])
        same = [i for i in range(len(y)) if y[i] == y[a]]
        s = [sum(u * v for u, v in zip(e[a], e[i])) for i in same]
        per_anchor.append(math.log1p(n_neg * sum(math.exp(-alpha * (si - base)) for si in s)) / alpha)
    assert value == pytest.approx(sum(per_anchor) / len(y), rel=1e-10, abs=1e-12)


# --- pos-pos has no negative term, neg-neg no positive term ----------------------------------


reference_term_stats = reference.term_stats


def mixed_stats(name, batch, pair_set, lam):
    """The TermStats the reference's mixed loss assembles (captured on its way to assemble)."""
    row, terms, _ = resolve(name, {})
    plan = MixPlan(*batch_pairs(batch.labels, pair_set), lam, pair_set, "interpolate")
    captured = []

    def spy(*args):
        captured.append(reference_term_stats(*args))
        return captured[-1]

    with mock.patch.object(reference, "term_stats", spy):
        reference.mixed_loss(row, terms, batch.embeddings, batch.labels, batch.proxies, plan)
    return captured[0]


@pytest.mark.parametrize("name", EXAMPLE_CANDIDATES)
@given(data=st.data())
def test_pos_pos_has_no_negative_and_neg_neg_no_positive_term(name, data):
    """For example candidates; with proxy candidates the mix is the anchor and every proxy not of
    its classes stays a negative, whatever the pair set."""
    batch = data.draw(batches(with_proxies=FAMILY[name].uses_proxies))
    lam = data.draw(st.floats(0, 1))
    pos_pos = mixed_stats(name, batch, "pos-pos", lam)
    assert torch.all(pos_pos.neg_mass == 0)
    neg_neg = mixed_stats(name, batch, "neg-neg", lam)
    assert torch.all(neg_neg.pos_mass == 0)


@given(batch=batches(), lam=st.floats(0.05, 0.95))
def test_absent_terms_do_not_depend_on_their_scale(batch, lam):
    """Visible in the loss: multi-similarity's pos-pos mixed loss ignores beta, neg-neg ignores alpha."""
    def mixed(pair_set, **params):
        row, terms, _ = resolve("multi_similarity", params)
        plan = MixPlan(*batch_pairs(batch.labels, pair_set), lam, pair_set, "interpolate")
        return reference.mixed_loss(row, terms, batch.embeddings, batch.labels, None, plan).item()

    assert mixed("pos-pos", beta=5.0) == mixed("pos-pos", beta=60.0)
    assert mixed("neg-neg", alpha=1.0) == mixed("neg-neg", alpha=9.0)
    # the present terms do depend on theirs, where there is any pair at all
    labels = batch.labels
    if (labels[:, None] == labels[None, :]).sum() > len(labels):
        assert mixed("pos-pos", alpha=1.0) != mixed("pos-pos", alpha=9.0)


# --- membership of the pair sets -------------------------------------------------------------


def spec_mixing_set(labels, a, pair_set):
    """M(a) as SPEC 1.3 lists it (P(a) + {a} for the positives)."""
    b = len(labels)
    pos = [i for i in range(b) if labels[i] == labels[a]]
    neg = [i for i in range(b) if labels[i] != labels[a]]
    if pair_set == "pos-neg":
        return {(p, n) for p in pos for n in neg}
    if pair_set == "anc-neg":
        return {(a, n) for n in neg}
    if pair_set == "pos-pos":
        return {(p, q) for p in pos for q in pos if p < q}
    return {(n, m) for n in neg for m in neg if n < m}


@pytest.mark.parametrize("pair_set", PAIR_SETS)
@given(batch=batches())
def test_batch_pairs_and_rule_give_each_anchor_its_mixing_set(pair_set, batch):
    labels = batch.labels
    i, j = batch_pairs(labels, pair_set)
    index = torch.arange(len(labels))
    member = rule_member(pair_set, labels, index, labels[i], labels[j], i)
    for a in range(len(labels)):
        got = {(int(i[m]), int(j[m])) for m in range(len(i)) if member[a, m]}
        assert got == spec_mixing_set(labels.tolist(), a, pair_set)


def test_label_modes():
    anchors, li, lj = torch.tensor([0, 1, 2]), torch.tensor([0, 1]), torch.tensor([1, 2])
    interp = soft_labels(anchors, li, lj, 0.3, "interpolate", torch.float64)
    assert interp.tolist() == [[0.3, 0.0], [pytest.approx(0.7), 0.3], [0.0, pytest.approx(0.7)]]
    assert torch.all(soft_labels(anchors, li, lj, 0.3, "negative", torch.float64) == 0)
    # dominant: the label of the example with the larger share, not interpolated
    assert soft_labels(anchors, li, lj, 0.3, "dominant", torch.float64).tolist() == [[0, 0], [1, 0], [0, 1]]
    assert soft_labels(anchors, li, lj, 0.7, "dominant", torch.float64).tolist() == [[1, 0], [0, 1], [0, 0]]


# --- permutation invariance ------------------------------------------------------------------


# pos-neg and anc-neg mix ordered pairs, so any permutation maps the mixed set onto itself. pos-pos
# and neg-neg mix unordered pairs {i < j} with lam on i (issue 2): a permutation changes which
# member of a pair takes lam, so E is invariant there only for lam = 1/2, and reversing the batch
# turns lam into 1 - lam. lam stays off 0 and 1: there a mix of the anchor is the anchor itself
# (d = 0), the kink of contrastive's default pos_margin = 0, where round-off decides whether the
# pair counts in the non-zero-pair divisor.
LAMS = st.floats(0.01, 0.99)


@pytest.mark.parametrize("mixup", MIXUPS)
@pytest.mark.parametrize("name", LOSSES)
@settings(max_examples=8)
@given(data=st.data())
def test_permuting_the_batch_leaves_e_unchanged(name, mixup, data):
    batch = data.draw(batches(with_proxies=FAMILY[name].uses_proxies))
    pair_set = data.draw(st.sampled_from(PAIR_SETS))
    lam = data.draw(LAMS) if pair_set in ("pos-neg", "anc-neg") else 0.5
    perm = torch.tensor(data.draw(st.permutations(range(len(batch.labels)))), dtype=torch.long)
    args = (name, mixup)
    before, _ = total_loss(*args, batch.embeddings, batch.labels, batch.proxies, pair_set, lam)
    after, _ = total_loss(*args, batch.embeddings[perm], batch.labels[perm], batch.proxies, pair_set, lam)
    assert after.item() == pytest.approx(before.item(), rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("mixup", MIXUPS)
@pytest.mark.parametrize("name", LOSSES)
@settings(max_examples=5)
@given(data=st.data())
def test_reversing_the_batch_swaps_lam_on_unordered_pairs(name, mixup, data):
    batch = data.draw(batches(with_proxies=FAMILY[name].uses_proxies))
    pair_set = data.draw(st.sampled_from(["pos-pos", "neg-neg"]))
    lam = data.draw(LAMS)
    rev = torch.arange(len(batch.labels) - 1, -1, -1)
    args = (name, mixup)
    before, _ = total_loss(*args, batch.embeddings, batch.labels, batch.proxies, pair_set, lam)
    after, _ = total_loss(*args, batch.embeddings[rev], batch.labels[rev], batch.proxies, pair_set, 1.0 - lam)
    assert after.item() == pytest.approx(before.item(), rel=1e-10, abs=1e-12)


# --- gradients -------------------------------------------------------------------------------

GRAD_LABELS = torch.tensor([0, 0, 1, 1, 2])  # 4 proxies: class 3 has no example


@pytest.mark.parametrize("pair_set", PAIR_SETS)
@pytest.mark.parametrize("name", LOSSES)
def test_gradcheck_embedding_mixup(name, pair_set):
    gen = torch.Generator().manual_seed(3)
    emb = torch.randn(5, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    leaves = [emb]
    if FAMILY[name].uses_proxies:
        leaves.append(torch.randn(4, 3, generator=gen, dtype=torch.float64, requires_grad=True))

    def e(emb, proxies=None):
        return metrix_loss(
            emb, GRAD_LABELS, loss=name, mixup="embedding", pairs=pair_set, lam=0.3, weight=1.0,
            proxies=proxies, backend="reference",
        )

    assert torch.autograd.gradcheck(e, leaves)


@pytest.mark.parametrize("name", LOSSES)
def test_gradcheck_feature_mixup(name):
    """Through the average + max pooling of the mixed maps (random maps: no tie in the max)."""
    gen = torch.Generator().manual_seed(4)
    features = torch.randn(5, 3, 2, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    head = linear(3, 3, gen)
    proxies = torch.randn(4, 3, generator=gen, dtype=torch.float64) if FAMILY[name].uses_proxies else None

    def e(features):
        return metrix_loss(
            head(reference.pool(features)), GRAD_LABELS, loss=name, mixup="feature", pairs="pos-neg",
            lam=0.6, weight=1.0, proxies=proxies, features=features, head=head, backend="reference",
        )

    assert torch.autograd.gradcheck(e, [features])


DEGENERATE = {
    "one example": [0],
    "one class": [1, 1, 1],
    "all distinct": [0, 1, 2, 3],
    "anchor without positives": [0, 0, 1, 1, 2],
}


@pytest.mark.parametrize(
    "mixup, pair_set", [(None, None)] + [(m, p) for m in MIXUPS for p in (*PAIR_SETS, DEFAULT_PAIRS)]
)
@pytest.mark.parametrize("name", LOSSES)
def test_degenerate_batches_are_finite(name, mixup, pair_set):
    gen = torch.Generator().manual_seed(5)
    proxies = torch.randn(5, 3, generator=gen, dtype=torch.float64) if FAMILY[name].uses_proxies else None
    for case, labels in DEGENERATE.items():
        emb = torch.randn(len(labels), 3, generator=gen, dtype=torch.float64)
        for lam in (0.0, 0.5, 1.0):
            value, leaves = total_loss(
                name, mixup, emb, torch.tensor(labels), proxies, pair_set or DEFAULT_PAIRS, lam,
                generator=torch.Generator().manual_seed(0),
            )
            grads = torch.autograd.grad(value, leaves, allow_unused=True, materialize_grads=True)
            assert torch.isfinite(value), (case, lam)
            assert all(torch.isfinite(g).all() for g in grads), (case, lam)


@pytest.mark.parametrize("label_mode", ["negative", "dominant"])
@pytest.mark.parametrize("name", LOSSES)
def test_degenerate_batches_are_finite_in_the_table_3_label_modes(name, label_mode):
    gen = torch.Generator().manual_seed(5)
    proxies = torch.randn(5, 3, generator=gen, dtype=torch.float64) if FAMILY[name].uses_proxies else None
    for case, labels in DEGENERATE.items():
        emb = torch.randn(len(labels), 3, generator=gen, dtype=torch.float64)
        for pair_set in PAIR_SETS:
            value, leaves = total_loss(
                name, "embedding", emb, torch.tensor(labels), proxies, pair_set, 0.3, label_mode=label_mode
            )
            grads = torch.autograd.grad(value, leaves)
            assert torch.isfinite(value) and all(torch.isfinite(g).all() for g in grads), (case, pair_set)


def test_error_function_is_clean_plus_weighted_mixed():
    gen = torch.Generator().manual_seed(6)
    emb = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    row, terms, _ = resolve("multi_similarity", {})
    plan = MixPlan(*batch_pairs(labels, "anc-neg"), 0.4, "anc-neg", "interpolate")
    clean = reference.clean_loss(row, terms, emb, labels, None)
    mixed = reference.mixed_loss(row, terms, emb, labels, None, plan)
    value = metrix_loss(emb, labels, pairs="anc-neg", lam=0.4, weight=0.3, backend="reference")
    assert value.item() == pytest.approx((clean + 0.3 * mixed).item(), rel=1e-12)
    assert mixed.item() > 0


# --- lam and pair-set sampling ---------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.5, 2.0])
def test_sample_lam_follows_beta(alpha):
    draws = [sample_lam(alpha, torch.Generator().manual_seed(7)) for _ in range(2)]
    assert draws[0] == draws[1]  # reproducible from the seed
    gen = torch.Generator().manual_seed(8)
    lams = torch.tensor([sample_lam(alpha, gen) for _ in range(4000)], dtype=torch.float64)
    assert lams.min() >= 0 and lams.max() <= 1
    assert lams.mean().item() == pytest.approx(0.5, abs=0.03)
    assert lams.var().item() == pytest.approx(1 / (4 * (2 * alpha + 1)), rel=0.15)  # Beta(a, a)
    if alpha == 2.0:  # CDF of Beta(2, 2): 3x^2 - 2x^3, so P(lam < 1/4) = 5/32
        assert (lams < 0.25).double().mean().item() == pytest.approx(5 / 32, abs=0.03)


def test_metrix_loss_draws_lam_from_its_generator():
    emb = torch.randn(6, 4, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    values = [metrix_loss(emb, labels, generator=torch.Generator().manual_seed(s)).item() for s in (1, 1, 2)]
    assert values[0] == values[1] != values[2]


def test_choose_pair_set_draws_both_halves_of_the_default():
    gen = torch.Generator().manual_seed(10)
    picks = [choose_pair_set(DEFAULT_PAIRS, gen) for _ in range(200)]
    assert set(picks) == {"pos-neg", "anc-neg"}
    assert 60 < picks.count("pos-neg") < 140
    again = torch.Generator().manual_seed(10)
    assert [choose_pair_set(DEFAULT_PAIRS, again) for _ in range(200)] == picks
    for pair_set in PAIR_SETS:
        assert choose_pair_set(pair_set, gen) == pair_set


# --- input mixup's hard negatives ------------------------------------------------------------


@pytest.mark.parametrize("pair_set", PAIR_SETS)
@given(batch=batches(), k=st.integers(1, 4))
def test_hard_negative_plan_matches_brute_force(pair_set, batch, k):
    emb, labels = batch.embeddings, batch.labels.tolist()
    b = len(labels)
    plan = hard_negative_plan(emb, batch.labels, pair_set, 0.5, "interpolate", k)
    member = plan.member
    if member is None:  # pos-pos needs no negatives: the rule decides
        member = rule_member(pair_set, batch.labels, torch.arange(b), batch.labels[plan.i], batch.labels[plan.j], plan.i)
    got = {(a, int(plan.i[m]), int(plan.j[m])) for a in range(b) for m in range(len(plan.i)) if member[a, m]}
    assert bool(member.any(dim=0).all())  # every listed pair is mixed by some anchor, and listed once
    assert len(set(zip(plan.i.tolist(), plan.j.tolist()))) == len(plan.i)

    e = torch.nn.functional.normalize(emb, dim=1)
    expected = set()
    for a in range(b):
        negatives = sorted((n for n in range(b) if labels[n] != labels[a]), key=lambda n: -float(e[a] @ e[n]))
        hard = negatives[:k]
        positives = [p for p in range(b) if labels[p] == labels[a]]  # a itself included
        if pair_set == "pos-neg":
            expected |= {(a, p, n) for p in positives for n in hard}
        elif pair_set == "anc-neg":
            expected |= {(a, a, n) for n in hard}
        elif pair_set == "neg-neg":
            expected |= {(a, n, m) for n in hard for m in hard if n < m}
        else:
            expected |= {(a, p, q) for p in positives for q in positives if p < q}
    assert got == expected
