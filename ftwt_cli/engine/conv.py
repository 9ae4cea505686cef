"""One conv step of the engine: a conv's geometry, its decision head, and the mutable per-call state
(prototypes and their sub-convs, cache, counters, masks seen, the per-layer choice), with its paths.

Paths for a regular conv whose layer runs sparse:

* ``proto``: the cheapest prototype covering the head's mask (:mod:`~ftwt_cli.engine.prototypes`) runs
  its pre-sliced sub-conv on the compact input; its extra channels are zeroed;
* per call, for masks no prototype covers (chosen by :func:`cost.choose` under ``strategy="auto"``):
  ``slice`` (weights sliced to kept filters × active inputs, cached by both masks), ``rows`` (sliced to
  the kept filters, on the zero-filled input), ``dense`` (the full conv, then the kept filters), ``core``
  (a static core fitted on sample images, :mod:`~ftwt_cli.engine.core`).

A layer whose sparse paths measured slower than its dense conv (:mod:`~ftwt_cli.engine.choice`) has
``sparse = False`` and always runs ``dense``; its head still decides which filters are kept, so the
result is the same. A depthwise conv computes only the kept channels whose input is active; the others
are the constant folded bias. Batches run through :mod:`~ftwt_cli.engine.batched`.
"""

from __future__ import annotations

import numpy as np
import torch

from ftwt_cli.core.gating import GatedBlock
from ftwt_cli.core.heads import DecisionHead
from ftwt_cli.engine import cost, percall
from ftwt_cli.engine.cache import WeightCache
from ftwt_cli.engine.compact import Compact, all_channels, put_channels, take_channels, zeros_like_format
from ftwt_cli.engine.core import StaticCore, fit
from ftwt_cli.engine.geometry import ConvGeometry
from ftwt_cli.engine.heads import EngineHead
from ftwt_cli.engine.prototypes import Prototypes
from ftwt_cli.engine.subconv import EngineMemory, SubConv

#: Conv strategies for masks no prototype covers (``build_engine(strategy=...)``): "auto" picks per call
#: from the cost model; "core" needs :meth:`SparseEngine.fit_layout` (it falls back to "slice" where the
#: core cannot serve).
STRATEGIES = ("auto", "slice", "rows", "dense", "core")

