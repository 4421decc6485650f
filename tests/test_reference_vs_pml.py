"""The clean losses of the reference against pytorch-metric-learning (PML) or a closed form.

Value and gradients (embeddings, and proxies for proxy losses) in float64, tolerance 1e-6, on
hypothesis-drawn batches that include one-example classes, one class only and B = 1.

Divergences from PML, each tested explicitly below:
- proxy_nca follows the Metrix paper's Table 1 (tau = identity): -log(P / N), the positive proxy
  NOT in the denominator. PML's ProxyNCALoss is -log(P / (P + N)), our proxy_nca_pp; proxy_nca is
  checked against the closed form instead.
- nca on a batch where no anchor has a positive: PML averages an empty set and returns NaN; ours
  returns 0 (with zero gradients), as it does for B = 1 where PML also returns 0.
- binomial_deviance is not in PML: checked against Yi et al.'s closed form.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from pytorch_metric_learning import losses as pml

from conftest import Batch, batches, loss_params
from metrix_kernels import metrix_loss

TOL = dict(rtol=1e-6, atol=1e-6)


def ours(name, batch, params):
    """Our clean loss and its gradients (embeddings, proxies if any)."""
    emb = batch.embeddings.clone().requires_grad_()
    inputs = [emb]
    proxies = None
    if batch.proxies is not None:
        proxies = batch.proxies.clone().requires_grad_()
        inputs.append(proxies)
    value = metrix_loss(emb, batch.labels, loss=name, mixup=None, backend="reference", proxies=proxies, **params)
    return value, torch.autograd.grad(value, inputs)


def theirs(loss_fn, batch):
    """PML's loss and its gradients; proxies are copied into PML's own parameter."""
    emb = batch.embeddings.clone().requires_grad_()
    inputs = [emb]
    if batch.proxies is not None:
        loss_fn = loss_fn.double()
        loss_fn.proxies.data = batch.proxies.clone()
        inputs.append(loss_fn.proxies)
    value = loss_fn(emb, batch.labels)
    return value, torch.autograd.grad(value, inputs, allow_unused=True)


def assert_same(a, b, tol=TOL):
    (value_a, grads_a), (value_b, grads_b) = a, b
    torch.testing.assert_close(value_a, value_b, **tol)
    for ga, gb in zip(grads_a, grads_b):
        torch.testing.assert_close(ga, torch.zeros_like(ga) if gb is None else gb, **tol)


def pml_loss(name, params, num_classes, dim):
    if name == "contrastive":
        return pml.ContrastiveLoss(**params)
    if name == "lifted_structure":
        return pml.GeneralizedLiftedStructureLoss(**params)
    if name == "multi_similarity":
        return pml.MultiSimilarityLoss(**params)
    if name == "nca":
        return pml.NCALoss(**params)
    if name == "proxy_anchor":
        return pml.ProxyAnchorLoss(num_classes, dim, **params)
    assert name == "proxy_nca_pp"
    return pml.ProxyNCALoss(num_classes, dim, softmax_scale=1.0 / params["temperature"])


def has_any_positive(labels):
    return bool((labels[:, None] == labels[None, :]).sum() > labels.shape[0])


@pytest.mark.parametrize(
    "name", ["contrastive", "lifted_structure", "multi_similarity", "nca", "proxy_anchor", "proxy_nca_pp"]
)
@given(data=st.data())
def test_clean_loss_matches_pml(name, data):
    batch = data.draw(batches(with_proxies=name.startswith("proxy")))
    params = data.draw(loss_params(name))
    # the documented divergence, tested in test_nca_without_positives_is_zero
    assume(name != "nca" or has_any_positive(batch.labels) or len(batch.labels) == 1)
    loss_fn = pml_loss(name, params, batch.num_classes, batch.embeddings.shape[1])
    assert_same(ours(name, batch, params), theirs(loss_fn, batch))


EDGE_LABELS = {
    "one example": [0],
    "one class": [1, 1, 1],
    "pairs and an anchor without positives": [0, 0, 1, 1, 2],
    "all distinct": [0, 1, 2, 3],
}


@pytest.mark.parametrize("labels", EDGE_LABELS.values(), ids=EDGE_LABELS.keys())
@pytest.mark.parametrize(
    "name", ["contrastive", "lifted_structure", "multi_similarity", "nca", "proxy_anchor", "proxy_nca_pp"]
)
def test_edge_conventions_match_pml(name, labels):
    """Empty positive or negative sets, proxies without examples, B = 1: PML's value and gradients."""
    if name == "nca" and labels == EDGE_LABELS["all distinct"]:
        pytest.skip("PML gives NaN here: see test_nca_without_positives_is_zero")
    gen = torch.Generator().manual_seed(2)
    emb = torch.randn(len(labels), 3, generator=gen, dtype=torch.float64)
    batch = Batch(emb, torch.tensor(labels), torch.randn(5, 3, generator=gen, dtype=torch.float64), 5)
    if not name.startswith("proxy"):
        batch = batch._replace(proxies=None)
    params = {"temperature": 0.25} if name == "proxy_nca_pp" else {}
    assert_same(ours(name, batch, params), theirs(pml_loss(name, params, 5, 3), batch))


