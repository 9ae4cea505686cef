"""The weight cache: sliced (weight, bias) pairs reused when a layer's masks come back."""

from __future__ import annotations

from collections import OrderedDict

import torch


class WeightCache:
    """LRU cache of sliced (weight, bias) keyed by (layer, output-mask bytes[, input-mask bytes]), bounded in bytes."""

    def __init__(self, budget_mb: float) -> None:
        self.budget = int(budget_mb * 2**20)
        self.used = 0
        self.entries: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.hits = 0
        self.lookups = 0

    @property
    def enabled(self) -> bool:
        return self.budget > 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else float("nan")

    def clear(self) -> None:
        self.entries.clear()
        self.used = 0
        self.hits = self.lookups = 0

    def lookup(self, key: tuple, count: bool = True) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.budget <= 0:
            return None
        found = self.entries.get(key)
        if count:
            self.lookups += 1
        if found is not None:
            if count:
                self.hits += 1
            self.entries.move_to_end(key)
        return found

    def store(self, key: tuple, value: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        size = sum(t.numel() * t.element_size() for t in value)
        if 0 < size <= self.budget:
            self.entries[key] = value
            self.used += size
            while self.used > self.budget:
                _, evicted = self.entries.popitem(last=False)
                self.used -= sum(t.numel() * t.element_size() for t in evicted)
        return value
