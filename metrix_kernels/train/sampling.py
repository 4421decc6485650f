"""Batch samplers whose order is a pure function of (seed, epoch), so a resumed run sees the
batches an uninterrupted one would; ``start`` skips the batches already trained this epoch.

Under torch.distributed (``shard``) every rank draws the same global batches and yields its
contiguous slice of each, in rank order: the union over ranks is exactly the single-process batch,
so the balanced (classes x samples) structure holds for the global batch the loss gathers.
"""
from __future__ import annotations

import torch


class _EpochSampler(torch.utils.data.Sampler):
    def __init__(self, seed: int):
        self.seed, self.epoch, self.start = seed, 0, 0
        self.rank, self.world_size = 0, 1

    def shard(self, rank: int, world_size: int) -> None:
        """Yield rank ``rank``'s slice of every global batch (sizes differ by at most one)."""
        if self.batch_size < world_size:
            raise ValueError(f"batch size {self.batch_size} is smaller than the {world_size} processes")
        self.rank, self.world_size = rank, world_size

    def _slice(self, batch: list[int]) -> list[int]:
        share, extra = divmod(len(batch), self.world_size)
        start = self.rank * share + min(self.rank, extra)
        return batch[start : start + share + (self.rank < extra)]

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def _generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)

    def __iter__(self):
        batches = self.batches()
        return iter([self._slice(b) for b in batches[self.start :]])

    def __len__(self) -> int:
        return self.num_batches - self.start


class RandomBatchSampler(_EpochSampler):
    """Uniformly shuffled batches of batch_size (the recipe on CUB200 and Cars196); last partial batch dropped."""

    def __init__(self, num_examples: int, batch_size: int, seed: int = 0):
        super().__init__(seed)
        if num_examples < batch_size:
            raise ValueError(f"batch size {batch_size} exceeds the {num_examples} training examples")
        self.num_examples, self.batch_size = num_examples, batch_size
        self.num_batches = num_examples // batch_size

    def batches(self) -> list[list[int]]:
        order = torch.randperm(self.num_examples, generator=self._generator()).tolist()
        return [order[k * self.batch_size : (k + 1) * self.batch_size] for k in range(self.num_batches)]


class BalancedBatchSampler(_EpochSampler):
    """Batches of classes_per_batch classes x samples_per_class examples (SOP, In-Shop recipe).

    Each batch draws its classes uniformly without replacement; a class with fewer examples than
    samples_per_class is sampled with replacement. An epoch has as many batches as the random sampler would.
    """

    def __init__(self, labels: list[int], classes_per_batch: int, samples_per_class: int, seed: int = 0):
        super().__init__(seed)
        self.by_class: dict[int, list[int]] = {}
        for index, label in enumerate(labels):
            self.by_class.setdefault(label, []).append(index)
        if len(self.by_class) < classes_per_batch:
            raise ValueError(f"{classes_per_batch} classes per batch but the training set has {len(self.by_class)}")
        self.classes_per_batch, self.samples_per_class = classes_per_batch, samples_per_class
        self.batch_size = classes_per_batch * samples_per_class
        self.num_batches = max(1, len(labels) // self.batch_size)

    def batches(self) -> list[list[int]]:
        g = self._generator()
        classes = list(self.by_class)
        out = []
        for _ in range(self.num_batches):
            batch = []
            for k in torch.randperm(len(classes), generator=g)[: self.classes_per_batch].tolist():
                members = self.by_class[classes[k]]
                if len(members) >= self.samples_per_class:
                    pick = torch.randperm(len(members), generator=g)[: self.samples_per_class]
                else:
                    pick = torch.randint(len(members), (self.samples_per_class,), generator=g)
                batch += [members[p] for p in pick.tolist()]
            out.append(batch)
        return out
