"""What the CPU benchmark measures: one fwd+bwd step of a loss, per implementation.

Batches are drawn like real ones: B / 8 classes x 8 examples, d = 512, embeddings as a network
would give them (random directions). Proxy losses get one proxy per class. Mixup runs over all
pos-neg pairs with lam = 0.4 (feature: maps [B, 64, 7, 7] and a linear head; input: inputs [B, 512]
and a linear model, 3 hard negatives per anchor).

Peak memory is measured, not estimated: the growth of the process's resident set during the step
(VmHWM after resetting it through /proc/self/clear_refs, minus VmRSS before), with glibc's mmap
threshold pinned at 64 KiB so that every tensor of 64 KiB or more is returned to the system when
freed and the resident set follows live tensors.
"""
from __future__ import annotations

import ctypes
import re
from typing import Callable, Optional

import torch

from metrix_kernels import FAMILY, metrix_loss, ops

DIM = 512
PER_CLASS = 8
LAM = 0.4
CHANNELS, SIDE = 64, 7
# runs whose estimated peak exceeds this are skipped (the machine has ~23 GB, shared)
MEMORY_CAP = 4 << 30

# PML's version of our rows with the same hyperparameters (row defaults)
PML = {
    "contrastive": ("ContrastiveLoss", {}),
    "lifted_structure": ("GeneralizedLiftedStructureLoss", {}),
    "multi_similarity": ("MultiSimilarityLoss", {}),
    "nca": ("NCALoss", {}),
    "proxy_anchor": ("ProxyAnchorLoss", {}),
    "proxy_nca_pp": ("ProxyNCALoss", {"softmax_scale": 9.0}),
}


def pin_malloc() -> None:
    """M_MMAP_THRESHOLD = 64 KiB, fixed (no dynamic raise after frees)."""
    ctypes.CDLL("libc.so.6").mallopt(-3, 64 << 10)


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{key}:\s+(\d+) kB", f.read()).group(1)) << 10


def peak_bytes(step: Callable[[], None]) -> int:
    """Resident-set growth at the peak of one call of step."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status("VmRSS")
    step()
    return max(_status("VmHWM") - base, 0)


def pairs_per_batch(batch: int) -> int:
    return batch * (batch - PER_CLASS)  # ordered pos-neg pairs


def estimated_bytes(impl: str, loss: str, mixup: Optional[str], batch: int) -> int:
    """A rough upper estimate of a step's peak, to skip what would not fit."""
    m = pairs_per_batch(batch)
    if mixup == "embedding" and FAMILY[loss].candidates == "proxies":
        # the mixed examples are the anchors: the reference forms all [M, d] mixed rows, the fused
        # path one block of them at a time
        rows = m if impl == "reference" else min(m, max(batch, ops.MIX_BLOCK_ELEMENTS // DIM))
        return 6 * rows * DIM * 4 + 12 * m * 4
    if mixup == "input":
        # the api's hard-negative plan: [B, B] masks and the [B, M] member mask (M <= 3 negatives x 8 x B)
        base = 12 * batch**2 + 2 * 24 * batch**2
        return base + (20 * batch * m * 4 if impl == "reference" else 3 * m * DIM * 4)
    if mixup == "feature":
        pooled = 4 * m * (CHANNELS + DIM) * 4
        if impl != "reference":
            return pooled
        return pooled + 3 * m * CHANNELS * SIDE * SIDE * 4 + 12 * batch * m * 4
    if mixup == "embedding" and impl == "reference":
        return 6 * m * DIM * 4 + 12 * batch * m * 4
    return 40 * batch * batch * 4 + (24 * m if mixup else 0)


class Case:
    """Inputs of one benchmark and the fwd+bwd step of each implementation on them."""

    def __init__(self, loss: str, mixup: Optional[str], batch: int, seed: int = 0):
        self.loss, self.mixup, self.batch = loss, mixup, batch
        gen = torch.Generator().manual_seed(seed)
        classes = max(batch // PER_CLASS, 1)
        self.labels = torch.arange(batch) % classes
        self.labels = self.labels[torch.randperm(batch, generator=gen)]
        self.proxies = torch.randn(classes, DIM, generator=gen) if FAMILY[loss].uses_proxies else None
        self.embeddings = torch.randn(batch, DIM, generator=gen)
        self.features = torch.randn(batch, CHANNELS, SIDE, SIDE, generator=gen).relu_()
        self.inputs = torch.randn(batch, DIM, generator=gen)
        self.head = torch.nn.Linear(CHANNELS, DIM)
        self.model = torch.nn.Linear(DIM, DIM)

    def step(self, impl: str) -> Callable[[], None]:
        if impl == "pml":
            return self._pml_step()
        return lambda: self._metrix_step(impl)

    def _metrix_step(self, backend: str) -> None:
        proxies = None if self.proxies is None else self.proxies.clone().requires_grad_(True)
        features = inputs = None
        if self.mixup == "feature":
            features = self.features.clone().requires_grad_(True)
            emb = self.head(features.mean(dim=(2, 3)) + features.amax(dim=(2, 3)))
        elif self.mixup == "input":
            inputs = self.inputs
            emb = self.model(inputs)
        else:
            emb = self.embeddings.clone().requires_grad_(True)
        loss = metrix_loss(
            emb, self.labels, loss=self.loss, mixup=self.mixup, pairs="pos-neg", lam=LAM, proxies=proxies,
            backend=backend, features=features, head=self.head, inputs=inputs, model=self.model,
        )
        loss.backward()

    def _pml_step(self) -> Callable[[], None]:
        from pytorch_metric_learning import losses

        name, params = PML[self.loss]
        if FAMILY[self.loss].uses_proxies:
            params = {**params, "num_classes": self.proxies.shape[0], "embedding_size": DIM}
        fn = getattr(losses, name)(**params)

        def step():
            emb = self.embeddings.clone().requires_grad_(True)
            fn(emb, self.labels).backward()

        return step


def runnable(impl: str, loss: str, mixup: Optional[str], batch: int) -> Optional[str]:
    """None, or why this combination is not measured."""
    if impl == "pml" and (mixup is not None or loss not in PML):
        return "PML has no such loss" if loss not in PML else "PML has no mixup"
    need = estimated_bytes(impl, loss, mixup, batch)
    if need > MEMORY_CAP:
        return f"needs about {need / 2**30:.0f} GiB"
    return None