#: Per-path call counters kept by every step.
COUNTERS = ("proto", "proto_built", "uncovered", "over_cap", "slice_hit", "slice_miss", "rows_hit", "rows_miss", "dense", "core", "core_extra")

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
        memory: EngineMemory | None = None,
        block: GatedBlock | None = None,
    ):
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        self.geometry = g = geometry
        self.name, self.key = g.name, g.key
        self.head = None if head is None else EngineHead(head, block)
        gather = cost.GATHER_COST_MACS if gather_cost_macs is None else gather_cost_macs
        self.gather_cost = gather / (g.out_hw[0] * g.out_hw[1])  # per weight float, relative to its MACs
        self.cache = cache
        self.memory = memory if memory is not None else EngineMemory(0.0)
        self.strategy = strategy
        self.sparse = True  # False: always the dense conv (set by the per-layer choice)
        self.costs: dict[str, float] | None = None  # set by calibrate()
        self.last_mask: np.ndarray | None = None  # the kept-output mask of the last sample
        self.last_masks: np.ndarray | None = None  # every sample's of the last batch (batched runs)
        self.counts = dict.fromkeys(COUNTERS, 0)
        self.extra_macs = 0  # MACs computed for channels a prototype adds to the mask (then zeroed)
        # The whole conv (every filter, every input), laid out and timed like the sub-convs.
        self.full = SubConv(g, all_channels(g.out_channels)[0], all_channels(g.in_per_group)[0], share_full=True) if g.regular else None
        self.prototypes: Prototypes | None = None
        self.subconvs: dict[tuple[int, bytes], SubConv] = {}
        self.pair_counts: dict[tuple[int, bytes], int] | None = None  # while fitting: how often each pair ran
        self.channels_last = False
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
        """The conv's output for input ``x`` (batch 1), keeping the filters in ``mask`` (None: all)."""
        g = self.geometry
        if self.channels_last and x.values.dim() == 4 and not x.values.is_contiguous(memory_format=torch.channels_last):
            x = x.with_values(x.values.contiguous(memory_format=torch.channels_last))  # the input image, once
        if self.prototypes is not None and self.sparse and mask is not None and (g.regular or g.depthwise) and not mask.all():
            k = self.prototypes.cover_one(mask)
            if k >= 0:
                y = self.covered(x, mask[None], k)
                if y is not None:
                    return y
            else:
                self.counts["uncovered"] += 1
        if g.depthwise:
            return self._depthwise(x, mask)
        if g.groups != 1:  # general grouped conv: dense, keep the selected filters
            y = g.conv(x.dense(), g.weight, g.bias, g.groups)
            return Compact.of(y) if mask is None else Compact.from_mask(take_channels(y, torch.from_numpy(np.flatnonzero(mask))), mask)
        if mask is None:
            oidx, toidx, mask, okey = all_channels(g.out_channels)
        else:
            oidx = np.flatnonzero(mask)
            toidx, okey = torch.from_numpy(oidx), None
        ko, ki = oidx.size, x.idx.size
        if ko == 0 or ki == 0:  # no filter to compute, or only the bias over the whole map
            values = g.bias[toidx].view(1, ko, 1, 1).expand(x.values.shape[0], ko, *g.out_hw)
            values = values.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
            return Compact(values, oidx, toidx, mask, g.out_channels, okey)
        full_in = ki == g.in_per_group
        if ko == g.out_channels and full_in:
            y = self.full.run(x.values)
        elif not self.sparse:
            self.counts["dense"] += 1
            y = self._dense(x, ko, toidx)
        else:
            y = self._sparse(x, mask, oidx, toidx, okey, ko, ki, full_in)
        return Compact(y, oidx, toidx, mask, g.out_channels, okey)

    # -- prototypes -----------------------------------------------------------------------------
    def covered(self, x: Compact, masks: np.ndarray, k: int) -> Compact | None:
        """Prototype ``k``'s sub-conv on ``x`` (n images whose masks [n, C] it covers), the channels
        outside each mask zeroed; None when that sub-conv is not built and the memory cap forbids it."""
        table = self.prototypes
        pair = (k, x.key)
        sub = self.subconvs.get(pair)
        if sub is None:
            sub = self.build(k, x)
            if sub is None:
                self.counts["over_cap"] += len(masks)
                return None
        if self.pair_counts is not None:
            self.pair_counts[pair] = self.pair_counts.get(pair, 0) + len(masks)
        self.counts["proto"] += len(masks)
        y = sub.run(x.values)
        idx = table.idx[k]
        # A prototype holds every channel of its masks: the same count means the same set, nothing to zero.
        extra = idx.size * len(masks) - int(np.count_nonzero(masks))
        if extra:  # the prototype's channels a mask drops: zero, as the gated model's y · mask does
            keep = masks[:, idx]
            y = y.mul_(torch.from_numpy(keep.astype(np.float32)).view(*keep.shape, 1, 1))
            self.extra_macs += extra * sub.macs_per_channel
        return Compact(y, idx, table.tidx[k], table.sets[k], self.geometry.out_channels, table.keys[k])

    def build(self, k: int, x: Compact) -> SubConv | None:
        """Slice prototype ``k`` × the input channels of ``x`` once, if the memory cap allows."""
        sub = SubConv(self.geometry, self.prototypes.idx[k], x.idx)
        sub.prepare(self.channels_last, choose_kernel=False)
        if not self.memory.take(sub.nbytes):
            return None
        self.counts["proto_built"] += 1
        self.subconvs[(k, x.key)] = sub
        return sub

    def set_prototypes(self, table: Prototypes | None) -> None:
        """Install (or with None, remove) this conv's prototype sets; their sub-convs are built on use."""
        self.drop_subconvs(list(self.subconvs))
        self.prototypes = table

    def drop_subconvs(self, pairs) -> None:
        for pair in pairs:
            self.memory.give(self.subconvs.pop(pair).nbytes)

    def prepare(self, channels_last: bool, choose_kernels: bool = True) -> None:
        """Lay out every sub-conv (and the full conv) for the memory format; time their kernels."""
        self.channels_last = channels_last
        for sub in [self.full, *self.subconvs.values()]:
            if sub is not None:
                sub.prepare(channels_last, choose_kernels)

    # -- the per-call paths ---------------------------------------------------------------------
    def _dense(self, x: Compact, ko: int, toidx: torch.Tensor) -> torch.Tensor:
        y = self.full.run(x.dense())  # a regular conv (depthwise and grouped ones have their own)
        return y if ko == self.geometry.out_channels else take_channels(y, toidx)

    def _sparse(self, x: Compact, mask, oidx, toidx, okey, ko: int, ki: int, full_in: bool) -> torch.Tensor:
        return percall.sparse(self, x, mask, oidx, toidx, okey, ko, ki, full_in)

    def _on_onednn(self, ki: int) -> bool:
        return percall.on_onednn(self.geometry, ki)

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
            return Compact(y if oidx.size == x.width else take_channels(y, toidx), oidx, toidx, out_mask, x.width, okey)
        computed = out_mask & x.mask
        # Kept channels whose input is inactive see only zero padding: their map is the folded bias.
        values = zeros_like_format(x.values, (x.values.shape[0], oidx.size, *g.out_hw))
        values += g.bias[toidx].view(1, -1, 1, 1)
        channels = np.flatnonzero(computed)
        if channels.size:
            tch = torch.from_numpy(channels)
            inputs = take_channels(x.values, torch.from_numpy(np.searchsorted(x.idx, channels)))
            y = g.conv(inputs, g.weight.index_select(0, tch), g.bias.index_select(0, tch), channels.size)
            if channels.size == oidx.size:
                values = y
            else:
                values = put_channels(values, torch.from_numpy(np.searchsorted(oidx, channels)), y)
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
