"""One conv step of the engine: a conv's geometry, its decision head, and the mutable per-call state
(cache, counters, masks seen, the per-layer choice), with its execution paths.

Paths for a regular conv (chosen per call by :func:`cost.choose` under ``strategy="auto"``):

* ``slice``: weights sliced to kept filters × active inputs (cached by both masks), run on the compact input;
* ``rows``: weights sliced to the kept filters only (contiguous rows, cached by the output mask), run on
  the zero-filled input;
* ``dense``: the full conv on the zero-filled input, then the kept filters are selected;
* ``core``: a static core fitted on sample images (see :mod:`ftwt_cli.engine.core`).

A layer whose sparse paths measured slower than its dense conv (:mod:`ftwt_cli.engine.choice`) has
``sparse = False`` and always runs ``dense``; its head still decides which filters are kept, so the
result is the same. A depthwise conv computes only the kept channels whose input is active; the others
are the constant folded bias.
"""

from __future__ import annotations

import numpy as np
import torch

from ftwt_cli.core.heads import DecisionHead
from ftwt_cli.engine import cost
from ftwt_cli.engine.cache import WeightCache
from ftwt_cli.engine.compact import Compact, all_channels
from ftwt_cli.engine.core import StaticCore, fit, run_core
from ftwt_cli.engine.geometry import ConvGeometry
from ftwt_cli.engine.heads import EngineHead

#: Conv strategies (``build_engine(strategy=...)``): "auto" picks per call from the cost model;
#: "core" needs :meth:`SparseEngine.fit_layout` (it falls back to "slice" where the core cannot serve).
STRATEGIES = ("auto", "slice", "rows", "dense", "core")

#: Per-path call counters kept by every step.
COUNTERS = ("slice_hit", "slice_miss", "rows_hit", "rows_miss", "dense", "core", "core_extra")


