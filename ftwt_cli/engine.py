"""Sparse inference: compute only the filters an FTWT model's heads keep, from only its active inputs.

:func:`build_engine` turns an :class:`~ftwt_cli.gating.FTWTModel` (or a dense backbone, the identity
case) into a :class:`SparseEngine`. The backbone is traced once with torch.fx (gated blocks as leaves)
and compiled into a flat list of steps that read and write numbered slots (no fx interpreter at run
time). Every step works on a :class:`Compact` activation: the values of the channels that may be
non-zero plus their sorted channel indices. Masked channels are exactly zero in the gated model, so
they are never materialised:

* gated block: the head runs on the block input BEFORE the conv (its global max pool is rebuilt at
  full width, 0 for the missing channels; the small softmax → linear → threshold runs in numpy, which
  costs a fraction of the equivalent chain of tiny torch ops), then the BN-folded conv computes only
  the kept filters. How is chosen per call from a cost model (see :class:`ConvStep`):
  ``slice`` (weights sliced to kept filters × active inputs, cached), ``rows`` (weights sliced to the
  kept filters only: contiguous rows, cached by the output mask alone, run on the zero-filled input) or
  ``dense`` (full conv, then select the kept filters);
* depthwise conv: a kept output channel whose input channel is inactive is the constant folded bias;
* zero-preserving channel-wise layers (activations with f(0) = 0, pooling, dropout, identity, the
  same list graph.py uses for producers) act on the compact values and keep the indices;
* residual adds combine by index; flatten of a 1×1 map and linear layers keep the compact form;
* anything else scatters its inputs to full width and runs unchanged (a dense fallback).

Channel bookkeeping (masks, indices, cache keys) is kept in numpy: one numpy call costs ~1 µs, one
torch call several, and a CIFAR ResNet56 runs ~55 blocks per image.

Batch-1 inputs are the target; a batch runs sample by sample (each sample has its own masks).
"""

from __future__ import annotations

import copy
import functools
import operator
import statistics
import time
from collections import OrderedDict

import numpy as np
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx.node import map_arg
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_conv_bn_weights

from ftwt_cli.gating import FTWTModel, GatedBlock, replace_submodule
from ftwt_cli.graph import is_zero_preserving, analyze

#: Conv strategies (``build_engine(strategy=...)``): "auto" picks per call from the cost model;
#: "core" needs :meth:`SparseEngine.fit_layout` (it falls back to "slice" where the core cannot serve).
STRATEGIES = ("auto", "slice", "rows", "dense", "core")

#: fit_layout: an output channel kept in at least this fraction of the fitting samples joins the core.
CORE_THRESHOLD = 0.3


class Compact:
    """Activation [1, k, ...] holding only channels ``idx`` (sorted) of a ``width``-channel tensor.

    ``idx`` (int64) and ``mask`` (bool [width]) are numpy arrays; ``tidx`` is ``idx`` as a torch tensor
    (same memory). ``key`` (the mask's bytes, computed on first use) keys the weight cache.
    """

    __slots__ = ("values", "idx", "tidx", "mask", "width", "_key")

    def __init__(self, values: torch.Tensor, idx: np.ndarray, tidx: torch.Tensor, mask: np.ndarray, width: int, key: bytes | None = None):
        self.values = values
        self.idx = idx
        self.tidx = tidx
        self.mask = mask
        self.width = width
        self._key = key

    @property
    def index(self) -> torch.Tensor:
        return self.tidx

    @property
    def key(self) -> bytes:
        if self._key is None:
            self._key = self.mask.tobytes()
        return self._key

    @property
    def full(self) -> bool:
        return self.values.shape[1] == self.width

    def dense(self) -> torch.Tensor:
        if self.values.shape[1] == self.width:
            return self.values
        out = self.values.new_zeros((1, self.width, *self.values.shape[2:]))
        return out.index_copy_(1, self.tidx, self.values)

    @staticmethod
    def of(x: torch.Tensor) -> "Compact":
        idx, tidx, mask, key = _all_channels(x.shape[1])
        return Compact(x, idx, tidx, mask, x.shape[1], key)

    @staticmethod
    def from_mask(values: torch.Tensor, mask: np.ndarray, idx: np.ndarray | None = None) -> "Compact":
        if idx is None:
            idx = np.flatnonzero(mask)
        return Compact(values, idx, torch.from_numpy(idx), mask, mask.size)


