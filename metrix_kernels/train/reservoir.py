"""A bounded uniform sample of the mixed examples seen during training, for utilization (eq. 12).

It stores what was mixed (training-set indices i, j and lam), not embeddings: at evaluation the
final model re-embeds them, so clean and mixed training embeddings share one embedding space.
"""
from __future__ import annotations

import torch


class MixedReservoir:
    def __init__(self, capacity: int, per_step: int, seed: int):
        self.capacity, self.per_step = capacity, per_step
        self.i = torch.empty(0, dtype=torch.long)
        self.j = torch.empty(0, dtype=torch.long)
        self.lam = torch.empty(0, dtype=torch.float32)
        self.seen = 0
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return self.lam.numel()

    def add(self, i: torch.Tensor, j: torch.Tensor, lam: float) -> None:
        """Offer up to per_step of this step's mixed pairs (chosen at random) to the reservoir (Algorithm R)."""
        if self.capacity == 0 or i.numel() == 0:
            return
        pick = torch.randperm(i.numel(), generator=self.generator)[: self.per_step]
        for a, b in zip(i.cpu()[pick].tolist(), j.cpu()[pick].tolist()):
            self.seen += 1
            if len(self) < self.capacity:
                self.i = torch.cat([self.i, torch.tensor([a])])
                self.j = torch.cat([self.j, torch.tensor([b])])
                self.lam = torch.cat([self.lam, torch.tensor([lam], dtype=torch.float32)])
                continue
            slot = int(torch.randint(self.seen, (1,), generator=self.generator))
            if slot < self.capacity:
                self.i[slot], self.j[slot], self.lam[slot] = a, b, lam

    def state_dict(self) -> dict:
        return {"i": self.i, "j": self.j, "lam": self.lam, "seen": self.seen, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.i, self.j, self.lam, self.seen = state["i"], state["j"], state["lam"], state["seen"]
        self.generator.set_state(state["generator"])