class ConvStep:
    """A BN-folded conv (its :class:`ConvGeometry`), optionally gated by a decision head that runs on the
    conv's input, and what its calls have seen."""

    def __init__(
        self,
        geometry: ConvGeometry,
        head: DecisionHead | None,
        cache: WeightCache,
        strategy: str = "auto",
        gather_cost_macs: float | None = None,
    ):
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        self.geometry = g = geometry
        self.name, self.key = g.name, g.key
        self.head = None if head is None else EngineHead(head)
        gather = cost.GATHER_COST_MACS if gather_cost_macs is None else gather_cost_macs
        self.gather_cost = gather / (g.out_hw[0] * g.out_hw[1])  # per weight float, relative to its MACs
        self.cache = cache
        self.strategy = strategy
        self.sparse = True  # False: always the dense conv (set by the per-layer choice)
        self.costs: dict[str, float] | None = None  # set by calibrate()
        self.last_mask: np.ndarray | None = None  # the kept-output mask of the last sample
        self.counts = dict.fromkeys(COUNTERS, 0)
        self.core: StaticCore | None = None  # set by fit_core()
        self.probe = None  # optional callable(step, input Compact, output Compact), e.g. latency.kernel_floor
        self.repeats = self.lookups = 0  # how often this layer's (output, input) masks come back
        self.seen_keys: set[tuple] = set()
        self.seen: list[tuple[np.ndarray | None, np.ndarray]] | None = None  # (out mask, in mask) while fitting
        self.samples: list[tuple[Compact, np.ndarray | None]] | None = None  # (input, out mask) while measuring

    # -- the head -------------------------------------------------------------------------------
    def output_mask(self, x: Compact) -> np.ndarray | None:
        return None if self.head is None else self.head.output_mask(x)

    # -- the conv -------------------------------------------------------------------------------
    def __call__(self, x: Compact) -> Compact:
        mask = self.output_mask(x)
        self.last_mask = mask
        if self.seen is not None:
            self.seen.append((mask, x.mask))
        if self.samples is not None:
            self.samples.append((x, mask))
        y = self.compute(x, mask)
        if self.probe is not None:
            self.probe(self, x, y)
        return y

    def compute(self, x: Compact, mask: np.ndarray | None) -> Compact:
        """The conv's output for input ``x``, keeping the filters in ``mask`` (None: all)."""
        g = self.geometry
        if g.depthwise:
            return self._depthwise(x, mask)
        if g.groups != 1:  # general grouped conv: dense, keep the selected filters
            y = g.conv(x.dense(), g.weight, g.bias, g.groups)
            return Compact.of(y) if mask is None else Compact.from_mask(y[:, torch.from_numpy(mask)], mask)
        if mask is None:
            oidx, toidx, mask, okey = all_channels(g.out_channels)
        else:
            oidx = np.flatnonzero(mask)
            toidx, okey = torch.from_numpy(oidx), None
        ko, ki = oidx.size, x.idx.size
        if ko == 0 or ki == 0:  # no filter to compute, or only the bias over the whole map
            values = g.bias[toidx].view(1, ko, 1, 1).expand(1, ko, *g.out_hw).contiguous()
            return Compact(values, oidx, toidx, mask, g.out_channels, okey)
        full_in = ki == g.in_per_group
        if ko == g.out_channels and full_in:
            y = g.conv(x.values, g.weight, g.bias)
        elif not self.sparse:
            self.counts["dense"] += 1
            y = self._dense(x, ko, toidx)
        else:
            y = self._sparse(x, mask, oidx, toidx, okey, ko, ki, full_in)
        return Compact(y, oidx, toidx, mask, g.out_channels, okey)

    def _dense(self, x: Compact, ko: int, toidx: torch.Tensor) -> torch.Tensor:
        g = self.geometry
        y = g.conv(x.dense(), g.weight, g.bias)
        return y if ko == g.out_channels else y.index_select(1, toidx)

    def _sparse(self, x: Compact, mask, oidx, toidx, okey, ko: int, ki: int, full_in: bool) -> torch.Tensor:
        g = self.geometry
        cache, strategy = self.cache, self.strategy
        if okey is None and cache.budget > 0:
            okey = mask.tobytes()
        key = (self.key, okey, x.key) if cache.budget > 0 else None
        sliced = None if key is None or strategy in ("rows", "dense", "core") else cache.lookup(key)
        if key is not None:  # how often this layer's masks repeat, whichever path served them
            self.lookups += 1
            if key in self.seen_keys:
                self.repeats += 1
            elif len(self.seen_keys) < 4096:
                self.seen_keys.add(key)
        if sliced is not None:
            self.counts["slice_hit"] += 1
            return self._run_sliced(x, sliced, ko)
        core = self.core if self.core is not None and self.core.serves(x) else None
        if strategy == "core":
            if core is not None:
                return run_core(g, x, oidx, ko, ki, core, self.counts)
            strategy = "slice"  # an input outside the core is active: the core cannot serve this call
        if strategy == "auto":
            # A slice is stored and reused when the masks repeat: the chance they do not.
            fresh = 1.0 - (self.repeats + 1) / (self.lookups + 2) if cache.budget > 0 else 1.0
            rows_cached = key is not None and (self.key, okey) in cache.entries
            strategy = cost.choose(g, self.costs, fresh, self.gather_cost, rows_cached, ko, ki, mask, core)
            if strategy == "core":
                return run_core(g, x, oidx, ko, ki, core, self.counts)
        if strategy == "slice":
            self.counts["slice_miss"] += 1
            sliced = self._slice(x, oidx, toidx, ko, ki, full_in)
            if key is not None:
                cache.store(key, sliced)
            return self._run_sliced(x, sliced, ko)
        if strategy == "rows":
            row_key = (self.key, okey) if key is not None else None
            sliced = None if row_key is None else cache.lookup(row_key, count=False)
            if sliced is None:
                self.counts["rows_miss"] += 1
                sliced = (g.filters.index_select(0, toidx).view(ko, *g.weight.shape[1:]), g.bias.index_select(0, toidx))
                if row_key is not None:
                    cache.store(row_key, sliced)
            else:
                self.counts["rows_hit"] += 1
            return g.conv(x.dense(), *sliced)
        self.counts["dense"] += 1
        return self._dense(x, ko, toidx)

    def _slice(self, x: Compact, oidx, toidx, ko: int, ki: int, full_in: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, bias) of the kept filters × active inputs, zero-padded up to the shape buckets."""
        g = self.geometry
        O, I = g.out_channels, g.in_per_group
        po = min(O, -(-ko // g.bucket_out) * g.bucket_out)
        pi = min(I, -(-ki // g.bucket_in) * g.bucket_in)
        if po == ko and pi == ki:
            if full_in:
                weight = g.filters.index_select(0, toidx).view(ko, *g.weight.shape[1:])
            else:
                rows = (oidx[:, None] * I + x.idx[None, :]).ravel()
                weight = g.rows.index_select(0, torch.from_numpy(rows)).view(ko, ki, *g.weight.shape[2:])
            return weight, g.bias.index_select(0, toidx)
        rows = np.full((po, pi), O * I, dtype=np.int64)  # the zero row
        rows[:ko, :ki] = oidx[:, None] * I + x.idx[None, :]
        weight = g.rows.index_select(0, torch.from_numpy(rows.ravel())).view(po, pi, *g.weight.shape[2:])
        bias_idx = np.concatenate([oidx, np.full(po - ko, O, dtype=np.int64)])
        return weight, g.padded_bias.index_select(0, torch.from_numpy(bias_idx))

    def _run_sliced(self, x: Compact, sliced: tuple[torch.Tensor, torch.Tensor], ko: int) -> torch.Tensor:
        """The sliced conv on the compact input (zero channels appended up to the weight's inputs);
        the padding filters' outputs are cut off (a contiguous view at batch 1)."""
        g = self.geometry
        weight, bias = sliced
        values = x.values
        if weight.shape[1] != values.shape[1]:
            padded = values.new_zeros((1, weight.shape[1], *values.shape[2:]))
            padded[:, : values.shape[1]] = values
            values = padded
        y = g.conv(values, weight, bias)
        return y if y.shape[1] == ko else y[:, :ko]

    def _depthwise(self, x: Compact, mask: np.ndarray | None) -> Compact:
        g = self.geometry
        if mask is None:
            oidx, toidx, out_mask, okey = all_channels(x.width)
        else:
            out_mask, okey = mask, None
            oidx = np.flatnonzero(mask)
            toidx = torch.from_numpy(oidx)
        if not self.sparse:
            self.counts["dense"] += 1
            y = g.conv(x.dense(), g.weight, g.bias, g.groups)
            return Compact(y if oidx.size == x.width else y.index_select(1, toidx), oidx, toidx, out_mask, x.width, okey)
        computed = out_mask & x.mask
        # Kept channels whose input is inactive see only zero padding: their map is the folded bias.
        values = g.bias[toidx].view(1, -1, 1, 1).expand(1, oidx.size, *g.out_hw).clone()
        channels = np.flatnonzero(computed)
        if channels.size:
            tch = torch.from_numpy(channels)
            inputs = x.values.index_select(1, torch.from_numpy(np.searchsorted(x.idx, channels)))
            y = g.conv(inputs, g.weight.index_select(0, tch), g.bias.index_select(0, tch), channels.size)
            values.index_copy_(1, torch.from_numpy(np.searchsorted(oidx, channels)), y)
        return Compact(values, oidx, toidx, out_mask, x.width, okey)

    # -- fitting --------------------------------------------------------------------------------
    def calibrate(self, reps: int = 3) -> dict[str, float]:
        """Time this conv on this machine; the cost model then chooses paths from those timings."""
        self.costs = cost.calibrate(self.geometry, reps)
        return self.costs

    def fit_core(self, threshold: float | None = None) -> None:
        """Build the core from the masks seen since ``seen`` was set (see :meth:`SparseEngine.fit_layout`)."""
        seen, self.seen = self.seen, None
        self.core = fit(self.geometry, self.costs, seen or [], threshold)