@given(batch=batches(min_size=2))
def test_nca_without_positives_is_zero(batch):
    """PML's NCALoss is NaN when no anchor has a positive (mean of nothing); ours is 0, finite gradient."""
    labels = torch.arange(batch.embeddings.shape[0])
    batch = batch._replace(labels=labels)
    value, (grad,) = ours("nca", batch, {"softmax_scale": 1.0})
    assert value.item() == 0.0
    assert torch.all(grad == 0)
    assert math.isnan(pml.NCALoss()(batch.embeddings, labels).item())


def proxy_nca_closed_form(emb, labels, proxies, scale):
    """Movshovitz-Attias et al. as in Metrix Table 1: mean_a -log(P_a / N_a), squared sphere distance."""
    e = torch.nn.functional.normalize(emb, dim=1)
    p = torch.nn.functional.normalize(proxies, dim=1)
    logits = -scale * torch.cdist(e, p) ** 2  # [B, C]
    pos = logits.gather(1, labels[:, None])[:, 0]
    others = logits.masked_fill(torch.nn.functional.one_hot(labels, p.shape[0]).bool(), -math.inf)
    return (torch.logsumexp(others, dim=1) - pos).mean()


@given(data=st.data())
def test_proxy_nca_matches_closed_form(data):
    batch = data.draw(batches(with_proxies=True))
    params = data.draw(loss_params("proxy_nca"))
    emb = batch.embeddings.clone().requires_grad_()
    proxies = batch.proxies.clone().requires_grad_()
    value = proxy_nca_closed_form(emb, batch.labels, proxies, params["softmax_scale"])
    expected = value, torch.autograd.grad(value, [emb, proxies])
    assert_same(ours("proxy_nca", batch, params), expected)


def test_pml_proxy_nca_is_our_proxy_nca_pp_not_proxy_nca():
    """The documented divergence: PML keeps the positive in the denominator, so its value is
    proxy_nca_pp's, and strictly above proxy_nca's -log(P / N) (P / N > P / (P + N))."""
    gen = torch.Generator().manual_seed(0)
    emb = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    proxies = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    labels = torch.tensor([0, 1, 1, 2, 3])
    loss_fn = pml.ProxyNCALoss(4, 3).double()
    loss_fn.proxies.data = proxies.clone()
    pml_value = loss_fn(emb, labels).item()
    pp = metrix_loss(emb, labels, loss="proxy_nca_pp", mixup=None, proxies=proxies, temperature=1.0,
                     backend="reference")
    plain = metrix_loss(emb, labels, loss="proxy_nca", mixup=None, proxies=proxies, softmax_scale=1.0,
                        backend="reference")
    assert pp.item() == pytest.approx(pml_value, rel=1e-12)
    assert plain.item() < pml_value - 1e-3


def binomial_deviance_closed_form(emb, labels, alpha, beta, base):
    """Yi et al. 2014: mean over anchors of mean_p softplus(-alpha (s - base)) + mean_n softplus(beta (s - base))."""
    e = torch.nn.functional.normalize(emb, dim=1)
    sim = e @ e.T
    per_anchor = []
    for a in range(len(labels)):
        pos = [b for b in range(len(labels)) if b != a and labels[b] == labels[a]]
        neg = [b for b in range(len(labels)) if labels[b] != labels[a]]
        loss = emb.new_zeros(())
        if pos:
            loss = loss + torch.logaddexp(-alpha * (sim[a, pos] - base), emb.new_zeros(())).mean()
        if neg:
            loss = loss + torch.logaddexp(beta * (sim[a, neg] - base), emb.new_zeros(())).mean()
        per_anchor.append(loss)
    return torch.stack(per_anchor).mean()


@given(data=st.data())
def test_binomial_deviance_matches_closed_form(data):
    batch = data.draw(batches())
    params = data.draw(loss_params("binomial_deviance"))
    emb = batch.embeddings.clone().requires_grad_()
    value = binomial_deviance_closed_form(emb, batch.labels, **params)
    # B = 1 has no pair at all: the closed form is a constant 0
    grad = torch.autograd.grad(value, [emb]) if value.requires_grad else (torch.zeros_like(emb),)
    expected = value, grad
    assert_same(ours("binomial_deviance", batch, params), expected)


@pytest.mark.parametrize(
    "name, params",
    [
        ("multi_similarity", {"alpha": 40.0, "beta": 80.0, "base": 0.1}),
        ("proxy_anchor", {"margin": 0.1, "alpha": 64.0}),
        ("proxy_nca_pp", {"temperature": 1.0 / 16}),
    ],
)
def test_large_scales_keep_float64_precision(name, params):
    """log(1 + exp(x)) for x > 20 must not be cut to x (torch's softplus threshold): exact in float64."""
    gen = torch.Generator().manual_seed(1)
    labels = torch.tensor([0, 0, 1, 1, 2, 3])
    embeddings = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    proxies = torch.randn(5, 3, generator=gen, dtype=torch.float64) if name != "multi_similarity" else None
    batch = Batch(embeddings, labels, proxies, 5)
    loss_fn = pml_loss(name, params, 5, 3)
    assert_same(ours(name, batch, params), theirs(loss_fn, batch), tol=dict(rtol=1e-12, atol=1e-12))
