"""The loss family by hand: one small case per loss, checkable on paper, plus mixed cases.

Unless said otherwise the batch is three 2-D unit embeddings at 0, 60 and 90 degrees with labels
[0, 0, 1], so s01 = 1/2, s02 = 0, s12 = sqrt(3)/2 and, on the sphere, d01 = 1, d02 = sqrt(2),
d12 = sqrt(2 - sqrt(3)). Proxies (proxy losses) sit at 30, 90 and 180 degrees; class 2 has no
example. Expected values are written out as arithmetic.
"""
from __future__ import annotations

import inspect
import math
from math import exp, log, sqrt

import pytest
import torch
from pytorch_metric_learning import losses as pml

from metrix_kernels import FAMILY, metrix_loss, reference
from metrix_kernels.family import resolve, sphere_distance
from metrix_kernels.pairs import MixPlan, batch_pairs

R3 = sqrt(3.0)
COS15, COS45, COS75 = (math.cos(math.radians(a)) for a in (15, 45, 75))


def at_angles(*degrees):
    return torch.tensor([[math.cos(math.radians(a)), math.sin(math.radians(a))] for a in degrees], dtype=torch.float64)


EMB = at_angles(0, 60, 90)
LABELS = torch.tensor([0, 0, 1])
PROXIES = at_angles(30, 90, 180)


def clean(loss, **params):
    proxies = PROXIES if FAMILY[loss].uses_proxies else None
    return metrix_loss(EMB, LABELS, loss=loss, mixup=None, proxies=proxies, backend="reference", **params).item()


def sp(x):
    return log(1 + exp(x))


def test_contrastive_by_hand():
    # positives (0,1), (1,0): [d01 - 0]+ = 1 each, both non-zero; negatives: [1 - sqrt 2]+ = 0 twice,
    # [1 - d12]+ > 0 twice: each term averaged over its non-zero pairs (PML's AvgNonZeroReducer).
    expected = (1 + 1) / 2 + 2 * (1 - sqrt(2 - R3)) / 2
    assert clean("contrastive") == pytest.approx(expected, rel=1e-12)


def test_lifted_structure_by_hand():
    d12 = sqrt(2 - R3)
    a0 = 1 + (1 - sqrt(2))  # log exp(d01) + log exp(1 - d02)
    a1 = 1 + (1 - d12)
    a2 = log(exp(1 - sqrt(2)) + exp(1 - d12))  # no positive: that term is 0 (PML's convention)
    assert clean("lifted_structure") == pytest.approx((a0 + a1 + a2) / 3, rel=1e-12)


def test_binomial_deviance_by_hand():
    # alpha 2, beta 50, base 1/2; each term averaged over its pairs
    a0 = sp(-2 * (0.5 - 0.5)) + sp(50 * (0 - 0.5))
    a1 = sp(-2 * (0.5 - 0.5)) + sp(50 * (R3 / 2 - 0.5))
    a2 = (sp(50 * (0 - 0.5)) + sp(50 * (R3 / 2 - 0.5))) / 2
    assert clean("binomial_deviance") == pytest.approx((a0 + a1 + a2) / 3, rel=1e-12)


def test_multi_similarity_by_hand():
    a0 = 0.5 * log(1 + exp(-2 * (0.5 - 0.5))) + log(1 + exp(50 * (0 - 0.5))) / 50
    a1 = 0.5 * log(1 + exp(-2 * (0.5 - 0.5))) + log(1 + exp(50 * (R3 / 2 - 0.5))) / 50
    a2 = log(1 + exp(50 * (0 - 0.5)) + exp(50 * (R3 / 2 - 0.5))) / 50
    assert clean("multi_similarity") == pytest.approx((a0 + a1 + a2) / 3, rel=1e-12)


def test_proxy_anchor_by_hand():
    # proxy-example cosines: p0: sqrt3/2, sqrt3/2, 1/2; p1: 0, sqrt3/2, 1; p2: -1, -1/2, 0
    alpha, delta = 4.0, 0.1
    pos = log(1 + 2 * exp(-alpha * (R3 / 2 - delta))) + log(1 + exp(-alpha * (1 - delta)))
    neg = (
        log(1 + exp(alpha * (0.5 + delta)))
        + log(1 + exp(alpha * (0 + delta)) + exp(alpha * (R3 / 2 + delta)))
        + log(1 + exp(alpha * (-1 + delta)) + exp(alpha * (-0.5 + delta)) + exp(alpha * (0 + delta)))
    )
    # positive terms over the 2 proxies with an example, negative terms over all 3
    assert clean("proxy_anchor", margin=delta, alpha=alpha) == pytest.approx(pos / 2 + neg / 3, rel=1e-12)


def test_nca_by_hand():
    # squared distances d2 = 2 - 2s: 1 (0,1), 2 (0,2), 2 - sqrt3 (1,2); anchor 2 has no positive
    a0 = -log(exp(-1) / (exp(-1) + exp(-2)))
    a1 = -log(exp(-1) / (exp(-1) + exp(-(2 - R3))))
    assert clean("nca") == pytest.approx((a0 + a1) / 2, rel=1e-12)


def test_proxy_nca_by_hand():
    # d2 to proxies: e0: 2 - sqrt3, 2, 4; e1: 2 - sqrt3, 2 - sqrt3, 3; e2: 1, 0, 2. -log(P / N)
    a0 = -log(exp(-(2 - R3)) / (exp(-2) + exp(-4)))
    a1 = -log(exp(-(2 - R3)) / (exp(-(2 - R3)) + exp(-3)))
    a2 = -log(exp(0) / (exp(-1) + exp(-2)))
    assert clean("proxy_nca") == pytest.approx((a0 + a1 + a2) / 3, rel=1e-12)


