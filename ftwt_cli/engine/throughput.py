"""Batched throughput: the engine's grouped batches against the dense model at the same batch size.

Per batch size B, batches of B images (cycled from the given images) run alternately through the dense
backbone in both memory formats and through the engine's batched program (images grouped per layer by
the prototype they run, :mod:`~ftwt_cli.engine.batched`), the order swapping every batch; images per
second come from median batch times, the dense figure from its faster format. The batch-1 whole-engine
fallback is not applied here: this measures the grouped path itself.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from ftwt_cli.console import progress_bar
from ftwt_cli.engine.reference import dense_fallback


def _ms(fn, x: torch.Tensor) -> float:
    start = time.perf_counter_ns()
    fn(x)
    return (time.perf_counter_ns() - start) / 1e6


def batched_throughput(engine, images: torch.Tensor, batch_sizes, images_per_size: int = 96, warmup: int = 1) -> dict[str, dict]:
    """``{str(B): {"dense_images_per_s", "engine_images_per_s", "speedup", "dense_channels_last",
    "batches"}}`` for each B of ``batch_sizes``: about ``images_per_size`` images timed (at least 3
    batches) after ``warmup`` batches."""
    dense: dict[bool, nn.Module] = {fmt: dense_fallback(engine.source, engine.input_size, channels_last=fmt, masked=False) for fmt in (False, True)}
    candidates = {"dense": dense[False], "dense_channels_last": dense[True], "engine": engine._run}
    report: dict[str, dict] = {}
    n = len(images)
    for size in batch_sizes:
        batches = max(3, images_per_size // size)
        times: dict[str, list[float]] = {k: [] for k in candidates}
        with torch.inference_mode(), progress_bar(f"throughput (batch {size})", warmup + batches) as advance:
            for b in range(warmup + batches):
                x = images[torch.arange(b * size, (b + 1) * size) % n]
                order = list(candidates) if b % 2 == 0 else list(candidates)[::-1]
                for name in order:
                    ms = _ms(candidates[name], x)
                    if b >= warmup:
                        times[name].append(ms)
                advance()
        median = {k: statistics.median(v) for k, v in times.items()}
        channels_last = median["dense_channels_last"] < median["dense"]
        dense_ms = median["dense_channels_last" if channels_last else "dense"]
        report[str(size)] = {
            "dense_images_per_s": 1e3 * size / dense_ms,
            "engine_images_per_s": 1e3 * size / median["engine"],
            "speedup": dense_ms / median["engine"],
            "dense_channels_last": channels_last,
            "batches": batches,
        }
    return report
