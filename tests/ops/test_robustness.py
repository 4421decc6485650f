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
