"""The per-call paths of a regular conv, for masks no prototype serves (:class:`~ftwt_cli.engine.conv.ConvStep`
keeps their state): the cached 2-D slice, or what :func:`cost.choose` prices cheapest of ``slice``
(kept filters × active inputs), ``rows`` (kept filters, zero-filled input), ``dense`` (full conv, then
select) and ``core`` (:mod:`~ftwt_cli.engine.core`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ftwt_cli.engine import cost
from ftwt_cli.engine.compact import Compact
from ftwt_cli.engine.core import run_core
from ftwt_cli.engine.geometry import ConvGeometry

#: PyTorch runs a batch-1 fp32 conv with kernels up to 3×3 through im2col + GEMM instead of oneDNN when
#: its input holds at most this many elements; only oneDNN builds a kernel per shape, so only its
#: layers gain from padding sliced shapes up to buckets.
ONEDNN_MIN_INPUT = 20480


def on_onednn(g: ConvGeometry, ki: int) -> bool:
    """Whether PyTorch runs conv ``g`` at batch 1 with ``ki`` inputs on oneDNN (its ``use_mkldnn`` rule)."""
    kh, kw = g.weight.shape[2:]
    if kh == kw == 1 and g.stride == (1, 1) and torch.get_num_threads() == 1:
        return False
    return (kh > 3 and kw > 3) or ki * g.in_shape[2] * g.in_shape[3] > ONEDNN_MIN_INPUT


def sparse(step, x: Compact, mask, oidx, toidx, okey, ko: int, ki: int, full_in: bool) -> torch.Tensor:
    """The output values [n, ko, ...] of ``step``'s conv for a call no prototype serves."""
    g = step.geometry
    cache, strategy = step.cache, step.strategy
    if okey is None and cache.budget > 0:
        okey = mask.tobytes()
    key = (step.key, okey, x.key) if cache.budget > 0 else None
    sliced = None if key is None or strategy in ("rows", "dense", "core") else cache.lookup(key)
    if key is not None:  # how often this layer's masks repeat, whichever path served them
        step.lookups += 1
        if key in step.seen_keys:
            step.repeats += 1
        elif len(step.seen_keys) < 4096:
            step.seen_keys.add(key)
    if sliced is not None:
        step.counts["slice_hit"] += 1
        return run_sliced(g, x, sliced, ko)
    core = step.core if step.core is not None and step.core.serves(x) else None
    if strategy == "core":
        if core is not None:
            return run_core(g, x, oidx, ko, ki, core, step.counts)
        strategy = "slice"  # an input outside the core is active: the core cannot serve this call
    if strategy == "auto":
        # A slice is stored and reused when the masks repeat: the chance they do not.
        fresh = 1.0 - (step.repeats + 1) / (step.lookups + 2) if cache.budget > 0 else 1.0
        rows_cached = key is not None and (step.key, okey) in cache.entries
        strategy = cost.choose(g, step.costs, fresh, step.gather_cost, rows_cached, ko, ki, mask, core)
        if strategy == "core":
            return run_core(g, x, oidx, ko, ki, core, step.counts)
    if strategy == "slice":
        step.counts["slice_miss"] += 1
        sliced = slice_weights(g, x, oidx, toidx, ko, ki, full_in, buckets=not step.channels_last)
        if key is not None:
            cache.store(key, sliced)
        return run_sliced(g, x, sliced, ko)
    if strategy == "rows":
        row_key = (step.key, okey) if key is not None else None
        sliced = None if row_key is None else cache.lookup(row_key, count=False)
        if sliced is None:
            step.counts["rows_miss"] += 1
            sliced = (g.filters.index_select(0, toidx).view(ko, *g.weight.shape[1:]), g.bias.index_select(0, toidx))
            if row_key is not None:
                cache.store(row_key, sliced)
        else:
            step.counts["rows_hit"] += 1
        return g.conv(x.dense(), *sliced)
    step.counts["dense"] += 1
    return step._dense(x, ko, toidx)


def slice_weights(
    g: ConvGeometry, x: Compact, oidx, toidx, ko: int, ki: int, full_in: bool, buckets: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of the kept filters × active inputs. Where the conv runs on oneDNN (which builds a
    kernel per shape), the filters are padded with zero rows up to a shape bucket (``buckets``: in the
    default format only, where cutting the padding off leaves a contiguous tensor); the inputs are never
    padded (that would copy the activation on every call)."""
    if full_in:
        weight = g.filters.index_select(0, toidx).view(ko, *g.weight.shape[1:])
    else:
        rows = (oidx[:, None] * g.in_per_group + x.idx[None, :]).ravel()
        weight = g.rows.index_select(0, torch.from_numpy(rows)).view(ko, ki, *g.weight.shape[2:])
    bias = g.bias.index_select(0, toidx)
    padded = min(g.out_channels, -(-ko // g.bucket_out) * g.bucket_out)
    if padded == ko or not buckets or not on_onednn(g, ki):
        return weight, bias
    return F.pad(weight, (0, 0, 0, 0, 0, 0, 0, padded - ko)), F.pad(bias, (0, padded - ko))


def run_sliced(g: ConvGeometry, x: Compact, sliced: tuple[torch.Tensor, torch.Tensor], ko: int) -> torch.Tensor:
    """The sliced conv on the compact input; padding filters' outputs are cut off (a view)."""
    y = g.conv(x.values, *sliced)
    return y if y.shape[1] == ko else y[:, :ko]