def test_proxy_nca_pp_by_hand():
    # temperature 1/2: logits -2 d2; -log(P / (P + N))
    a0 = -log(exp(-2 * (2 - R3)) / (exp(-2 * (2 - R3)) + exp(-4) + exp(-8)))
    a1 = -log(exp(-2 * (2 - R3)) / (2 * exp(-2 * (2 - R3)) + exp(-6)))
    a2 = -log(1 / (1 + exp(-2) + exp(-4)))
    assert clean("proxy_nca_pp", temperature=0.5) == pytest.approx((a0 + a1 + a2) / 3, rel=1e-12)


def test_multi_similarity_pos_neg_mixed_by_hand():
    """lam = 1/2, pos-neg: mixes (0,2), (1,2) for anchors 0 and 1 and (2,0), (2,1) for anchor 2.

    e0 + e2 points at 45 degrees, e1 + e2 at 75 degrees; every label is 1/2.
    """
    alpha, beta, base, w = 2.0, 10.0, 0.5, 0.4

    def ms(pos, neg):  # (similarity, weight) lists
        p = log(1 + sum(y * exp(-alpha * (s - base)) for s, y in pos)) / alpha
        n = log(1 + sum(y * exp(beta * (s - base)) for s, y in neg)) / beta
        return p + n

    mixed = (
        ms([(COS45, 0.5), (COS75, 0.5)], [(COS45, 0.5), (COS75, 0.5)])  # anchor 0 at 0 degrees
        + ms([(COS15, 0.5), (COS15, 0.5)], [(COS15, 0.5), (COS15, 0.5)])  # anchor 1 at 60
        + ms([(COS45, 0.5), (COS15, 0.5)], [(COS45, 0.5), (COS15, 0.5)])  # anchor 2 at 90
    ) / 3
    clean_ = (ms([(0.5, 1)], [(0, 1)]) + ms([(0.5, 1)], [(R3 / 2, 1)]) + ms([], [(0, 1), (R3 / 2, 1)])) / 3
    params = dict(alpha=alpha, beta=beta, base=base)
    row, terms, _ = resolve("multi_similarity", params)
    i, j = batch_pairs(LABELS, "pos-neg")
    plan = MixPlan(i, j, 0.5, "pos-neg", "interpolate")
    assert reference.mixed_loss(row, terms, EMB, LABELS, None, plan).item() == pytest.approx(mixed, rel=1e-12)
    total = metrix_loss(EMB, LABELS, loss="multi_similarity", pairs="pos-neg", lam=0.5, weight=w,
                        backend="reference", **params)
    assert total.item() == pytest.approx(clean_ + w * mixed, rel=1e-12)


def test_proxy_nca_pp_mixed_by_hand():
    """Two examples at 0 and 90 degrees (classes 0, 1), proxies on them, lam = 3/4, pos-neg.

    The mixes (0,1) and (1,0) point along (3, 1) and (1, 3): cosines 3/sqrt10 and 1/sqrt10 to
    the two proxies, which get labels 3/4 and 1/4. Both mixes give the same loss, log(1 + N / P).
    """
    emb, labels, proxies = at_angles(0, 90), torch.tensor([0, 1]), at_angles(0, 90)
    near, far = exp(-(2 - 6 / sqrt(10))), exp(-(2 - 2 / sqrt(10)))
    p, n = 0.75 * near + 0.25 * far, 0.25 * near + 0.75 * far
    row, terms, _ = resolve("proxy_nca_pp", {"temperature": 1.0})
    plan = MixPlan(*batch_pairs(labels, "pos-neg"), 0.75, "pos-neg", "interpolate")
    value = reference.mixed_loss(row, terms, emb, labels, proxies, plan)
    assert value.item() == pytest.approx(log(1 + n / p), rel=1e-12)


PML_DEFAULTS = {
    "contrastive": pml.ContrastiveLoss,
    "lifted_structure": pml.GeneralizedLiftedStructureLoss,
    "multi_similarity": pml.MultiSimilarityLoss,
    "proxy_anchor": pml.ProxyAnchorLoss,
    "nca": pml.NCALoss,
    "proxy_nca": pml.NCALoss,  # ProxyNCALoss takes softmax_scale through NCALoss
}


@pytest.mark.parametrize("name", sorted(PML_DEFAULTS))
def test_defaults_use_pml_names_and_values(name):
    signature = inspect.signature(PML_DEFAULTS[name].__init__).parameters
    for key, value in FAMILY[name].defaults.items():
        assert signature[key].default == value, key


def test_proxy_nca_pp_default_is_the_published_temperature():
    assert FAMILY["proxy_nca_pp"].defaults == {"temperature": pytest.approx(1 / 9)}


def test_sphere_distance_has_a_zero_gradient_at_zero():
    s = torch.tensor([1.0, 1.0 + 1e-12, 0.5, -1.0], dtype=torch.float64, requires_grad=True)
    d = sphere_distance(s)
    d.sum().backward()
    assert d.tolist() == pytest.approx([0, 0, 1, 2])
    assert s.grad[:2].tolist() == [0.0, 0.0]
    assert s.grad[2].item() == pytest.approx(-1.0)  # d(d)/ds = -1 / d at d = 1
