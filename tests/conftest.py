"""Shared hypothesis profile and strategies: small float64 batches, degenerate ones included."""
from __future__ import annotations

import os
from typing import NamedTuple, Optional

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from metrix_kernels import FAMILY

# Under CI the examples are derandomized: a run is reproducible and a red CI names a case that
# fails again; local runs explore fresh examples (and hypothesis' database replays failures).
settings.register_profile(
    "metrix", deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow],
    derandomize=bool(os.environ.get("CI")),
)
settings.load_profile("metrix")

# Test tensors are tiny: intra-op threads only add synchronization (10x slower on 2 busy cores).
torch.set_num_threads(1)

LOSSES = sorted(FAMILY)
PROXY_LOSSES = sorted(name for name, row in FAMILY.items() if row.uses_proxies)
PAIR_SETS = ("pos-neg", "anc-neg", "pos-pos", "neg-neg")


class Batch(NamedTuple):
    embeddings: torch.Tensor  # [B, d] float64, not normalized (the losses normalize)
    labels: torch.Tensor  # [B] int64 in [0, num_classes)
    proxies: Optional[torch.Tensor]  # [num_classes, d] float64 or None
    num_classes: int


@st.composite
def label_lists(draw, min_size: int = 1, max_size: int = 8) -> list[int]:
    """Class labels of a batch: random, one class only, all distinct, or pairs plus a singleton."""
    size = draw(st.integers(min_size, max_size))
    kind = draw(st.sampled_from(["random", "one_class", "distinct", "pairs_and_singleton"]))
    if kind == "one_class":
        return [draw(st.integers(0, 3))] * size
    if kind == "distinct":
        return draw(st.permutations(range(size)))
    if kind == "pairs_and_singleton":
        # every class twice except the last example, an anchor without positives
        labels = [k // 2 for k in range(size - 1)] + [size]
        return draw(st.permutations(labels))
    return draw(st.lists(st.integers(0, 3), min_size=size, max_size=size))


@st.composite
def batches(draw, with_proxies: bool = False, min_size: int = 1, max_size: int = 8) -> Batch:
    """A float64 batch drawn from a seed (continuous values, so no ties and no kinks by accident)."""
    labels = draw(label_lists(min_size, max_size))
    dim = draw(st.integers(2, 5))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    # some proxies without examples; at least two, since proxy candidates need a negative proxy
    num_classes = max(max(labels) + 1, 2) + draw(st.integers(0, 2))
    scale = draw(st.sampled_from([0.5, 1.0, 3.0]))  # the losses must not depend on the norm
    embeddings = scale * torch.randn(len(labels), dim, generator=gen, dtype=torch.float64)
    proxies = torch.randn(num_classes, dim, generator=gen, dtype=torch.float64) if with_proxies else None
    return Batch(embeddings, torch.tensor(labels), proxies, num_classes)


def loss_params(name: str):
    """Hyperparameters of a loss, over the ranges published settings use (scales up to 80)."""
    unit = dict(allow_nan=False, allow_infinity=False)
    return {
        "contrastive": st.fixed_dictionaries(
            {"pos_margin": st.floats(0.0, 0.6, **unit), "neg_margin": st.floats(0.3, 1.8, **unit)}
        ),
        "lifted_structure": st.fixed_dictionaries(
            {"pos_margin": st.floats(0.0, 0.6, **unit), "neg_margin": st.floats(0.3, 1.8, **unit)}
        ),
        "binomial_deviance": st.fixed_dictionaries(
            {"alpha": st.floats(0.5, 20, **unit), "beta": st.floats(1, 80, **unit), "base": st.floats(0, 1, **unit)}
        ),
        "multi_similarity": st.fixed_dictionaries(
            {"alpha": st.floats(0.5, 20, **unit), "beta": st.floats(1, 80, **unit), "base": st.floats(0, 1, **unit)}
        ),
        "proxy_anchor": st.fixed_dictionaries(
            {"margin": st.floats(0.0, 0.5, **unit), "alpha": st.floats(1, 64, **unit)}
        ),
        "nca": st.fixed_dictionaries({"softmax_scale": st.floats(0.1, 16, **unit)}),
        "proxy_nca": st.fixed_dictionaries({"softmax_scale": st.floats(0.1, 16, **unit)}),
        "proxy_nca_pp": st.fixed_dictionaries({"temperature": st.floats(1 / 16, 4, **unit)}),
    }[name]
