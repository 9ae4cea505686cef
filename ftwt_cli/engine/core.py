"""Static cores: per layer, the often-kept filters × the ever-active inputs, stored contiguously.

Fitted on sample images (:meth:`SparseEngine.fit_layout`), a core serves a call without gathering
weights; kept filters outside it are sliced and merged, and a call with an active input outside it
uses the other paths, so results stay exact.
"""

from __future__ import annotations

import numpy as np
import torch

from ftwt_cli.engine.compact import Compact, put_channels, take_channels, zeros_like_format
from ftwt_cli.engine.cost import best_threshold
from ftwt_cli.engine.geometry import ConvGeometry


class StaticCore:
    """A layer's static core: weights of the often-kept filters × the ever-active inputs, stored contiguously."""

    def __init__(self, g: ConvGeometry, out_mask: np.ndarray, in_mask: np.ndarray) -> None:
        self.out_mask, self.in_missing = out_mask, ~in_mask
        self.out_idx, self.in_idx = np.flatnonzero(out_mask), np.flatnonzero(in_mask)
        self.out_pos = np.cumsum(out_mask) - 1  # channel -> position in the core (valid where in the core)
        self.in_pos = np.cumsum(in_mask) - 1
        w = g.weight.index_select(0, torch.from_numpy(self.out_idx)).index_select(1, torch.from_numpy(self.in_idx))
        self.weight = w.contiguous()
        self.bias = g.bias.index_select(0, torch.from_numpy(self.out_idx)).contiguous()
        self.macs = self.out_idx.size * self.in_idx.size / (out_mask.size * in_mask.size)  # fraction of dense MACs

    def serves(self, x: Compact) -> bool:
        """Whether every active input of ``x`` is inside the core."""
        return x.idx.size <= self.in_idx.size and not (x.mask & self.in_missing).any()


def fit(
    g: ConvGeometry, costs: dict | None, seen: list[tuple[np.ndarray | None, np.ndarray]], threshold: float | None = None
) -> StaticCore | None:
    """The core of conv ``g`` from the (output mask, input mask) pairs it saw, or None; ``costs``
    (the layer's calibrated cost model, if any) choose the threshold when none is given."""
    if not seen or g.depthwise or g.groups != 1:
        return None
    in_mask = np.mean([m for _, m in seen], axis=0) > 0
    if seen[0][0] is None:
        out_mask = np.ones(g.out_channels, dtype=bool)
    else:
        outs = np.stack([m for m, _ in seen])
        freq = outs.mean(axis=0)
        if threshold is None:
            threshold = best_threshold(g, costs, outs, freq, in_mask, np.array([m.sum() for _, m in seen]))
        out_mask = freq >= threshold
    if not out_mask.any() or not in_mask.any():
        return None
    return StaticCore(g, out_mask, in_mask)


def run_core(
    g: ConvGeometry, x: Compact, oidx: np.ndarray, ko: int, ki: int, core: StaticCore, counts: dict[str, int]
) -> torch.Tensor:
    """Conv with the core's weights, then select; kept filters outside the core come from a small
    slice and are merged by position."""
    counts["core"] += 1
    if ki == core.in_idx.size:
        xc = x.values
    else:
        xc = zeros_like_format(x.values, (x.values.shape[0], core.in_idx.size, *x.values.shape[2:]))
        put_channels(xc, torch.from_numpy(core.in_pos[x.idx]), x.values)
    yc = g.conv(xc, core.weight, core.bias)
    in_core = core.out_mask[oidx]  # which kept filters the core computed
    n_core = int(np.count_nonzero(in_core))
    if n_core == core.out_idx.size and n_core == ko:
        return yc
    if n_core == ko:
        return take_channels(yc, torch.from_numpy(core.out_pos[oidx]))
    counts["core_extra"] += 1
    extra = oidx[~in_core]
    rows = (extra[:, None] * g.in_per_group + x.idx[None, :]).ravel()
    weight = g.rows.index_select(0, torch.from_numpy(rows)).view(extra.size, ki, *g.weight.shape[2:])
    ye = g.conv(x.values, weight, g.bias.index_select(0, torch.from_numpy(extra)))
    out = zeros_like_format(yc, (yc.shape[0], ko, *yc.shape[2:]))
    if n_core:
        core_kept = oidx[in_core]
        put_channels(out, torch.from_numpy(np.flatnonzero(in_core)), take_channels(yc, torch.from_numpy(core.out_pos[core_kept])))
    put_channels(out, torch.from_numpy(np.flatnonzero(~in_core)), ye)
    return out
