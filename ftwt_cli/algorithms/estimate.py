"""Estimate FLOPs reduction before training, and choose r for a FLOPs budget.

The targets of every r come from the frozen dense model, so one pass over the training data gives
the expected reduction for all ratios at once: per block we keep each sample's channel thresholds
(gating.keep_thresholds), evaluate them at every ratio (flops.FlopsCounter) and accumulate sums.
Memory is O(blocks × ratios), independent of the number of samples.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

from ftwt_cli.console import progress_bar
from ftwt_cli.core.flops import FlopsCounter, count_kept, ratio_levels, thresholds_from_masks
from ftwt_cli.core.gating import FTWTModel
from ftwt_cli.core.targets import CumulativeMassTarget, keep_thresholds, rowwise_by_width

#: Bisection runs on this dyadic grid of r, so every midpoint it visits is a grid point whose
#: statistics the single data pass already holds (2^-12 ≈ 2.4e-4 resolution).
SEARCH_DEPTH = 12
SEARCH_GRID = [i / 2**SEARCH_DEPTH for i in range(1, 2**SEARCH_DEPTH + 1)]


@dataclass
class Estimate:
    """Expected MACs and keep ratios per r, from one pass over ``samples`` images."""

    ratios: list[float]
    dense_macs: int
    head_macs: int
    mean_macs: list[float]  # expected dynamic MACs per image, without heads, per ratio
    keep: list[list[float]]  # [block][ratio] expected fraction of channels kept
    block_names: list[str]
    samples: int

    def reduction_pct(self, i: int, with_heads: bool = False) -> float:
        spent = self.mean_macs[i] + (self.head_macs if with_heads else 0)
        return 100.0 * (1.0 - spent / self.dense_macs)

    def index_of(self, r: float) -> int:
        return min(range(len(self.ratios)), key=lambda i: abs(self.ratios[i] - r))

    def nearest(self, target_pct: float) -> int:
        """Index of the ratio whose estimated reduction (without heads) is nearest ``target_pct``."""
        return min(range(len(self.ratios)), key=lambda i: (abs(self.reduction_pct(i) - target_pct), -self.ratios[i]))

    def restricted(self, ratios: list[float]) -> "Estimate":
        """The same pass's figures for ``ratios`` only (each one of this estimate's ratios)."""
        where = {r: i for i, r in enumerate(self.ratios)}
        index = [where[r] for r in ratios]
        return Estimate(
            list(ratios), self.dense_macs, self.head_macs, [self.mean_macs[i] for i in index],
            [[row[i] for i in index] for row in self.keep], self.block_names, self.samples,
        )  # fmt: skip

    def rows(self) -> list[dict]:
        return [
            {
                "r": r,
                "flops_reduction_pct": self.reduction_pct(i),
                "flops_reduction_with_heads_pct": self.reduction_pct(i, with_heads=True),
                "per_layer_keep": {name: self.keep[b][i] for b, name in enumerate(self.block_names)},
            }
            for i, r in enumerate(self.ratios)
        ]


class EstimateAccumulator:
    """Streaming sums of per-sample MACs and keep counts for a fixed list of ratios."""

    def __init__(self, counter: FlopsCounter, ratios: list[float], device: torch.device) -> None:
        self.counter = counter
        self.ratios = list(ratios)
        self.levels = ratio_levels(self.ratios).to(device)
        self.sum_macs = torch.zeros(len(self.ratios), dtype=torch.float64, device=device)
        self.sum_kept = torch.zeros(len(counter.graph.blocks), len(self.ratios), dtype=torch.float64, device=device)
        self.samples = 0

    def update(self, thresholds: list[torch.Tensor]) -> None:
        kept = rowwise_by_width(lambda t: count_kept(t, self.levels), thresholds)  # shared with the MAC count
        self.sum_macs += self.counter.dynamic_macs(thresholds, self.ratios, kept=kept).sum(dim=0)
        for b, (t, k) in enumerate(zip(thresholds, kept)):
            self.sum_kept[b] += k.sum(dim=0).double() / t.shape[1]
        self.samples += thresholds[0].shape[0]

    def result(self, block_names: list[str]) -> Estimate:
        n = max(self.samples, 1)
        return Estimate(
            ratios=self.ratios,
            dense_macs=self.counter.dense_macs,
            head_macs=self.counter.head_macs,
            mean_macs=(self.sum_macs / n).tolist(),
            keep=(self.sum_kept / n).tolist(),
            block_names=block_names,
            samples=self.samples,
        )


def _batches(loader: Iterable, device: torch.device, description: str) -> Iterable[torch.Tensor]:
    total = len(loader) if hasattr(loader, "__len__") else None
    with progress_bar(description, total) as advance:
        for images, _ in loader:
            yield images.to(device, non_blocking=True)
            advance()


@torch.no_grad()
def estimate(model: FTWTModel, loader: Iterable, ratios: list[float], device: torch.device) -> Estimate:
    """One no-grad pass of the frozen dense model; expected reduction for every ratio in ``ratios``."""
    model.eval().configure(mask_source="dense", record=True)
    acc = EstimateAccumulator(FlopsCounter(model.graph), ratios, device)
    try:
        for images in _batches(loader, device, "estimate"):
            model(images)
            acc.update(rowwise_by_width(keep_thresholds, [rec.response for rec in model.records()]))
    finally:
        model.configure(record=False)
    return acc.result([b.conv for b in model.graph.blocks])


@torch.no_grad()
def cascaded_reduction(model: FTWTModel, loader: Iterable, r: float, device: torch.device) -> float:
    """Reduction with every block applying its ground-truth mask during the pass (as in training)."""
    model.eval().configure(mask_source="target", target=CumulativeMassTarget(r), record=True)
    counter = FlopsCounter(model.graph)
    total, samples = 0.0, 0
    try:
        for images in _batches(loader, device, f"cascade r={r:.4f}"):
            model(images)
            masks = [rec.mask for rec in model.records()]
            total += float(counter.dynamic_macs(thresholds_from_masks(masks), [1.0]).sum())
            samples += images.shape[0]
    finally:
        model.configure(mask_source="dense", record=False)
    return float(counter.reduction_pct(total / max(samples, 1)))


class UnreachableTarget(Exception):
    def __init__(self, target: float, low: float, high: float) -> None:
        super().__init__(
            f"target {target:g}% is outside the reachable range {low:.2f}%..{high:.2f}% "
            "(r = 1 prunes only dead channels; r → 0 keeps one channel per layer)"
        )
        self.target, self.low, self.high = target, low, high


@dataclass
class SearchResult:
    target: float
    chosen_r: float
    estimated_reduction_pct: float
    converged: bool
    steps: list[dict] = field(default_factory=list)
    reachable: tuple[float, float] = (0.0, 0.0)


def bisect_ratio(reduction_at: Callable[[float], float], target: float, tolerance: float, depth: int = SEARCH_DEPTH) -> SearchResult:
    """Bisect r in (0, 1] on the dyadic grid of ``depth`` levels; reduction falls as r grows."""
    high = reduction_at(2.0**-depth)
    low = reduction_at(1.0)
    if not (low - tolerance <= target <= high + tolerance):
        raise UnreachableTarget(target, low, high)
    steps: list[dict] = []
    lo, hi = 0.0, 1.0
    best = (abs(low - target), 1.0, low)
    for _ in range(depth):
        mid = (lo + hi) / 2
        reduction = reduction_at(mid)
        steps.append({"r": mid, "reduction_pct": reduction})
        best = min(best, (abs(reduction - target), mid, reduction))
        if abs(reduction - target) <= tolerance:
            break
        if reduction > target:
            lo = mid
        else:
            hi = mid
    error, r, reduction = best
    return SearchResult(target, r, reduction, error <= tolerance, steps, (low, high))


def search_from_estimate(est: Estimate, target: float, tolerance: float) -> SearchResult:
    """Bisection over a single-pass estimate taken on :data:`SEARCH_GRID` (no further data passes)."""
    lookup = {r: est.reduction_pct(i) for i, r in enumerate(est.ratios)}
    return bisect_ratio(lambda r: lookup[r], target, tolerance)


def find_ratio(
    model: FTWTModel, loader: Iterable, device: torch.device, target: float, tolerance: float, cascade: bool = False
) -> SearchResult:
    """Choose r for a FLOPs budget: bisection over one estimate pass, or one cascaded pass per step."""
    if not cascade:
        return search_from_estimate(estimate(model, loader, SEARCH_GRID, device), target, tolerance)
    cache: dict[float, float] = {}

    def reduction_at(r: float) -> float:
        if r not in cache:
            cache[r] = cascaded_reduction(model, loader, r, device)
        return cache[r]

    return bisect_ratio(reduction_at, target, tolerance)
