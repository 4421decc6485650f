import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from metrix_kernels import metrics


def _unit(n, d, seed=0):
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


def test_recall_at_k_excludes_the_query_itself():
    # two tight clusters; each point's nearest other point is in its cluster
    e = torch.tensor([[1.0, 0.0], [0.99, 0.1], [0.0, 1.0], [0.1, 0.99]])
    labels = torch.tensor([0, 0, 1, 1])
    assert metrics.recall_at_k(e, labels, ks=(1,)) == {1: 100.0}
    swapped = torch.tensor([0, 1, 0, 1])
    assert metrics.recall_at_k(e, swapped, ks=(1, 2))[1] == 0.0


def test_recall_matches_brute_force_and_torch_fallback(monkeypatch):
    e, labels = _unit(60, 8), torch.randint(0, 5, (60,), generator=torch.Generator().manual_seed(1))
    sim = e @ e.T
    sim.fill_diagonal_(-math.inf)
    order = sim.argsort(dim=1, descending=True)
    expected = {k: 100.0 * (labels[order[:, :k]] == labels[:, None]).any(1).float().mean().item() for k in (1, 2, 4)}
    got = metrics.recall_at_k(e, labels, ks=(1, 2, 4))
    monkeypatch.setattr(metrics, "faiss", None)
    fallback = metrics.recall_at_k(e, labels, ks=(1, 2, 4))
    for k in expected:
        assert got[k] == pytest.approx(expected[k]) and fallback[k] == pytest.approx(expected[k])


def test_recall_with_gallery_searches_the_gallery_only():
    query = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    gallery = torch.tensor([[0.0, 1.0], [1.0, 0.1]])
    assert metrics.recall_at_k(query, torch.tensor([0, 1]), (1,), gallery, torch.tensor([1, 0])) == {1: 100.0}
    assert metrics.recall_at_k(query, torch.tensor([0, 1]), (1,), gallery, torch.tensor([0, 1])) == {1: 0.0}


def test_alignment_uniformity_utilization_match_definitions():
    e, labels = _unit(40, 6, 2), torch.arange(40) % 4
    d2 = torch.cdist(e, e) ** 2
    off = ~torch.eye(40, dtype=torch.bool)
    pos = (labels[:, None] == labels[None, :]) & off
    assert metrics.alignment(e, labels) == pytest.approx(d2[pos].mean().item(), rel=1e-4)
    assert metrics.uniformity(e) == pytest.approx(torch.log(torch.exp(-2 * d2[off]).mean()).item(), rel=1e-4)
    train = _unit(30, 6, 3)
    nearest = torch.cdist(e, train).min(dim=1).values.mean().item()
    assert metrics.utilization(e, train) == pytest.approx(nearest, rel=1e-4)
    # adding points can only bring the nearest training embedding closer
    assert metrics.utilization(e, torch.cat([train, _unit(30, 6, 4)])) <= metrics.utilization(e, train) + 1e-6


def test_positivity_threshold_closed_forms():
    lam = np.array([0.2, 0.5, 0.8])
    logit = np.log(lam / (1 - lam))
    ms = metrics.positivity_threshold("multi_similarity", lam, alpha=2.0, beta=50.0, base=0.5)
    assert np.allclose(ms, 0.5 + logit / 52.0)
    pa = metrics.positivity_threshold("proxy_anchor", lam, alpha=32.0, margin=0.1)
    assert np.allclose(pa, logit / 64.0)
    assert metrics.positivity_threshold("contrastive", lam) is None


@pytest.mark.parametrize("loss", ["multi_similarity", "proxy_anchor"])
@pytest.mark.parametrize("lam", [0.1, 0.4, 0.5, 0.7, 0.95])
def test_positivity_is_exact_for_one_mixed_embedding(loss, lam):
    """With one anchor and one pos-neg mixed embedding, eq. 25's condition is exact."""
    anchor = torch.tensor([[1.0, 0.0]])
    proxies = torch.tensor([[1.0, 0.0]]) if loss == "proxy_anchor" else None  # one proxy: PA's reduction weighs both terms alike
    for s in np.linspace(-0.9, 0.95, 25):
        mixed = torch.tensor([[s, math.sqrt(1 - s * s)]], dtype=torch.float32)
        out = metrics.positivity(loss, anchor, torch.tensor([0]), mixed, torch.tensor([0]), torch.tensor([1]), lam, proxies)
        assert out["pairs"] == 1
        assert out["empirical"] == out["cdf"], (s, out)