@functools.lru_cache(maxsize=None)
def _all_channels(width: int) -> tuple[np.ndarray, torch.Tensor, np.ndarray, bytes]:
    """(idx, tidx, mask, key) of a full-width activation; shared, never written to."""
    idx = np.arange(width, dtype=np.int64)
    mask = np.ones(width, dtype=bool)
    return idx, torch.from_numpy(idx), mask, mask.tobytes()


#: Cost of slicing one weight float, in multiply-accumulates (measured on one AVX-512 core: a 9-float-run
#: gather moves ~2 GFloat/s while the conv GEMM does ~35 GMAC/s). Used by the uncalibrated cost model;
#: ``build_engine(calibrate=True)`` times this machine instead.
GATHER_COST_MACS = 17.0


class WeightCache:
    """LRU cache of sliced (weight, bias) keyed by (layer, kind, output-mask bytes, input-mask bytes), bounded in bytes."""

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


def _median_us(fn, reps: int = 5) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter_ns()
        fn()
        times.append((time.perf_counter_ns() - start) / 1e3)
    return statistics.median(times)


class ConvStep:
    """A BN-folded conv, optionally gated by a decision head that runs on the conv's input.

    Cost model (per call, for a regular conv; O×I filters, ko kept, ki active inputs):

    * uncalibrated (default): slice on a cache miss iff ``ko·ki·(1 + GATHER_COST_MACS/HW) < O·I``,
      else run the masked dense conv; a cache hit always runs the sliced conv;
    * calibrated (:meth:`calibrate`, timed on this machine at build time): conv time is modelled as
      affine in its MACs (two timed points), gathers as linear in the floats moved (2-D slice and
      output-row slice timed separately); on each call the cheapest of slice (hit or miss), rows (hit
      or miss) and dense is run.
    """

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d | None, head: nn.Module | None, in_shape, out_hw, cache, key, strategy="auto"):
        if bn is not None:
            weight, bias = fuse_conv_bn_weights(
                conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
            )
        else:
            weight = conv.weight
            bias = conv.bias if conv.bias is not None else torch.zeros(conv.out_channels, dtype=conv.weight.dtype)
        self.weight = weight.detach().contiguous()  # out-major: a slice is one gather of kh·kw runs
        self.bias = bias.detach().contiguous()
        self.kernel = self.weight[0, 0].numel()
        self.rows = self.weight.view(-1, self.kernel)  # [out · in, kh · kw]
        self.filters = self.weight.view(self.weight.shape[0], -1)  # [out, in · kh · kw]
        self.out_channels, self.in_per_group = self.weight.shape[:2]
        self.groups = conv.groups
        self.depthwise = conv.groups == conv.in_channels == conv.out_channels
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        if conv.padding_mode != "zeros":
            raise NotImplementedError("sparse conv supports zero padding only")
        # The head, unrolled (DecisionHead: pool → softmax → folded norm/linear/offset) into numpy: the ops are tiny.
        self.head = None
        if head is not None:
            w, b = (t.to(torch.float32).numpy().copy() for t in head.folded())
            self.head = (head.pool, bool(head.softmax), w, b)
        self.in_shape = tuple(in_shape)
        self.out_hw = tuple(out_hw)
        self.gather_cost = GATHER_COST_MACS / (out_hw[0] * out_hw[1])  # per weight float, relative to its MACs
        self.cache = cache
        self.key = key
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        self.strategy = strategy
        self.costs: dict[str, float] | None = None  # set by calibrate()
        self.last_mask: np.ndarray | None = None  # the kept-output mask of the last sample
        self.counts = dict.fromkeys(("slice_hit", "slice_miss", "rows_hit", "rows_miss", "dense", "core", "core_extra"), 0)
        self.core: _Core | None = None  # set by fit()
        self.probe = None  # optional callable(step, input Compact, output Compact), e.g. latency.kernel_floor
        self.repeats = self.lookups = 0  # how often this layer's (output, input) masks come back
        self.seen_keys: set[tuple] = set()
        self.seen: list[tuple[np.ndarray, np.ndarray]] | None = None  # (out mask, in mask) while fitting

    # -- the head -------------------------------------------------------------------------------
    def output_mask(self, x: Compact) -> np.ndarray | None:
        if self.head is None:
            return None
        pool, softmax, w, b = self.head
        pooled = np.zeros(x.width, dtype=np.float32)
        if x.idx.size:  # the pool of a missing (all-zero) channel is 0
            values = x.values.amax(dim=(2, 3)) if pool == "max" else x.values.mean(dim=(2, 3))
            pooled[x.idx] = values.numpy()[0]
        if softmax:
            pooled = np.exp(pooled - pooled.max())
            pooled /= pooled.sum()
        return (np.dot(w, pooled) + b) > 0  # binarize's rule: sigmoid(logit) > 0.5

    # -- the conv -------------------------------------------------------------------------------
    def conv(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int = 1) -> torch.Tensor:
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, groups)

    def __call__(self, x: Compact) -> Compact:
        y = self._run(x)
        if self.probe is not None:
            self.probe(self, x, y)
        return y

    def _run(self, x: Compact) -> Compact:
        mask = self.output_mask(x)
        self.last_mask = mask
        if self.seen is not None:
            self.seen.append((mask, x.mask))
        if self.depthwise:
            return self._depthwise(x, mask)
        if self.groups != 1:  # general grouped conv: dense fallback, keep the selected filters
            y = self.conv(x.dense(), self.weight, self.bias, self.groups)
            return Compact.of(y) if mask is None else Compact.from_mask(y[:, torch.from_numpy(mask)], mask)
        if mask is None:
            oidx, toidx, mask, okey = _all_channels(self.out_channels)
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
            return Compact(y, oidx, toidx, mask, self.out_channels, okey)
        y = self._sparse(x, mask, oidx, toidx, okey, ko, ki, full_in)
        return Compact(y, oidx, toidx, mask, self.out_channels, okey)

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
            return self.conv(x.values, *sliced)
        core = self.core
        if core is not None and (ki > core.in_idx.size or (x.mask & core.in_missing).any()):
            core = None  # an input outside the core is active: the core cannot serve this call
        if strategy == "core":
            if core is not None:
                return self._core(x, mask, oidx, ko, ki, core)
            strategy = "slice"
        if strategy == "auto":
            strategy = self._choose(ko, ki, (self.key, okey) if key is not None else None, mask, core)
            if strategy == "core":
                return self._core(x, mask, oidx, ko, ki, core)
        if strategy == "slice":
            self.counts["slice_miss"] += 1
            if full_in:
                weight = self.filters.index_select(0, toidx).view(ko, *self.weight.shape[1:])
            else:
                rows = (oidx[:, None] * self.in_per_group + x.idx[None, :]).ravel()
                weight = self.rows.index_select(0, torch.from_numpy(rows)).view(ko, ki, *self.weight.shape[2:])
            sliced = (weight, self.bias.index_select(0, toidx))
            if key is not None:
                cache.store(key, sliced)
            return self.conv(x.values, *sliced)
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
        y = self.conv(x.dense(), self.weight, self.bias)
        return y if ko == self.out_channels else y.index_select(1, toidx)

    def _choose(self, ko: int, ki: int, row_key, mask, core: "_Core | None") -> str:
        """The cheapest strategy on a 2-D slice cache miss."""
        O, I = self.out_channels, self.in_per_group
        costs = self.costs
        extra = 0 if core is None else ko - int(np.count_nonzero(mask & core.out_mask))
        # A slice is stored and reused when the masks repeat: where this layer's masks mostly come back,
        # slice (and cache) on every miss; otherwise charge the gather by the chance they do not.
        fresh = 1.0 - (self.repeats + 1) / (self.lookups + 2) if self.cache.budget > 0 else 1.0
        if fresh < 0.5:
            return "slice"
        if costs is None:  # the uncalibrated MAC model, in MAC units
            options = {"slice": ko * ki * (1.0 + self.gather_cost), "dense": float(O * I)}
            if core is not None:
                options["core"] = core.out_idx.size * core.in_idx.size + extra * ki * (1.0 + self.gather_cost)
        else:
            a, b = costs["conv_fixed"], costs["conv_per_mac"]
            options = {
                "slice": costs["gather2d"] * ko * ki * fresh + a + b * (ko * ki) / (O * I),
                "dense": a + b + costs["scatter"] * (ki < I) + costs["select"] * (ko < O),
            }
            rows_hit = row_key is not None and row_key in self.cache.entries
            options["rows"] = a + b * ko / O + costs["scatter"] * (ki < I) + (0.0 if rows_hit else costs["gather_rows"] * ko)
            if core is not None:
                options["core"] = (
                    a + b * core.macs + costs["scatter"] * (ki < core.in_idx.size) + costs["select"]
                    + (costs["gather2d"] * extra * ki + a + b * (extra * ki) / (O * I) + 2 * costs["select"] if extra else 0.0)
                )
        return min(options, key=options.__getitem__)

    def fit(self, threshold: float | None = None) -> None:
        """Build the core from the masks seen since ``seen`` was set (see :meth:`SparseEngine.fit_layout`)."""
        seen, self.seen = self.seen, None
        self.core = None
        if not seen or self.depthwise or self.groups != 1:
            return
        in_mask = np.mean([m for _, m in seen], axis=0) > 0
        if seen[0][0] is None:
            out_mask = np.ones(self.out_channels, dtype=bool)
        else:
            outs = np.stack([m for m, _ in seen])
            freq = outs.mean(axis=0)
            if threshold is None:
                threshold = self._best_threshold(outs, freq, in_mask, np.array([m.sum() for _, m in seen]))
            out_mask = freq >= threshold
        if not out_mask.any() or not in_mask.any():
            return
        self.core = _Core(self, out_mask, in_mask)

    def _best_threshold(self, outs: np.ndarray, freq: np.ndarray, in_mask: np.ndarray, ki: np.ndarray) -> float:
        """CORE_THRESHOLD, or with calibrated costs the candidate threshold whose core serves the fitting
        samples cheapest (a bigger core costs MACs on every call; a smaller one an extra sliced conv)."""
        costs = self.costs
        if not costs:
            return CORE_THRESHOLD
        a, b, g = costs["conv_fixed"], costs["conv_per_mac"], costs["gather2d"]
        O, I, n_in = self.out_channels, self.in_per_group, int(in_mask.sum())
        best, best_cost = CORE_THRESHOLD, float("inf")
        for threshold in (0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7):
            core = freq >= threshold
            n_core = int(core.sum())
            if n_core == 0:
                continue
            extra = (outs & ~core).sum(axis=1)  # kept filters outside the core, per sample
            extra_cost = np.where(extra > 0, a + g * extra * ki + b * extra * ki / (O * I) + 2 * costs["select"], 0.0)
            cost = a + b * n_core * n_in / (O * I) + costs["select"] + float(extra_cost.mean())
            if cost < best_cost:
                best, best_cost = threshold, cost
        return best

    def _core(self, x: Compact, mask, oidx, ko: int, ki: int, core: "_Core") -> torch.Tensor:
        """Conv with the static core weights (kept-often filters × ever-active inputs), then select;
        kept filters outside the core are computed from a small slice and merged by position."""
        self.counts["core"] += 1
        if ki == core.in_idx.size:
            xc = x.values
        else:
            xc = x.values.new_zeros((1, core.in_idx.size, *x.values.shape[2:]))
            xc.index_copy_(1, torch.from_numpy(core.in_pos[x.idx]), x.values)
        yc = self.conv(xc, core.weight, core.bias)
        in_core = core.out_mask[oidx]  # which kept filters the core computed
        n_core = int(np.count_nonzero(in_core))
        if n_core == core.out_idx.size and n_core == ko:
            return yc
        if n_core == ko:
            return yc.index_select(1, torch.from_numpy(core.out_pos[oidx]))
        self.counts["core_extra"] += 1
        extra = oidx[~in_core]
        rows = (extra[:, None] * self.in_per_group + x.idx[None, :]).ravel()
        weight = self.rows.index_select(0, torch.from_numpy(rows)).view(extra.size, ki, *self.weight.shape[2:])
        ye = self.conv(x.values, weight, self.bias.index_select(0, torch.from_numpy(extra)))
        out = yc.new_empty((1, ko, *yc.shape[2:]))
        if n_core:
            core_kept = oidx[in_core]
            out.index_copy_(1, torch.from_numpy(np.flatnonzero(in_core)), yc.index_select(1, torch.from_numpy(core.out_pos[core_kept])))
        out.index_copy_(1, torch.from_numpy(np.flatnonzero(~in_core)), ye)
        return out

    def calibrate(self, reps: int = 5) -> dict[str, float]:
        """Time this layer on this machine (µs): conv at two sizes, 2-D and row gathers, scatter, select."""
        if self.depthwise or self.groups != 1:
            return {}
        O, I = self.out_channels, self.in_per_group
        x = torch.randn(1, I, *self.in_shape[2:], dtype=self.weight.dtype)
        qo, qi = max(1, O // 2), max(1, I // 2)
        oidx = np.arange(0, O, 2)[:qo]
        iidx = np.arange(0, I, 2)[:qi]
        toidx, tiidx = torch.from_numpy(oidx), torch.from_numpy(iidx)
        rows = torch.from_numpy((oidx[:, None] * I + iidx[None, :]).ravel())
        xq = x[:, tiidx].contiguous()
        wq = self.rows.index_select(0, rows).view(qo, qi, *self.weight.shape[2:])
        bq = self.bias[toidx]
        y = self.conv(x, self.weight, self.bias)
        samples = {k: [] for k in ("full", "quarter", "gather2d", "gather_rows", "scatter", "select")}
        for _ in range(5):  # interleaved rounds so that the machine's drift hits every measurement alike
            samples["full"].append(_median_us(lambda: self.conv(x, self.weight, self.bias), reps))
            samples["quarter"].append(_median_us(lambda: self.conv(xq, wq, bq), reps))
            samples["gather2d"].append(_median_us(lambda: self.rows.index_select(0, rows), reps))
            samples["gather_rows"].append(_median_us(lambda: self.filters.index_select(0, toidx), reps))
            samples["scatter"].append(_median_us(lambda: xq.new_zeros(x.shape).index_copy_(1, tiidx, xq), reps))
            samples["select"].append(_median_us(lambda: y.index_select(1, toidx), reps))
        m = {k: min(v) for k, v in samples.items()}  # the least disturbed round (other jobs share the CPU)
        per_mac = max((m["full"] - m["quarter"]) / 0.75, 0.0)  # time(f) = fixed + per_mac · f, f = MAC fraction
        self.costs = {
            "conv_fixed": max(m["full"] - per_mac, 0.0),
            "conv_per_mac": per_mac,
            "gather2d": m["gather2d"] / (qo * qi),
            "gather_rows": m["gather_rows"] / qo,
            "scatter": m["scatter"],
            "select": m["select"],
            **{f"t_{k}": v for k, v in m.items()},
        }
        return self.costs

    def _depthwise(self, x: Compact, mask: np.ndarray | None) -> Compact:
        if mask is None:
            oidx, toidx, out_mask, okey = _all_channels(x.width)
        else:
            out_mask, okey = mask, None
            oidx = np.flatnonzero(mask)
            toidx = torch.from_numpy(oidx)
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


class _Core:
    """A layer's static core: weights of the often-kept filters × the ever-active inputs, stored contiguously."""

    def __init__(self, step: ConvStep, out_mask: np.ndarray, in_mask: np.ndarray) -> None:
        self.out_mask, self.in_missing = out_mask, ~in_mask
        self.out_idx, self.in_idx = np.flatnonzero(out_mask), np.flatnonzero(in_mask)
        self.out_pos = np.cumsum(out_mask) - 1  # channel -> position in the core (valid where in the core)
        self.in_pos = np.cumsum(in_mask) - 1
        w = step.weight.index_select(0, torch.from_numpy(self.out_idx)).index_select(1, torch.from_numpy(self.in_idx))
        self.weight = w.contiguous()
        self.bias = step.bias.index_select(0, torch.from_numpy(self.out_idx)).contiguous()
        self.macs = self.out_idx.size * self.in_idx.size / (out_mask.size * in_mask.size)  # fraction of dense MACs


def _add(a: Compact, b: Compact) -> Compact:
    """Residual add by index: the result holds the union of both channel sets."""
    if a.values.shape[1] == b.values.shape[1] and (a.idx is b.idx or np.array_equal(a.idx, b.idx)):
        return Compact(a.values + b.values, a.idx, a.tidx, a.mask, a.width, a._key)
    if b.values.shape[1] == b.width:
        a, b = b, a
    if a.values.shape[1] == a.width:  # e.g. a dense residual stream: one indexed add
        return Compact(a.values.index_add(1, b.tidx, b.values), a.idx, a.tidx, a.mask, a.width, a._key)
    mask = a.mask | b.mask
    position = np.cumsum(mask) - 1  # where each channel lands in the union
    out = a.values.new_zeros((1, int(position[-1]) + 1, *a.values.shape[2:]))
    out.index_copy_(1, torch.from_numpy(position[a.idx]), a.values)
    out.index_add_(1, torch.from_numpy(position[b.idx]), b.values)
    return Compact.from_mask(out, mask)


class _LeafGatedBlocks(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualified_name: str) -> bool:
        return isinstance(m, GatedBlock) or super().is_leaf_module(m, qualified_name)


def folded_dense(model: nn.Module, input_size: tuple[int, int]) -> nn.Module:
    """The plain backbone (no heads, no masks) with every block's BN folded into its conv: the fair dense reference."""
    if isinstance(model, FTWTModel):
        backbone = copy.deepcopy(model.backbone).eval()
        for spec in model.graph.blocks:
            gated = backbone.get_submodule(spec.conv)
            replace_submodule(backbone, spec.conv, fuse_conv_bn_eval(gated.conv, gated.bn))
        return backbone
    backbone = copy.deepcopy(model).eval()
    for spec in analyze(backbone, input_size).blocks:
        folded = fuse_conv_bn_eval(backbone.get_submodule(spec.conv), backbone.get_submodule(spec.bn))
        replace_submodule(backbone, spec.conv, folded)
        replace_submodule(backbone, spec.bn, nn.Identity())
    return backbone


class SparseEngine(nn.Module):
    """Batch-1 sparse execution of a gated (or dense) backbone; see the module docstring."""

    def __init__(self, model: nn.Module, input_size: tuple[int, int], cache_mb: float = 64.0, strategy: str = "auto") -> None:
        super().__init__()
        gated = isinstance(model, FTWTModel)
        backbone = model.backbone if gated else folded_dense(model, input_size)
        self.block_index = {id(b): i for i, b in enumerate(model.blocks)} if gated else {}
        self.cache = WeightCache(cache_mb)
        self.strategy = strategy
        self.graph_module = torch.fx.GraphModule(backbone, _LeafGatedBlocks().trace(backbone))
        param = next(backbone.parameters())
        with torch.no_grad():
            ShapeProp(self.graph_module).propagate(torch.zeros(1, 3, *input_size, dtype=param.dtype))
        self.modules_by_name = dict(self.graph_module.named_modules())
        self.convs: list[tuple[int | None, ConvStep]] = []  # (block index or None, step)
        # Compiled program: (output slot, step(slots) -> value); slot i is the i-th node in graph order,
        # except that identity layers (nn.Identity: the BNs folded away; eval-mode dropout) get no step
        # and share their input's slot.
        self.slot: dict[torch.fx.Node, int] = {}
        self.program = []
        for i, node in enumerate(self.graph_module.graph.nodes):
            module = self.modules_by_name.get(node.target) if node.op == "call_module" else None
            identity = isinstance(module, nn.Identity) or (isinstance(module, nn.Dropout) and not module.training)
            if identity and len(node.args) == 1 and not node.kwargs and isinstance(node.args[0], torch.fx.Node):
                self.slot[node] = self.slot[node.args[0]]
                continue
            self.slot[node] = i
            self.program.append((i, self._handler(node)))
        self.num_slots = len(self.slot)

    @property
    def num_blocks(self) -> int:
        return len(self.block_index)

    def block_masks(self) -> list[torch.Tensor]:
        """Kept-output masks (bool [C]) of the last sample, in block order (the FTWTModel's ``blocks``)."""
        masks: list[torch.Tensor] = [torch.empty(0)] * self.num_blocks
        for block, step in self.convs:
            if block is not None and step.last_mask is not None:
                masks[block] = torch.from_numpy(step.last_mask)
        return masks

    def calibrate(self, reps: int = 5) -> dict[int, dict[str, float]]:
        """Time every conv on this machine so that the cost model picks strategies from real costs."""
        with torch.no_grad():
            return {step.key: step.calibrate(reps) for _, step in self.convs}

    def fit_layout(self, images: torch.Tensor, threshold: float | None = None) -> dict[str, float]:
        """Run ``images`` [N, 3, H, W] and give every conv a static core: the filters kept in at least
        ``threshold`` of them × the inputs ever active, stored contiguously. Default threshold: per
        layer, the cheapest candidate under the calibrated costs, else ``CORE_THRESHOLD``.
        The core serves a call without gathering weights (kept filters outside it are sliced and merged;
        a call with an active input outside it uses the other strategies), so results stay exact.
        Returns the mean core size as a fraction of the dense MACs."""
        for _, step in self.convs:
            step.seen = []
        try:
            with torch.no_grad():
                for image in images:
                    self.forward(image[None])
        finally:
            for _, step in self.convs:
                step.fit(threshold)
        fractions = [step.core.macs for _, step in self.convs if step.core is not None]
        return {"layers_with_core": len(fractions), "mean_core_mac_fraction": float(np.mean(fractions)) if fractions else float("nan")}

    def strategy_counts(self) -> dict[str, int]:
        """How often each conv path ran (summed over convs) since the engine was built."""
        total: dict[str, int] = {}
        for _, step in self.convs:
            for k, v in step.counts.items():
                total[k] = total.get(k, 0) + v
        return total

    def _handler(self, node: torch.fx.Node):
        slot = self.slot
        if node.op == "placeholder":
            return lambda s: Compact.of(s[-1])  # the input sits in the last slot
        if node.op == "output":
            return lambda s: map_arg(node.args[0], lambda n: _as_dense(s[slot[n]]))
        module = self.modules_by_name.get(node.target) if node.op == "call_module" else None
        if isinstance(module, (GatedBlock, nn.Conv2d)):
            gated = isinstance(module, GatedBlock)
            conv, bn, head = (module.conv, module.bn, module.head) if gated else (module, None, None)
            in_shape = node.args[0].meta["tensor_meta"].shape
            out_hw = node.meta["tensor_meta"].shape[2:]
            step = ConvStep(conv, bn, head, in_shape, out_hw, self.cache, key=len(self.convs), strategy=self.strategy)
            self.convs.append((self.block_index[id(module)] if gated else None, step))
            i = slot[node.args[0]]
            return lambda s: step(_as_compact(s[i]))
        if isinstance(module, nn.Linear):
            i = slot[node.args[0]]
            return lambda s: _linear(module, _as_compact(s[i]))
        if is_zero_preserving(node, self.modules_by_name) and isinstance(node.args[0], torch.fx.Node):
            return self._channelwise(node, module)
        if node.op == "call_function" and node.target in (operator.add, torch.add, operator.iadd) and len(node.args) == 2:
            a, b = node.args
            if isinstance(a, torch.fx.Node) and isinstance(b, torch.fx.Node) and not node.kwargs:
                i, j = slot[a], slot[b]
                return lambda s: _add(_as_compact(s[i]), _as_compact(s[j]))
        if _is_flatten_from_channels(node):
            i = slot[node.args[0]]
            return lambda s: _flatten(s[i])
        return self._fallback(node, module)

    def _channelwise(self, node: torch.fx.Node, module: nn.Module | None):
        """A zero-preserving, channel-wise op: run it on the compact values, keep the index."""
        slot = self.slot
        i, rest, kwargs = slot[node.args[0]], node.args[1:], node.kwargs
        if module is not None:
            # Bound forward: skips nn.Module.__call__ (hook dispatch, ~2 µs a call); channel-wise
            # zero-preserving layers carry no hooks here.
            op = module.forward if not (module._forward_hooks or module._forward_pre_hooks) else module
        elif node.op == "call_function":
            op = node.target
        else:
            op = lambda v, *a, **k: getattr(v, node.target)(*a, **k)  # noqa: E731
        has_node_args = any(isinstance(a, torch.fx.Node) for a in rest)
        if not has_node_args:
            rest = tuple(rest)

            def run(s):
                c = _as_compact(s[i])
                return Compact(op(c.values, *rest, **kwargs), c.idx, c.tidx, c.mask, c.width, c._key)

            return run

        def run_with_args(s):
            c = _as_compact(s[i])
            args = map_arg(rest, lambda n: s[slot[n]])
            return Compact(op(c.values, *args, **kwargs), c.idx, c.tidx, c.mask, c.width, c._key)

        return run_with_args

    def _fallback(self, node: torch.fx.Node, module: nn.Module | None):
        """Anything else: scatter compact inputs to full width and run the node as traced."""
        slot = self.slot
        if node.op == "get_attr":
            value = operator.attrgetter(node.target)(self.graph_module)
            return lambda s: value
        if node.op == "call_module":
            op = module
        elif node.op == "call_function":
            op = node.target
        else:
            op = lambda self_, *a, **k: getattr(self_, node.target)(*a, **k)  # noqa: E731

        def run(s):
            args = map_arg(node.args, lambda n: _as_dense(s[slot[n]]))
            kwargs = map_arg(node.kwargs, lambda n: _as_dense(s[slot[n]]))
            return op(*args, **kwargs)

        return run

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != 1:  # each sample has its own masks: run them one by one
            return torch.cat([self.forward(sample[None]) for sample in x])
        s: list = [None] * self.num_slots + [x]
        for out, step in self.program:
            s[out] = step(s)
        return s[self.program[-1][0]]


def build_engine(
    model: nn.Module,
    input_size: tuple[int, int] | None = None,
    cache_mb: float = 64.0,
    strategy: str = "auto",
    calibrate: bool = False,
) -> SparseEngine:
    """A :class:`SparseEngine` for an eval-mode FTWTModel (heads predict masks) or a dense backbone.

    ``input_size`` (H, W) is needed for a dense backbone; an FTWTModel knows it from its graph.
    ``strategy`` forces one conv path for every call ("slice", "rows", "dense"; "auto" = cost model).
    ``calibrate`` times every conv on this machine at build time (about 0.1–1 s) and makes the cost
    model choose from those timings instead of the fixed ``GATHER_COST_MACS`` rule.
    """
    if isinstance(model, FTWTModel):
        input_size = model.graph.input_size
    elif input_size is None:
        raise ValueError("a dense backbone needs input_size=(H, W)")
    engine = SparseEngine(model, tuple(input_size), cache_mb=cache_mb, strategy=strategy).eval()
    if calibrate:
        engine.calibrate()
    return engine


def _as_compact(value) -> Compact:
    return value if value.__class__ is Compact else Compact.of(value)


def _as_dense(value):
    return value.dense() if value.__class__ is Compact else value


def _linear(module: nn.Linear, x: Compact) -> Compact:
    if x.values.dim() != 2 or x.full:
        return Compact.of(module(x.dense()))
    return Compact.of(F.linear(x.values, module.weight.index_select(1, x.tidx), module.bias))


def _is_flatten_from_channels(node: torch.fx.Node) -> bool:
    if not (node.target is torch.flatten or (node.op == "call_method" and node.target == "flatten")):
        return False
    start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
    return start == 1 and len(node.args) <= 2 and set(node.kwargs) <= {"start_dim"}


def _flatten(value):
    """Flatten a [1, C, 1, 1] map to [1, C] keeping the compact form; other shapes go dense."""
    c = _as_compact(value)
    if c.values.dim() == 4 and c.values.shape[2:] == (1, 1):
        return Compact(c.values.flatten(1), c.idx, c.tidx, c.mask, c.width, c._key)
    return torch.flatten(c.dense(), 1)
