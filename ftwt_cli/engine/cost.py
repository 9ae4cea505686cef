"""The conv cost model: which path (slice, rows, dense, core) serves a call cheapest.

Per call, for a regular conv with O×I filters, ko kept outputs and ki active inputs:

* uncalibrated (default): slice on a cache miss iff ``ko·ki·(1 + gather_cost_macs/HW) < O·I``, else run
  the masked dense conv; a cache hit always runs the sliced conv;
* calibrated (:func:`calibrate`, timed on this machine at build time): conv time is modelled as affine
  in its MACs (two timed points), gathers as linear in the floats moved (2-D slice and output-row slice
  timed separately); on each call the cheapest of slice (hit or miss), rows (hit or miss) and dense runs.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch

from ftwt_cli.engine.geometry import ConvGeometry

#: Cost of slicing one weight float, in multiply-accumulates (measured on one AVX-512 core: a 9-float-run
#: gather moves ~2 GFloat/s while the conv GEMM does ~35 GMAC/s). Used by the uncalibrated cost model;
#: ``build_engine(calibrate=True)`` times this machine instead, ``build_engine(gather_cost_macs=...)``
#: overrides it.
GATHER_COST_MACS = 17.0

#: fit_layout: an output channel kept in at least this fraction of the fitting samples joins the core.
CORE_THRESHOLD = 0.3


def median_us(fn, reps: int = 5) -> float:
    """Median wall time of ``fn()`` in µs over ``reps`` calls, after one untimed call."""
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter_ns()
        fn()
        times.append((time.perf_counter_ns() - start) / 1e3)
    return statistics.median(times)


def choose(
    g: ConvGeometry, costs: dict | None, fresh: float, gather_cost: float, rows_cached: bool,
    ko: int, ki: int, mask: np.ndarray, core,
) -> str:  # fmt: skip
    """The cheapest strategy for a call that missed the 2-D slice cache.

    ``fresh``: the chance this layer's masks do not come back (a slice is stored and reused when they
    do); ``gather_cost``: the uncalibrated cost of slicing one weight float in MACs of this conv;
    ``rows_cached``: the output-row slice of this mask is in the cache; ``core``: the layer's static
    core when it can serve the call.
    """
    O, I = g.out_channels, g.in_per_group
    extra = 0 if core is None else ko - int(np.count_nonzero(mask & core.out_mask))
    # Where this layer's masks mostly come back, slice (and cache) on every miss; otherwise charge the
    # gather by the chance they do not.
    if fresh < 0.5:
        return "slice"
    if costs is None:  # the uncalibrated MAC model, in MAC units
        options = {"slice": ko * ki * (1.0 + gather_cost), "dense": float(O * I)}
        if core is not None:
            options["core"] = core.out_idx.size * core.in_idx.size + extra * ki * (1.0 + gather_cost)
    else:
        a, b = costs["conv_fixed"], costs["conv_per_mac"]
        options = {
            "slice": costs["gather2d"] * ko * ki * fresh + a + b * (ko * ki) / (O * I),
            "dense": a + b + costs["scatter"] * (ki < I) + costs["select"] * (ko < O),
        }
        options["rows"] = a + b * ko / O + costs["scatter"] * (ki < I) + (0.0 if rows_cached else costs["gather_rows"] * ko)
        if core is not None:
            options["core"] = (
                a + b * core.macs + costs["scatter"] * (ki < core.in_idx.size) + costs["select"]
                + (costs["gather2d"] * extra * ki + a + b * (extra * ki) / (O * I) + 2 * costs["select"] if extra else 0.0)
            )
    return min(options, key=options.__getitem__)


def best_threshold(
    geometry: ConvGeometry, costs: dict | None, outs: np.ndarray, freq: np.ndarray, in_mask: np.ndarray, ki: np.ndarray
) -> float:
    """CORE_THRESHOLD, or with calibrated costs the candidate threshold whose core serves the fitting
    samples cheapest (a bigger core costs MACs on every call; a smaller one an extra sliced conv)."""
    if not costs:
        return CORE_THRESHOLD
    a, b, g = costs["conv_fixed"], costs["conv_per_mac"], costs["gather2d"]
    O, I, n_in = geometry.out_channels, geometry.in_per_group, int(in_mask.sum())
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


def calibrate(g: ConvGeometry, reps: int = 3, rounds: int = 3) -> dict[str, float]:
    """Time one layer on this machine (µs): conv at two sizes, 2-D and row gathers, scatter, select;
    returns the cost model's coefficients (empty for grouped convs, which always run dense)."""
    if g.depthwise or g.groups != 1:
        return {}
    O, I = g.out_channels, g.in_per_group
    x = torch.randn(1, I, *g.in_shape[2:], dtype=g.weight.dtype)
    qo, qi = max(1, O // 2), max(1, I // 2)
    oidx = np.arange(0, O, 2)[:qo]
    iidx = np.arange(0, I, 2)[:qi]
    toidx, tiidx = torch.from_numpy(oidx), torch.from_numpy(iidx)
    rows = torch.from_numpy((oidx[:, None] * I + iidx[None, :]).ravel())
    xq = x[:, tiidx].contiguous()
    wq = g.rows.index_select(0, rows).view(qo, qi, *g.weight.shape[2:])
    bq = g.bias[toidx]
    y = g.conv(x, g.weight, g.bias)
    samples = {k: [] for k in ("full", "quarter", "gather2d", "gather_rows", "scatter", "select")}
    for _ in range(rounds):  # interleaved rounds so that the machine's drift hits every measurement alike
        samples["full"].append(median_us(lambda: g.conv(x, g.weight, g.bias), reps))
        samples["quarter"].append(median_us(lambda: g.conv(xq, wq, bq), reps))
        samples["gather2d"].append(median_us(lambda: g.rows.index_select(0, rows), reps))
        samples["gather_rows"].append(median_us(lambda: g.filters.index_select(0, toidx), reps))
        samples["scatter"].append(median_us(lambda: xq.new_zeros(x.shape).index_copy_(1, tiidx, xq), reps))
        samples["select"].append(median_us(lambda: y.index_select(1, toidx), reps))
    m = {k: min(v) for k, v in samples.items()}  # the least disturbed round (other jobs share the CPU)
    per_mac = max((m["full"] - m["quarter"]) / 0.75, 0.0)  # time(f) = fixed + per_mac · f, f = MAC fraction
    return {
        "conv_fixed": max(m["full"] - per_mac, 0.0),
        "conv_per_mac": per_mac,
        "gather2d": m["gather2d"] / (qo * qi),
        "gather_rows": m["gather_rows"] / qo,
        "scatter": m["scatter"],
        "select": m["select"],
        **{f"t_{k}": v for k, v in m.items()},
    }
