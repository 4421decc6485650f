"""The public API: input validation with messages that say what was expected, and MetrixLoss."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from metrix_kernels import FAMILY, MetrixLoss, metrix_loss
from metrix_kernels.pairs import METHODS

gen = torch.Generator().manual_seed(0)
EMB = torch.randn(6, 4, generator=gen, dtype=torch.float64)
LABELS = torch.tensor([0, 0, 1, 1, 2, 2])
PROXIES = torch.randn(3, 4, generator=gen, dtype=torch.float64)


def call(**overrides):
    kwargs = {"embeddings": EMB, "labels": LABELS, "lam": 0.5, **overrides}
    return metrix_loss(kwargs.pop("embeddings"), kwargs.pop("labels"), **kwargs)


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        # shapes and dtypes of embeddings and labels
        ({"embeddings": EMB[0]}, ValueError, r"embeddings must have shape \[B, d\], got \(4,\)"),
        ({"embeddings": EMB[None]}, ValueError, r"embeddings must have shape \[B, d\]"),
        ({"embeddings": EMB.tolist()}, TypeError, r"embeddings must be a torch.Tensor \[B, d\], got list"),
        ({"embeddings": EMB.long()}, TypeError, r"embeddings must be floating point .*got torch.int64"),
        ({"embeddings": EMB[:0], "labels": LABELS[:0]}, ValueError, r"at least one example"),
        ({"labels": LABELS[:5]}, ValueError, r"one entry per embedding: expected \[6\], got \(5,\)"),
        ({"labels": LABELS[:, None]}, ValueError, r"labels must have shape \[B\] = \[6\]"),
        ({"labels": LABELS.double()}, TypeError, r"labels must be an integer tensor .*got torch.float64"),
        ({"labels": LABELS.bool()}, TypeError, r"labels must be an integer tensor"),
        ({"labels": LABELS.to("meta")}, ValueError, r"labels is on meta but embeddings are on cpu; expected the same device"),
        # names
        ({"loss": "triplet"}, ValueError, r"unknown loss 'triplet'; expected one of \['binomial_deviance'"),
        ({"pairs": "pos-anc"}, ValueError, r"unknown pairs 'pos-anc'; expected one of \['pos-neg/anc-neg', 'pos-neg'"),
        ({"mixup": "manifold"}, ValueError, r"unknown mixup 'manifold'; expected one of \[None, 'embedding'"),
        ({"backend": "tpu"}, ValueError, r"unknown backend 'tpu'; expected one of \['auto', 'reference'"),
        ({"label_mode": "soft"}, ValueError, r"unknown label_mode 'soft'; expected one of \['interpolate'"),
        # loss parameters
        ({"gamma": 1.0}, TypeError, r"unexpected parameter\(s\) \['gamma'\]; it takes \['alpha', 'base', 'beta'\]"),
        ({"alpha": "2"}, TypeError, r"loss parameter 'alpha' must be a finite number, got '2'"),
        ({"beta": math.inf}, TypeError, r"loss parameter 'beta' must be a finite number"),
        ({"alpha": 0.0}, ValueError, r"loss parameter 'alpha' must be > 0"),
        ({"loss": "proxy_nca_pp", "proxies": PROXIES, "temperature": -1.0}, ValueError, r"'temperature' must be > 0"),
        # mixing options
        ({"lam": 1.5}, ValueError, r"lam must be None .* or a number in \[0, 1\], got 1.5"),
        ({"lam": -0.1}, ValueError, r"lam must be None"),
        ({"lam": math.nan}, ValueError, r"lam must be None"),
        ({"lam": "0.5"}, ValueError, r"lam must be None"),
        ({"lam": True}, ValueError, r"lam must be None .*got True"),
        ({"weight": False}, ValueError, r"weight must be a finite number >= 0, got False"),
        ({"mix_alpha": True}, ValueError, r"mix_alpha must be a finite number > 0, got True"),
        ({"weight": -0.4}, ValueError, r"weight must be a finite number >= 0, got -0.4"),
        ({"weight": math.inf}, ValueError, r"weight must be a finite number >= 0"),
        ({"mix_alpha": 0.0}, ValueError, r"mix_alpha must be a finite number > 0, got 0.0"),
        ({"mix_alpha": math.nan}, ValueError, r"mix_alpha must be a finite number > 0"),
        ({"hard_negatives": 0}, ValueError, r"hard_negatives must be an int >= 1, got 0"),
        ({"hard_negatives": 2.0}, ValueError, r"hard_negatives must be an int >= 1"),
        ({"mix_hardest": 1}, ValueError, r"mix_hardest must be True or False, got 1"),
        # feature and input mixup
        ({"mixup": "feature"}, TypeError, r"features must be a torch.Tensor \[B, C, H, W\] with B = 6, got NoneType"),
        ({"mixup": "feature", "features": torch.zeros(6, 2, 2), "head": abs}, ValueError, r"features must have shape \[B, C, H, W\]"),
        ({"mixup": "feature", "features": torch.zeros(5, 2, 2, 2), "head": abs}, ValueError, r"one map per embedding: expected B = 6"),
        ({"mixup": "feature", "features": torch.zeros(6, 2, 2, 2, device="meta"), "head": abs}, ValueError, r"features is on meta"),
        ({"mixup": "feature", "features": torch.zeros(6, 2, 2, 2)}, TypeError, r"mixup='feature' needs head: a callable"),
        ({"mixup": "input"}, ValueError, r"mixup='input' needs inputs: a tensor \[B = 6, \.\.\.\], got NoneType"),
        ({"mixup": "input", "inputs": torch.zeros(5, 3), "model": abs}, ValueError, r"got \(5, 3\)"),
        ({"mixup": "input", "inputs": torch.zeros(6, 3)}, TypeError, r"mixup='input' needs model: a callable"),
        ({"mixup": "input", "inputs": torch.zeros(6, 3, dtype=torch.uint8), "model": abs}, TypeError,
         r"mixup='input' interpolates inputs: they must be floating point, got torch.uint8"),
    ],
)
def test_bad_input_is_refused_with_what_was_expected(overrides, error, message):
    with pytest.raises(error, match=message):
        call(**overrides)


@pytest.mark.parametrize(
    "loss, proxies, labels, error, message",
    [
        ("proxy_anchor", None, LABELS, ValueError, r"loss 'proxy_anchor' needs proxies: pass proxies=\[num_classes, 4\] or use MetrixLoss"),
        ("multi_similarity", PROXIES, LABELS, ValueError, r"loss 'multi_similarity' takes no proxies"),
        ("proxy_nca", PROXIES[:, :3], LABELS, ValueError, r"proxies must have shape \[num_classes, 4\], got \(3, 3\)"),
        ("proxy_nca", PROXIES[0], LABELS, ValueError, r"proxies must have shape \[num_classes, 4\], got \(4,\)"),
        ("proxy_nca", PROXIES.float(), LABELS, TypeError, r"proxies has dtype torch.float32 but embeddings have torch.float64"),
        ("proxy_nca", PROXIES.to("meta"), LABELS, ValueError, r"proxies is on meta but embeddings are on cpu"),
        ("proxy_nca", PROXIES[:1], torch.zeros(6, dtype=torch.long), ValueError, r"needs at least 2 proxies, got 1"),
        ("proxy_anchor", PROXIES, LABELS + 1, ValueError, r"labels must lie in \[0, 3\) to index the proxies, got values in \[1, 3\]"),
        ("proxy_anchor", PROXIES, LABELS - 1, ValueError, r"labels must lie in \[0, 3\).*\[-1, 1\]"),
    ],
)
def test_proxies_are_validated(loss, proxies, labels, error, message):
    with pytest.raises(error, match=message):
        call(loss=loss, proxies=proxies, labels=labels)


def test_numpy_scalars_are_numbers():
    """Hyperparameter sweeps hand numpy scalars: they count as the Python numbers they equal."""
    want = call(lam=0.25, weight=0.5, alpha=3.0, mixup="input", pairs="pos-neg", inputs=EMB, model=lambda x: x,
                hard_negatives=2)
    got = call(lam=np.float32(0.25), weight=np.float64(0.5), alpha=np.float32(3.0), mixup="input", pairs="pos-neg",
               inputs=EMB, model=lambda x: x, hard_negatives=np.int64(2))
    drawn = [call(lam=None, mix_alpha=alpha, pairs="pos-neg", generator=torch.Generator().manual_seed(1))
             for alpha in (2.0, np.int64(2))]
    assert drawn[0] == drawn[1]
    assert got == want
    module = MetrixLoss(lam=np.float32(0.25), beta=np.int32(40))
    assert module.loss_params["beta"] == 40.0 and type(module.loss_params["beta"]) is float
    with pytest.raises(ValueError, match="lam must be None"):
        call(lam=np.bool_(True))


@pytest.mark.parametrize("pairs", ["pos-neg", "anc-neg", "pos-pos", "neg-neg"])
@pytest.mark.parametrize("label_mode", ["interpolate", "negative", "dominant"])
def test_nca_mixed_term_has_no_gradient_and_says_so(pairs, label_mode):
    grads = []
    for weight in (0.0, 1.0):
        x = EMB.clone().requires_grad_(True)
        with pytest.warns(UserWarning, match="NCA's mixed term has no gradient"):
            value = call(embeddings=x, loss="nca", pairs=pairs, label_mode=label_mode, weight=weight)
        grads.append(torch.autograd.grad(value, x)[0])
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=1e-12)


def test_one_proxy_is_enough_when_proxies_are_anchors():
    labels = torch.zeros(6, dtype=torch.long)
    assert torch.isfinite(call(loss="proxy_anchor", proxies=PROXIES[:1], labels=labels))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_table_3_methods_run_as_presets(method):
    model = torch.nn.Linear(5, 4).double()
    inputs = torch.randn(6, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    value = call(embeddings=model(inputs), inputs=inputs, model=model, **METHODS[method])
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(model.weight.grad).all()


# --- MetrixLoss ------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", sorted(FAMILY))
def test_metrix_loss_module_owns_proxies_for_proxy_losses(loss):
    module = MetrixLoss(loss, num_classes=3, embedding_size=4, lam=0.5)
    if not FAMILY[loss].uses_proxies:
        assert module.proxies is None and not list(module.parameters())
        return
    assert isinstance(module.proxies, torch.nn.Parameter) and module.proxies.shape == (3, 4)
    assert [p for p in module.parameters()] == [module.proxies]
    emb = EMB.float().requires_grad_()
    module(emb, LABELS).backward()
    assert module.proxies.grad is not None and module.proxies.grad.abs().sum() > 0
    assert emb.grad is not None and torch.isfinite(emb.grad).all()


@pytest.mark.parametrize("loss", ["proxy_anchor", "proxy_nca_pp"])
def test_metrix_loss_module_needs_its_proxy_shape(loss):
    with pytest.raises(ValueError, match=rf"loss '{loss}' owns proxies: num_classes must be a positive int, got None"):
        MetrixLoss(loss, embedding_size=4)
    with pytest.raises(ValueError, match=r"embedding_size must be a positive int, got 0"):
        MetrixLoss(loss, num_classes=3, embedding_size=0)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"loss": "arcface"}, ValueError, r"unknown loss 'arcface'"),
        ({"mixup": "cutmix"}, ValueError, r"unknown mixup 'cutmix'"),
        ({"pairs": "all"}, ValueError, r"unknown pairs 'all'"),
        ({"backend": "tpu"}, ValueError, r"unknown backend 'tpu'"),
        ({"weight": -1}, ValueError, r"weight must be a finite number >= 0"),
        ({"margin": 0.1}, TypeError, r"unexpected parameter\(s\) \['margin'\]"),
    ],
)
def test_metrix_loss_module_validates_at_construction(kwargs, error, message):
    with pytest.raises(error, match=message):
        MetrixLoss(**kwargs)


@pytest.mark.parametrize("mixup", [None, "embedding", "feature", "input"])
def test_metrix_loss_module_takes_every_mixup(mixup):
    module = MetrixLoss("proxy_anchor", mixup=mixup, num_classes=3, embedding_size=4)
    torch.manual_seed(0)
    backbone = torch.nn.Conv2d(2, 3, 1)
    head = torch.nn.Linear(3, 4)
    model = torch.nn.Sequential(backbone, torch.nn.Flatten(2), torch.nn.AdaptiveAvgPool1d(1), torch.nn.Flatten(), head)
    images = torch.randn(6, 2, 3, 3)
    features = backbone(images)
    extra = {"feature": {"features": features, "head": head}, "input": {"inputs": images, "model": model}}
    value = module(model(images), LABELS, generator=torch.Generator().manual_seed(0), **extra.get(mixup, {}))
    value.backward()
    assert torch.isfinite(value)
    for p in (module.proxies, backbone.weight, head.weight):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_readme_quick_start():
    # first snippet, with a stand-in model
    model = torch.nn.Linear(8, 16)
    images, labels = torch.randn(10, 8), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 4])
    embeddings = model(images)
    loss = metrix_loss(embeddings, labels, loss="multi_similarity", mixup="embedding")
    loss.backward()
    assert torch.isfinite(loss) and model.weight.grad is not None

    # second snippet: the module with its own proxies and feature mixup
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Conv2d(3, 32, 3)
            self.head = torch.nn.Linear(32, 512)

    net = Net()
    feature_maps = net.body(torch.randn(10, 3, 7, 7))
    from metrix_kernels.reference import pool

    embeddings = net.head(pool(feature_maps))
    criterion = MetrixLoss("proxy_anchor", mixup="feature", num_classes=100, embedding_size=512)
    loss = criterion(embeddings, labels, features=feature_maps, head=net.head)
    loss.backward()
    assert torch.isfinite(loss) and criterion.proxies.grad is not None and net.body.weight.grad is not None
