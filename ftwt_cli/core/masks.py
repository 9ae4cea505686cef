"""Mask statistics of a gated model, shared by training (every epoch) and ``ftwt eval``.

One accumulator, :class:`MaskStats`, sees per batch the masks the heads applied, the ground truth and
(optionally) the head logits, and keeps per-layer sums in one float64 tensor so that a distributed run
reduces them with a single all-reduce. What it reports per layer is what tells a broken head from a
working one: the target's keep rate next to the heads', precision and recall of "keep", the heads' BCE,
and (where asked) how many distinct masks the layer produced and which filters every image kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ftwt_cli.core.flops import FlopsCounter

#: Columns of MaskStats.sums, one row per block.
_KEPT, _TRUTH_KEPT, _AGREE, _TRUE_POS, _BCE = range(5)


class DistinctRows:
    """Counts distinct rows of boolean [N, C] batches. Rows are packed to bytes (C/8 per row) and kept in a
    set, so memory grows with the number of distinct masks, not with the number of samples."""

    def __init__(self) -> None:
        self._seen: set[bytes] = set()

    def add(self, masks: torch.Tensor) -> None:
        packed = np.packbits(masks.detach().to("cpu", torch.bool).numpy(), axis=1)
        self._seen.update(map(bytes, packed))

    def __len__(self) -> int:
        return len(self._seen)


@dataclass
class LayerStats:
    name: str
    channels: int
    keep_ratio: float  # mean fraction of channels the heads kept per sample
    target_keep_ratio: float | None  # the same for the ground truth (None: dense)
    head_accuracy: float | None  # fraction of channel decisions equal to the ground truth (None: dense)
    precision: float | None  # of the heads' "keep" decisions, the fraction the ground truth keeps
    recall: float | None  # of the ground truth's kept channels, the fraction the heads keep
    head_bce: float | None  # mean BCE per decision (None when no logits were given)
    clusters: int | None  # distinct masks over the evaluated samples (None: not tracked)
    core_fraction: float | None  # fraction of channels kept by every sample (None: not tracked)


class MaskStats:
    """Streaming per-layer mask statistics and per-sample MACs of the masks actually applied.

    ``track_masks`` also keeps the distinct masks and the always-kept filters of every layer (a set per
    layer, not reducible across processes: evaluation keeps it on, training's running statistics off).
    """

    def __init__(self, counter: FlopsCounter, names: list[str], track_masks: bool = True) -> None:
        self.counter = counter
        self.names = names
        self.channels = [b.out_channels for b in counter.graph.blocks]
        blocks = len(self.channels)
        self.sums = torch.zeros(blocks, 5, dtype=torch.float64)
        self.totals = torch.zeros(2, dtype=torch.float64)  # samples, MACs
        self.has_truth = self.has_logits = False
        self.core: list[torch.Tensor | None] | None = [None] * blocks if track_masks else None
        self.distinct = [DistinctRows() for _ in range(blocks)] if track_masks else None

    def update(
        self,
        masks: list[torch.Tensor],
        truth: list[torch.Tensor] | None = None,
        logits: list[torch.Tensor] | None = None,
    ) -> None:
        """``masks``: applied bool masks [N, C_b] per block; ``truth``: ground-truth masks; ``logits``: head logits."""
        n = masks[0].shape[0]
        device = masks[0].device
        if self.sums.device != device:  # kept where the masks are: no host sync per batch on a GPU
            self.sums, self.totals = self.sums.to(device), self.totals.to(device)
        self.totals[0] += n
        self.totals[1] += self.counter.macs_from_masks(masks).sum()
        zero = torch.zeros((), dtype=torch.float64, device=device)
        for b, mask in enumerate(masks):
            mask = mask.detach().bool()
            c = mask.shape[1]
            row = [mask.sum(), zero, zero, zero, zero]
            if truth is not None:
                goal = truth[b].bool()
                row[_TRUTH_KEPT] = goal.sum()
                row[_AGREE] = (mask == goal).sum()
                row[_TRUE_POS] = (mask & goal).sum()
                if logits is not None:
                    row[_BCE] = F.binary_cross_entropy_with_logits(logits[b].detach().float(), goal.float(), reduction="sum")
            self.sums[b] += torch.stack([v.to(torch.float64) for v in row]) / c
            if self.core is not None:
                always = mask.all(dim=0).cpu()
                self.core[b] = always if self.core[b] is None else self.core[b] & always
                self.distinct[b].add(mask)
        self.has_truth |= truth is not None
        self.has_logits |= logits is not None and truth is not None

    def reduce(self, all_sum: Callable[[torch.Tensor], torch.Tensor]) -> "MaskStats":
        """Sum the counters over processes (``all_sum`` reduces a tensor in place, e.g. Distributed.all_sum)."""
        self.sums = all_sum(self.sums)
        self.totals = all_sum(self.totals)
        return self

    @property
    def samples(self) -> int:
        return int(self.totals[0])

    @property
    def mean_macs(self) -> float:
        return float(self.totals[1]) / max(self.samples, 1)

    def reduction_pct(self, with_heads: bool = False) -> float:
        return float(self.counter.reduction_pct(self.mean_macs, with_heads=with_heads))

    def layers(self) -> list[LayerStats]:
        n = max(self.samples, 1)
        out = []
        for b, (name, channels) in enumerate(zip(self.names, self.channels)):
            kept, truth_kept, agree, true_pos, bce = (self.sums[b] / n).tolist()
            truth = self.has_truth
            out.append(
                LayerStats(
                    name=name,
                    channels=channels,
                    keep_ratio=kept,
                    target_keep_ratio=truth_kept if truth else None,
                    head_accuracy=agree if truth else None,
                    precision=true_pos / kept if truth and kept > 0 else None,
                    recall=true_pos / truth_kept if truth and truth_kept > 0 else None,
                    head_bce=bce if self.has_logits else None,
                    clusters=len(self.distinct[b]) if self.distinct is not None else None,
                    core_fraction=(
                        float(self.core[b].float().mean()) if self.core is not None and self.core[b] is not None else None
                    ),
                )
            )
        return out
