"""The Gram embedding-mixup op against reference.term_stats on materialized mixed embeddings."""
from __future__ import annotations

from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from metrix_kernels import reference
from metrix_kernels.backends import LABEL_CODES, MEMBER_POS_NEG, MEMBER_RULES, KernelConfig
from metrix_kernels.backends.triton import gram as triton_gram
from metrix_kernels.ops import gram_mixed
from metrix_kernels.pairs import MixPlan, batch_pairs, rule_member, soft_labels

from .conftest import EXAMPLES
from .helpers import assume_no_cancelling_mix, batches, close, grads, leaves, loss, proxies_for

SIGMAS = ["contrastive", "lifted_structure", "binomial_deviance", "multi_similarity", "nca"]


@pytest.mark.parametrize("pair_set", sorted(MEMBER_RULES))
@pytest.mark.parametrize("proxy_anchors", [False, True])
@pytest.mark.parametrize("gram_widths", [0, 10**6], ids=["recomputed", "from-gram"])
@settings(max_examples=EXAMPLES)
@given(data=st.data())
def test_gram_matches_materialized_mixup(pair_set, proxy_anchors, gram_widths, data):
    """Similarity tiles recomputed in the kernels, and loaded from the Gram matrices written first
    (GRAM_WIDTHS: the batch sizes each path takes)."""
    with mock.patch.object(triton_gram, "GRAM_WIDTHS", gram_widths):
        _check_gram(pair_set, proxy_anchors, data)


def _check_gram(pair_set, proxy_anchors, data):
    _, terms = loss(data.draw(st.sampled_from(SIGMAS)))
    # d >= 3: in d = 1 antipodal pairs are common and their mix at lam = 0.5 has no direction
    emb, labels, gen = data.draw(batches(max_size=24, classes=(1, 4), dims=(3, 8, 17)))
    # grouped by class, as the ops layer hands over pos-neg / anc-neg: a sorted copy, or read through the order
    grouping = data.draw(st.sampled_from(["as drawn", "sorted copy", "through order"]))
    order = None
    if grouping != "as drawn":
        order = torch.argsort(labels, stable=True)
        labels = labels[order]  # by position
        if grouping == "sorted copy":
            emb, order = emb[order], None
    label_mode = data.draw(st.sampled_from(sorted(LABEL_CODES)))
    # lam at or near 0 or 1 puts a mix at or near an anchor, where float32's d = sqrt(2 - 2s) is off
    # by sqrt(its rounding of s), ~3e-4, and 1 / d amplifies it: the exact lam = 0 only for s and d2
    lams = [0.3, 0.5, data.draw(st.floats(0.0625, 0.9375, width=32))]
    lam = data.draw(st.sampled_from(lams if terms.sigma_pos.of == "d" else [0.0, *lams]))
    assume_no_cancelling_mix(emb if order is None else emb[order], *batch_pairs(labels, pair_set), lam)
    if proxy_anchors:
        raw_anchors = proxies_for(labels, emb.shape[1], gen)
        anchor_y = torch.arange(raw_anchors.shape[0], device=emb.device)
        anchor_idx = torch.full_like(anchor_y, -1)
        member = MEMBER_POS_NEG if pair_set == "anc-neg" else MEMBER_RULES[pair_set]
    else:
        raw_anchors, anchor_y = emb, labels
        anchor_idx = torch.arange(labels.shape[0], device=emb.device)
        member = MEMBER_RULES[pair_set]
    cfg = KernelConfig(terms.sigma_pos, terms.sigma_neg, member, LABEL_CODES[label_mode], False, True)
    # raw inputs (the op normalizes them); the batch's own anchors are the very tensor, as in the ops layer
    x, = leaves(emb)
    a = leaves(raw_anchors)[0] if proxy_anchors else x
    stats = gram_mixed(a, anchor_y, anchor_idx, x, labels, lam, cfg, "triton", order=order)

    x64, = leaves(x, dtype=torch.float64)
    a64 = leaves(a, dtype=torch.float64)[0] if proxy_anchors else x64
    by_position = x64 if order is None else x64[order]
    i, j = batch_pairs(labels, pair_set)
    plan = MixPlan(i, j, lam, pair_set, label_mode)
    mixed = reference.normalize(reference.mix_embeddings(by_position, plan))
    keep = rule_member(pair_set, anchor_y, None if proxy_anchors else anchor_idx, labels[i], labels[j], i)
    y = soft_labels(anchor_y, labels[i], labels[j], lam, label_mode, torch.float64)
    anchors64 = a64 if proxy_anchors else by_position
    expected = reference.term_stats(reference.normalize(anchors64) @ mixed.T, keep * y, keep * (1.0 - y), terms)
    for actual, want in zip(stats, expected):
        close(actual, want.to(torch.float64))
    u, v = torch.rand(2, raw_anchors.shape[0], generator=gen, dtype=torch.float64).to(emb.device)

    def combine(pos, neg):
        return (u * torch.where(torch.isfinite(pos), pos, 0.0)).sum() + (v * torch.where(torch.isfinite(neg), neg,
                                                                                         0.0)).sum()

    inputs, inputs64 = ([a, x], [a64, x64]) if proxy_anchors else ([x], [x64])
    for actual, want in zip(grads(combine(stats[0].double(), stats[1].double()), inputs),
                            grads(combine(expected.pos_sum, expected.neg_sum), inputs64)):
        close(actual, want, atol=1e-4)
