"""torch.compile traces the custom ops through their fake implementations (no graph breaks)."""
from __future__ import annotations

import torch

from metrix_kernels import ops
from metrix_kernels.pairs import MixPlan, batch_pairs

from .helpers import close, grads, leaves, loss


def test_compiled_ops_match_eager(device):
    row, terms = loss("multi_similarity")
    gen = torch.Generator().manual_seed(3)
    labels = torch.randint(3, (9,), generator=gen).to(device)
    i, j = batch_pairs(labels, "pos-neg")
    plan = MixPlan(i, j, 0.3, "pos-neg", "interpolate")
    features = torch.randn(9, 4, 2, 2, generator=gen).to(device)
    head = torch.randn(5, 4, generator=gen).to(device)

    def total(emb, feats):
        clean = ops.clean_loss(row, terms, emb, labels, None, "triton")
        mixed = ops.mixed_loss(row, terms, emb, labels, None, plan, "embedding", backend="triton")
        pooled = ops.mixpool(feats, plan.i, plan.j, plan.lam, "triton")
        return clean + mixed + (pooled @ head.T).square().mean()

    compiled = torch.compile(total, backend="aot_eager", fullgraph=True)
    emb = torch.randn(9, 5, generator=gen).to(device)
    a = leaves(emb, features)
    b = leaves(emb, features)
    got, want = compiled(*a), total(*b)
    close(got, want)
    for x, y in zip(grads(got, a), grads(want, b)):
        close(x, y)
