"""FLOPs (MAC) accounting for dense and dynamically pruned models.

Dense MACs count conv and linear layers only (BN, activations and pooling count 0, as in the paper).
Dynamic MACs are per sample: a conv costs Σ over groups of (active outputs in the group) × (active
inputs in the group) × k_h × k_w × H_out × W_out. Active outputs come from the conv's own block mask;
active inputs from its producer's mask (see graph.py) or all channels. For a standard conv that is
(active out) × (active in) × k·k·H·W; for a depthwise conv an output channel costs k·k·H·W when it and
its input channel are both active.

All functions take per-block *thresholds* (gating.keep_thresholds) and a vector of ratios, so one call
evaluates every r at once; a hard mask is the special case threshold ∈ {0, inf} (see
:func:`thresholds_from_masks`), evaluated at any single ratio.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from ftwt_cli.core.graph import ConvSpec, ModelGraph
from ftwt_cli.core.targets import EPS


def thresholds_from_masks(masks: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Hard masks [N, C] (bool or 0/1) → thresholds: kept channels 0, pruned +inf."""
    return [torch.where(m.detach() > 0, 0.0, math.inf).to(torch.float32) for m in masks]


def ratio_levels(ratios: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """The float32 comparison levels r + EPS used everywhere a threshold is tested against r."""
    return (torch.as_tensor(ratios, dtype=torch.float64) + EPS).to(torch.float32)


def count_kept(thresholds: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Channels with threshold ≤ level, per row: [M, K] × [R] → [M, R] (int64).

    Each threshold is binned by the first level it passes (a search over the few levels, no sort of
    the thresholds); a cumulative histogram over the levels then gives every count at once.
    """
    thresholds = thresholds.contiguous()
    sorted_levels, order = levels.to(thresholds.device, thresholds.dtype).sort()
    first_level = torch.searchsorted(sorted_levels, thresholds)  # len(levels): never kept
    histogram = torch.zeros(thresholds.shape[0], levels.numel() + 1, dtype=torch.int64, device=thresholds.device)
    histogram.scatter_add_(1, first_level, torch.ones_like(first_level))
    counts = histogram[:, :-1].cumsum(dim=1)
    return torch.empty_like(counts).index_copy_(1, order, counts)  # back to the caller's level order


class FlopsCounter:
    """MAC accounting for one analysed model graph."""

    def __init__(self, graph: ModelGraph) -> None:
        self.graph = graph
        self.dense_macs = graph.dense_macs
        self.head_macs = graph.head_macs if graph.head_macs is not None else sum(b.in_channels * b.out_channels for b in graph.blocks)
        self._linear_macs = sum(lin.dense_macs for lin in graph.linears)

    def dynamic_macs(
        self,
        thresholds: Sequence[torch.Tensor],
        ratios: Sequence[float] | torch.Tensor,
        kept: Sequence[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Per-sample MACs without heads, [N, R] float64, for per-block thresholds [N, C_b].

        ``kept`` optionally passes the per-block ``count_kept(thresholds[b], ratio_levels(ratios))``
        a caller already has; otherwise each block's counts are computed once here.
        """
        if len(thresholds) != len(self.graph.blocks):
            raise ValueError(f"expected thresholds for {len(self.graph.blocks)} blocks, got {len(thresholds)}")
        levels = ratio_levels(ratios)
        n = thresholds[0].shape[0] if thresholds else 1
        device = thresholds[0].device if thresholds else torch.device("cpu")
        counts: list[torch.Tensor | None] = list(kept) if kept is not None else [None] * len(thresholds)

        def kept_of(block: int) -> torch.Tensor:
            if counts[block] is None:  # a block feeds its own conv and its consumers: count it once
                counts[block] = count_kept(thresholds[block], levels)
            return counts[block]

        total = torch.full((n, levels.numel()), float(self._linear_macs), dtype=torch.float64, device=device)
        for conv in self.graph.convs:
            total += _conv_macs(conv, thresholds, kept_of, levels, n, device)
        return total

    def macs_from_masks(self, masks: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per-sample MACs without heads, [N] float64, for the hard masks actually applied."""
        return self.dynamic_macs(thresholds_from_masks(masks), [1.0])[:, 0]

    def reduction_pct(self, macs: torch.Tensor | float, with_heads: bool = False) -> torch.Tensor | float:
        """Percent of dense MACs removed; ``with_heads`` charges the decision heads' MACs."""
        spent = macs + (self.head_macs if with_heads else 0)
        return 100.0 * (1.0 - spent / self.dense_macs)


def _conv_macs(
    conv: ConvSpec,
    thresholds: Sequence[torch.Tensor],
    kept_of: Callable[[int], torch.Tensor],
    levels: torch.Tensor,
    n: int,
    device: torch.device,
) -> torch.Tensor:
    kh, kw = conv.kernel_size
    spatial = kh * kw * conv.out_hw[0] * conv.out_hw[1]
    groups = conv.groups
    out_per_group = conv.out_channels // groups
    in_per_group = conv.in_channels // groups
    r = levels.numel()
    out_b, in_b = conv.block, conv.producer
    if out_b is None and in_b is None:
        return torch.full((n, r), float(conv.dense_macs), dtype=torch.float64, device=device)
    if out_b is None or in_b is None:
        # Only one side is gated: the product over groups factorises into (dense side per group) × count.
        known, dense_per_group = (out_b, in_per_group) if in_b is None else (in_b, out_per_group)
        return kept_of(known).double() * (dense_per_group * spatial)
    if groups == 1:
        return (kept_of(out_b) * kept_of(in_b)).double() * spatial
    out_t, in_t = thresholds[out_b], thresholds[in_b]
    if out_per_group == 1 and in_per_group == 1:
        # Depthwise: a channel is computed when both its output and its input are active.
        return count_kept(torch.maximum(out_t, in_t), levels).double() * spatial
    out_counts = count_kept(out_t.reshape(n * groups, out_per_group), levels).view(n, groups, r)
    in_counts = count_kept(in_t.reshape(n * groups, in_per_group), levels).view(n, groups, r)
    return (out_counts * in_counts).sum(dim=1).double() * spatial
