"""What users meet at the edges of the fused paths, on every backend: a head or model that returns the
wrong shape, a double backward, an autocast region, non-finite embeddings."""
from __future__ import annotations

import pytest
import torch

from metrix_kernels import FAMILY, metrix_loss

from .conftest import DEVICE
from .helpers import close, skip_unless_usable

BACKENDS = ["reference", "cpu", "triton"]


def batch(dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    return torch.randn(8, 4, generator=gen, dtype=dtype).to(DEVICE), (torch.arange(8) % 2).to(DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mixup, bad", [
    ("feature", lambda pooled: pooled[:, :2] @ torch.ones(2, 2, device=pooled.device)),  # too narrow
    ("feature", lambda pooled: torch.ones(pooled.shape[0], 5, device=pooled.device)),  # too wide
    ("feature", lambda pooled: torch.ones(3, 4, device=pooled.device)),  # too few rows
    ("input", lambda x: x[:2]),  # too few rows
])
def test_mixed_embeddings_of_the_wrong_shape_are_refused(backend, mixup, bad):
    """The fused kernels index what head / model return by the pairs: a wrong shape must be an error
    that says what was expected, not a read past the end of a buffer."""
    skip_unless_usable(backend)
    emb, labels = batch()
    extra = {"features": torch.randn(8, 3, 2, 2, device=DEVICE), "head": bad} if mixup == "feature" else \
        {"inputs": emb.clone(), "model": bad}
    maker = "head" if mixup == "feature" else "model"
    with pytest.raises(ValueError, match=rf"{maker} must return the embeddings of the \d+ mixed examples, \[\d+, 4\]"):
        metrix_loss(emb, labels, mixup=mixup, pairs="pos-neg", lam=0.5, backend=backend, **extra)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mixup", [None, "embedding"])
def test_double_backward_is_refused_by_fused_backends(backend, mixup):
    """A gradient penalty needs the gradient's own graph: the reference has it, the fused backends
    say they have not (before, the cpu backend's gradient came back as a constant and the penalty
    silently added nothing)."""
    skip_unless_usable(backend)
    emb, labels = batch(torch.float64 if backend != "triton" else torch.float32)
    x = emb.requires_grad_(True)
    value = metrix_loss(x, labels, mixup=mixup, pairs="pos-neg", lam=0.3, backend=backend)
    if backend == "reference":
        (grad,) = torch.autograd.grad(value, x, create_graph=True)
        (penalty_grad,) = torch.autograd.grad(grad.square().sum(), x)
        assert penalty_grad.abs().sum() > 0
        return
    with pytest.raises(RuntimeError, match="first-order gradients only.*backend='reference'"):
        torch.autograd.grad(value, x, create_graph=True)
    (grad,) = torch.autograd.grad(metrix_loss(x, labels, mixup=mixup, pairs="pos-neg", lam=0.3, backend=backend), x)
    assert torch.isfinite(grad).all()  # a plain backward still works


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("mixup", [None, "embedding"])
def test_autocast_leaves_the_fused_numbers_alone(backend, mixup):
    """Under a caller's autocast region the fused kernels compute in the embeddings' dtype as without
    it (the cpu extension refused autocast's half products before)."""
    skip_unless_usable(backend)
    emb, labels = batch()
    cast = torch.bfloat16 if DEVICE == "cpu" else torch.float16
    values, grads = [], []
    for autocast in (False, True):
        x = emb.clone().requires_grad_(True)
        with torch.autocast(DEVICE, dtype=cast, enabled=autocast):
            value = metrix_loss(x, labels, mixup=mixup, pairs="pos-neg", lam=0.3, backend=backend)
            value.backward()  # inside the region too, as some loops do
        values.append(value)
        grads.append(x.grad)
    assert values[1].dtype == torch.float32
    close(values[1], values[0])
    close(grads[1], grads[0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss, where", [(name, "embeddings") for name in sorted(FAMILY)]
                         + [(name, "proxies") for name in sorted(FAMILY) if FAMILY[name].uses_proxies])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the Triton interpreter's numpy
def test_non_finite_inputs_give_nan(backend, loss, where, bad):
    """A NaN or an infinity in the embeddings (or proxies) gives a NaN loss, as PML does: the kernels'
    running maxima and hinges pass over NaN similarities, and a diverged run logged 0 before."""
    skip_unless_usable(backend)
    row = FAMILY[loss]
    emb, labels = batch()
    proxies = torch.randn(3, 4, device=DEVICE) if row.uses_proxies else None
    (emb if where == "embeddings" else proxies)[1, 2] = bad
    for mixup in (None, "embedding"):
        value = metrix_loss(emb, labels, loss=loss, proxies=proxies, mixup=mixup, pairs="pos-neg", lam=0.3,
                            backend=backend)
        assert torch.isnan(value), (mixup, value)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("loss", sorted(FAMILY))
@pytest.mark.parametrize("pairs", ["pos-neg", "anc-neg", "neg-neg"])
@pytest.mark.parametrize("mixup", ["embedding", "feature"])
def test_mixing_the_hardest_negatives_matches_the_reference(backend, loss, pairs, mixup):
    """mix_hardest (MoCHi's selection): embedding and feature mixup over each anchor's two hardest
    negatives, on the fused backends as in the reference, loss and gradients."""
    skip_unless_usable(backend)
    gen = torch.Generator().manual_seed(1)
    emb = torch.randn(12, 5, generator=gen).to(DEVICE)
    labels = (torch.arange(12) % 4).to(DEVICE)
    proxies = torch.randn(4, 5, generator=gen).to(DEVICE) if FAMILY[loss].uses_proxies else None
    features = torch.randn(12, 3, 2, 2, generator=gen).to(DEVICE)
    head = torch.randn(5, 3, generator=gen).to(DEVICE)
    values, grads = [], []
    for name in ("reference", backend):
        x, f, p = (None if t is None else t.clone().requires_grad_(True)
                   for t in (emb, features if mixup == "feature" else None, proxies))
        extra = {"features": f, "head": lambda pooled: pooled @ head.T} if mixup == "feature" else {}
        value = metrix_loss(x, labels, loss=loss, proxies=p, mixup=mixup, pairs=pairs, lam=0.3, hard_negatives=2,
                            mix_hardest=True, backend=name, **extra)
        values.append(value)
        grads.append(torch.autograd.grad(value, [t for t in (x, f, p) if t is not None]))
    close(values[1], values[0])
    for got, want in zip(grads[1], grads[0]):
        close(got, want)
    every_pair = metrix_loss(emb, labels, loss=loss, proxies=proxies, mixup=mixup, pairs=pairs, lam=0.3,
                             backend="reference", **({"features": features, "head": lambda q: q @ head.T}
                                                     if mixup == "feature" else {}))
    if loss != "nca":  # whose mixed term is a constant of lam (README, Losses)
        assert not torch.isclose(every_pair, values[0]), "the selection should change the loss"
