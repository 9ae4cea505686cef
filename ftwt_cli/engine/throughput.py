"""Batched throughput: the engine's routed batches (images grouped per layer by the prototype they chose,
each group one pre-packed conv) against dense eager and dense pre-packed at the same batch size.

Per batch size B, batches of B images (cycled from the given images) run through every model in turn,
the order reversing every batch; images per second come from median batch times.
"""

from __future__ import annotations

import statistics
import time

import torch

from ftwt_cli.console import progress_bar


def _ms(fn, x: torch.Tensor) -> float:
    start = time.perf_counter_ns()
    fn(x)
    return (time.perf_counter_ns() - start) / 1e6


def batched_throughput(models: dict, images: torch.Tensor, batch_sizes, images_per_size: int = 96, warmup: int = 1) -> dict[str, dict]:
    """``{str(B): {"{name}_images_per_s" for each model, "speedup" (engine ÷ dense),
    "speedup_prepacked" (engine ÷ dense_prepacked), "batches"}}``; ``models`` names "dense",
    "dense_prepacked" and "engine" (callables on [B, 3, H, W]). About ``images_per_size`` images are
    timed per size (at least 3 batches) after ``warmup`` batches."""
    report: dict[str, dict] = {}
    n = len(images)
    for size in batch_sizes:
        batches = max(3, images_per_size // size)
        times: dict[str, list[float]] = {k: [] for k in models}
        with torch.inference_mode(), progress_bar(f"throughput (batch {size})", warmup + batches) as advance:
            for b in range(warmup + batches):
                x = images[torch.arange(b * size, (b + 1) * size) % n]
                for name in list(models) if b % 2 == 0 else list(models)[::-1]:
                    ms = _ms(models[name], x)
                    if b >= warmup:
                        times[name].append(ms)
                advance()
        median = {k: statistics.median(v) for k, v in times.items()}
        row = {f"{k}_images_per_s": 1e3 * size / v for k, v in median.items()}
        row["speedup"] = median["dense"] / median["engine"]
        row["speedup_prepacked"] = median["dense_prepacked"] / median["engine"]
        row["batches"] = batches
        report[str(size)] = row
    return report
