"""One BN-folded conv step of the engine: its decision head (in numpy) and its execution paths.

Paths for a regular conv (chosen per call by :func:`cost.choose` under ``strategy="auto"``):

* ``slice``: weights sliced to kept filters × active inputs (cached by both masks), run on the compact input;
* ``rows``: weights sliced to the kept filters only (contiguous rows, cached by the output mask), run on
  the zero-filled input;
* ``dense``: the full conv on the zero-filled input, then the kept filters are selected;
* ``core``: a static core fitted on sample images (see :mod:`ftwt_cli.engine.core`).

A layer whose sparse paths measured slower than its dense conv (:mod:`ftwt_cli.engine.fallback`) has
``sparse = False`` and always runs ``dense``; its head still decides which filters are kept, so the
result is the same. A depthwise conv computes only the kept channels whose input is active; the others
are the constant folded bias.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from ftwt_cli.engine import cost
from ftwt_cli.engine.cache import WeightCache
from ftwt_cli.engine.compact import Compact, all_channels
from ftwt_cli.engine.core import StaticCore, fit, run_core
from ftwt_cli.gating import DecisionHead

#: Conv strategies (``build_engine(strategy=...)``): "auto" picks per call from the cost model;
#: "core" needs :meth:`SparseEngine.fit_layout` (it falls back to "slice" where the core cannot serve).
STRATEGIES = ("auto", "slice", "rows", "dense", "core")

#: Sliced conv shapes per channel dimension (0: exact shapes, no padding); see ConvStep.__init__.
SHAPE_BUCKETS = 8

#: Per-path call counters kept by every step.
COUNTERS = ("slice_hit", "slice_miss", "rows_hit", "rows_miss", "dense", "core", "core_extra")


def unroll_head(head: DecisionHead) -> tuple[bool, bool, np.ndarray, np.ndarray]:
    """A DecisionHead as numpy (softmax?, average pool?, weight, bias): pooling → softmax → affine map.

    The affine map is :meth:`DecisionHead.folded`: the 1×1 conv with the head's input norm (running
    statistics) and its calibration offset folded in, so the engine decides exactly as the gated model.
    """
    w, b = (t.to(torch.float32).numpy().copy() for t in head.folded())
    return bool(head.softmax), head.pool == "avg", w, b


class ConvStep:
    """A BN-folded conv, optionally gated by a decision head that runs on the conv's input."""

    def __init__(
        self,
        conv: nn.Conv2d,
        bn: nn.BatchNorm2d | None,
        head: nn.Module | None,
        in_shape,
        out_hw,
        cache: WeightCache,
        key: int,
        strategy: str = "auto",
        name: str = "",
        gather_cost_macs: float | None = None,
    ):
        if bn is not None:
            weight, bias = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
        else:
            weight = conv.weight
            bias = conv.bias if conv.bias is not None else torch.zeros(conv.out_channels, dtype=conv.weight.dtype)
        weight, bias = weight.detach(), bias.detach()
        self.kernel = weight[0, 0].numel()
        # Out-major weights followed by one zero kernel: a slice is one gather of kh·kw runs, and a
        # padding row (index out · in) gathers zeros.
        flat = weight.new_zeros(weight.numel() + self.kernel)
        flat[: weight.numel()] = weight.reshape(-1)
        self.weight = flat[: weight.numel()].view(weight.shape)
        self.rows = flat.view(-1, self.kernel)  # [out · in + 1, kh · kw]
        self.filters = self.weight.view(self.weight.shape[0], -1)  # [out, in · kh · kw]
        self.padded_bias = torch.cat([bias, bias.new_zeros(1)])  # index out: a padding filter's zero bias
        self.bias = self.padded_bias[:-1]
        self.out_channels, self.in_per_group = self.weight.shape[:2]
        # Sliced convs get shapes rounded up to one of SHAPE_BUCKETS sizes per channel dimension (zero
        # filters / zero inputs pad them): oneDNN builds a kernel per new shape, which costs about as
        # much as the conv itself, and per-sample masks would otherwise make nearly every shape new.
        self.bucket_out = max(8, self.out_channels // SHAPE_BUCKETS) if SHAPE_BUCKETS else 1
        self.bucket_in = max(8, self.in_per_group // SHAPE_BUCKETS) if SHAPE_BUCKETS else 1
        self.groups = conv.groups
        self.depthwise = conv.groups == conv.in_channels == conv.out_channels
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        if conv.padding_mode != "zeros":
            raise NotImplementedError("sparse conv supports zero padding only")
        self.head = None if head is None else unroll_head(head)
        self.name = name
        self.in_shape = tuple(in_shape)
        self.out_hw = tuple(out_hw)
        gather = cost.GATHER_COST_MACS if gather_cost_macs is None else gather_cost_macs
        self.gather_cost = gather / (out_hw[0] * out_hw[1])  # per weight float, relative to its MACs
        self.cache = cache
        self.key = key
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        self.strategy = strategy
        self.sparse = True  # False: always the dense conv (set by the per-layer fallback)
        self.costs: dict[str, float] | None = None  # set by cost.calibrate()
        self.last_mask: np.ndarray | None = None  # the kept-output mask of the last sample
        self.counts = dict.fromkeys(COUNTERS, 0)
        self.core: StaticCore | None = None  # set by fit_core()
        self.probe = None  # optional callable(step, input Compact, output Compact), e.g. latency.kernel_floor
        self.repeats = self.lookups = 0  # how often this layer's (output, input) masks come back
        self.seen_keys: set[tuple] = set()
        self.seen: list[tuple[np.ndarray | None, np.ndarray]] | None = None  # (out mask, in mask) while fitting
        self.samples: list[tuple[Compact, np.ndarray | None]] | None = None  # (input, out mask) while measuring

    @property
    def macs(self) -> int:
        """Dense MACs of this conv for one image."""
        return self.weight.numel() * self.out_hw[0] * self.out_hw[1]

    # -- the head -------------------------------------------------------------------------------
    def output_mask(self, x: Compact) -> np.ndarray | None:
        if self.head is None:
            return None
        softmax, average, w, b = self.head
        pooled = np.zeros(x.width, dtype=np.float32)
        if x.idx.size:  # the pool of a missing channel is 0
            values = x.values.mean(dim=(2, 3)) if average else x.values.amax(dim=(2, 3))
            pooled[x.idx] = values.numpy()[0]
        if softmax:
            pooled = np.exp(pooled - pooled.max())
            pooled /= pooled.sum()
        return (np.dot(w, pooled) + b) > 0  # binarize's rule: sigmoid(logit) > 0.5

    # -- the conv -------------------------------------------------------------------------------
    def conv(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int = 1) -> torch.Tensor:
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, groups)

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
        if self.depthwise:
            return self._depthwise(x, mask)
        if self.groups != 1:  # general grouped conv: dense, keep the selected filters
            y = self.conv(x.dense(), self.weight, self.bias, self.groups)
            return Compact.of(y) if mask is None else Compact.from_mask(y[:, torch.from_numpy(mask)], mask)
        if mask is None:
            oidx, toidx, mask, okey = all_channels(self.out_channels)
        else:
            oidx = np.flatnonzero(mask)
            toidx, okey = torch.from_numpy(oidx), None
        ko, ki = oidx.size, x.idx.size
        if ko == 0 or ki == 0:  # no filter to compute, or only the bias over the whole map
            values = self.bias[toidx].view(1, ko, 1, 1).expand(1, ko, *self.out_hw).contiguous()
            return Compact(values, oidx, toidx, mask, self.out_channels, okey)
        full_in = ki == self.in_per_group
        if ko == self.out_channels and full_in:
            y = self.conv(x.values, self.weight, self.bias)
        elif not self.sparse:
            self.counts["dense"] += 1
            y = self._dense(x, ko, toidx)
        else:
            y = self._sparse(x, mask, oidx, toidx, okey, ko, ki, full_in)
        return Compact(y, oidx, toidx, mask, self.out_channels, okey)

    def _dense(self, x: Compact, ko: int, toidx: torch.Tensor) -> torch.Tensor:
        y = self.conv(x.dense(), self.weight, self.bias)
        return y if ko == self.out_channels else y.index_select(1, toidx)

    def _sparse(self, x: Compact, mask, oidx, toidx, okey, ko: int, ki: int, full_in: bool) -> torch.Tensor:
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
                return run_core(self, x, oidx, ko, ki, core)
            strategy = "slice"  # an input outside the core is active: the core cannot serve this call
        if strategy == "auto":
            strategy = cost.choose(self, ko, ki, (self.key, okey) if key is not None else None, mask, core)
            if strategy == "core":
                return run_core(self, x, oidx, ko, ki, core)
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
                sliced = (self.filters.index_select(0, toidx).view(ko, *self.weight.shape[1:]), self.bias.index_select(0, toidx))
                if row_key is not None:
                    cache.store(row_key, sliced)
            else:
                self.counts["rows_hit"] += 1
            return self.conv(x.dense(), *sliced)
        self.counts["dense"] += 1
        return self._dense(x, ko, toidx)

    def _slice(self, x: Compact, oidx, toidx, ko: int, ki: int, full_in: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, bias) of the kept filters × active inputs, zero-padded up to the shape buckets."""
        O, I = self.out_channels, self.in_per_group
        po = min(O, -(-ko // self.bucket_out) * self.bucket_out)
        pi = min(I, -(-ki // self.bucket_in) * self.bucket_in)
        if po == ko and pi == ki:
            if full_in:
                weight = self.filters.index_select(0, toidx).view(ko, *self.weight.shape[1:])
            else:
                rows = (oidx[:, None] * I + x.idx[None, :]).ravel()
                weight = self.rows.index_select(0, torch.from_numpy(rows)).view(ko, ki, *self.weight.shape[2:])
            return weight, self.bias.index_select(0, toidx)
        rows = np.full((po, pi), O * I, dtype=np.int64)  # the zero row
        rows[:ko, :ki] = oidx[:, None] * I + x.idx[None, :]
        weight = self.rows.index_select(0, torch.from_numpy(rows.ravel())).view(po, pi, *self.weight.shape[2:])
        bias_idx = np.concatenate([oidx, np.full(po - ko, O, dtype=np.int64)])
        return weight, self.padded_bias.index_select(0, torch.from_numpy(bias_idx))

    def _run_sliced(self, x: Compact, sliced: tuple[torch.Tensor, torch.Tensor], ko: int) -> torch.Tensor:
        """The sliced conv on the compact input (zero channels appended up to the weight's inputs);
        the padding filters' outputs are cut off (a contiguous view at batch 1)."""
        weight, bias = sliced
        values = x.values
        if weight.shape[1] != values.shape[1]:
            padded = values.new_zeros((1, weight.shape[1], *values.shape[2:]))
            padded[:, : values.shape[1]] = values
            values = padded
        y = self.conv(values, weight, bias)
        return y if y.shape[1] == ko else y[:, :ko]

    def _depthwise(self, x: Compact, mask: np.ndarray | None) -> Compact:
        if mask is None:
            oidx, toidx, out_mask, okey = all_channels(x.width)
        else:
            out_mask, okey = mask, None
            oidx = np.flatnonzero(mask)
            toidx = torch.from_numpy(oidx)
        if not self.sparse:
            self.counts["dense"] += 1
            y = self.conv(x.dense(), self.weight, self.bias, self.groups)
            return Compact(y if oidx.size == x.width else y.index_select(1, toidx), oidx, toidx, out_mask, x.width, okey)
        computed = out_mask & x.mask
        # Kept channels whose input is inactive see only zero padding: their map is the folded bias.
        values = self.bias[toidx].view(1, -1, 1, 1).expand(1, oidx.size, *self.out_hw).clone()
        channels = np.flatnonzero(computed)
        if channels.size:
            tch = torch.from_numpy(channels)
            inputs = x.values.index_select(1, torch.from_numpy(np.searchsorted(x.idx, channels)))
            y = self.conv(inputs, self.weight.index_select(0, tch), self.bias.index_select(0, tch), channels.size)
            values.index_copy_(1, torch.from_numpy(np.searchsorted(oidx, channels)), y)
        return Compact(values, oidx, toidx, out_mask, x.width, okey)

    # -- fitting --------------------------------------------------------------------------------
    def calibrate(self, reps: int = 3) -> dict[str, float]:
        return cost.calibrate(self, reps)

    def fit_core(self, threshold: float | None = None) -> None:
        """Build the core from the masks seen since ``seen`` was set (see :meth:`SparseEngine.fit_layout`)."""
        seen, self.seen = self.seen, None
        self.core = fit(self, seen or [], threshold)
