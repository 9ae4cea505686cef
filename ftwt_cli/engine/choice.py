"""Never slower than dense, measured on this machine: the activations' memory format, which convs take
their sparse paths, and whether the whole engine runs the dense model instead. This module is the one
home of those choices (:func:`decide`); ``build_engine`` and the latency measurement both call it.

All are measured on a few calibration images (their real masks): the engine runs in the memory format
(default or channels-last) it is faster in; a layer keeps its sparse paths only where they beat its
dense conv on those inputs; and the whole engine runs the dense model (BN folded; for an FTWT model with
its heads applying the masks, so outputs stay the same) where that is faster than the engine with its
per-layer choices.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import numpy as np
import torch

from ftwt_cli.engine.cache import WeightCache
from ftwt_cli.engine.conv import ConvStep
from ftwt_cli.engine.reference import dense_fallback

#: A layer runs sparse only when its sparse paths are at least this much faster than its dense conv
#: (timings this close are noise; dense is the safe side).
SPARSE_MARGIN = 0.02


def decide(engine, images: torch.Tensor | None, layers="auto", fallback="auto", channels_last="auto") -> dict:
    """Apply the format, per-layer and whole-engine choices to ``engine`` (a
    :class:`~ftwt_cli.engine.program.SparseEngine`).

    ``layers``: "auto" (measured on ``images`` when given, else every conv sparse), "measure", "sparse",
    "dense", a list of bools in conv order, or a collection of conv names (those run sparse).
    ``fallback``: "auto" (measured when ``images`` are given, else no), "measure", or a bool.
    ``channels_last``: "auto" (measured when ``images`` are given, else the default format), "measure", or a bool.
    Returns what was measured (see :func:`measure`; empty when nothing was).
    """
    measure_layers = layers == "measure" or (layers == "auto" and images is not None)
    measure_whole = fallback == "measure" or (fallback == "auto" and images is not None)
    measure_format = channels_last == "measure" or (channels_last == "auto" and images is not None)
    if (measure_layers or measure_whole or measure_format) and (images is None or len(images) == 0):
        raise ValueError("layers='measure' / fallback='measure' / channels_last='measure' need calibration_images")
    if not measure_layers and layers != "auto":
        engine.set_layers(layers)
    engine.set_channels_last(channels_last if isinstance(channels_last, bool) else False)
    measured = {}
    if measure_layers or measure_whole or measure_format:
        measured = engine.measure(images, layers=measure_layers, whole=measure_whole, formats=measure_format)
    if isinstance(fallback, bool):
        engine.use_fallback(fallback)
    return measured


def layer_flags(choice, steps: list[ConvStep]) -> list[bool]:
    """Per conv, whether it runs sparse: ``choice`` is "sparse", "dense", bools in conv order, or names."""
    if isinstance(choice, str):
        if choice not in ("sparse", "dense"):
            raise ValueError(f"layers must be 'sparse', 'dense', 'measure', a list of bools or of layer names, got {choice!r}")
        return [choice == "sparse"] * len(steps)
    choice = list(choice)
    if all(isinstance(c, (bool, np.bool_)) for c in choice):
        if len(choice) != len(steps):
            raise ValueError(f"layers: {len(choice)} flags for {len(steps)} convs")
        return [bool(c) for c in choice]
    names = {s.name for s in steps}
    unknown = set(choice) - names
    if unknown:
        raise ValueError(f"layers: unknown conv name(s) {sorted(unknown)}")
    return [s.name in set(choice) for s in steps]


@contextmanager
def _untouched(steps: list[ConvStep]):
    """Time steps without leaving a trace: counters, mask-repeat statistics and cache are restored."""
    saved = [(s.sparse, s.cache, dict(s.counts), s.repeats, s.lookups, set(s.seen_keys), s.extra_macs) for s in steps]
    try:
        yield
    finally:
        for s, (sparse, cache, counts, repeats, lookups, seen, extra) in zip(steps, saved):
            s.sparse, s.cache, s.counts, s.repeats, s.lookups, s.seen_keys, s.extra_macs = sparse, cache, counts, repeats, lookups, seen, extra


def _fresh(step: ConvStep, saved_stats: tuple) -> None:
    """Start a timed round as the first real call would: empty cache, the mask statistics as they were."""
    step.cache = WeightCache(step.cache.budget / 2**20)
    step.repeats, step.lookups, step.seen_keys = saved_stats[0], saved_stats[1], set(saved_stats[2])


def _rounds(items: list, reps: int) -> list[list]:
    """Round 0 (warm-up) and ``reps`` timed rounds, each on other items where there are enough: a
    sample seen before would find its sliced weights and oneDNN's kernels for its shapes ready, which
    new images at run time do not."""
    if len(items) > reps:
        return [items[i :: reps + 1] for i in range(reps + 1)]
    return [items] * (reps + 1)


def _layer_times(step: ConvStep, samples: list, reps: int) -> tuple[float, float]:
    """(sparse µs, dense µs) per call of ``step`` over ``samples`` (input, mask), best of ``reps`` rounds."""
    stats = (step.repeats, step.lookups, set(step.seen_keys))
    times: dict[bool, list[float]] = {True: [], False: []}
    for round_, batch in enumerate(_rounds(samples, reps)):  # round 0 warms both paths up
        for sparse in (True, False) if round_ % 2 == 0 else (False, True):
            step.sparse = sparse
            _fresh(step, stats)
            start = time.perf_counter_ns()
            for x, mask in batch:
                step.compute(x, mask)
            if round_:
                times[sparse].append((time.perf_counter_ns() - start) / 1e3 / len(batch))
    return min(times[True]), min(times[False])


def measure(engine, images: torch.Tensor, reps: int = 3, layers: bool = True, whole: bool = True, formats: bool = False) -> dict:
    """Pick the engine's memory format (``formats``), each conv's path (sparse or dense) and the whole
    engine's (engine or dense model) from timings on ``images`` [N, 3, H, W] (a few calibration images;
    their masks are the heads' own).

    Returns ``{"images", "engine_channels_last", "format_ms", "layers": [{name, block, sparse,
    sparse_us, dense_us, keep, active_in, macs}], "engine_ms", "dense_ms", "dense_channels_last",
    "fallback"}`` (each part when it was measured).
    """
    images = images.detach()
    if images.dim() != 4 or images.shape[0] == 0:
        raise ValueError(f"calibration images must be a non-empty [N, 3, H, W] tensor, got shape {tuple(images.shape)}")
    engine.fallback = None
    steps = engine.steps
    report: dict = {"images": len(images), "layers": []}
    with torch.no_grad():
        if formats:
            report.update(_choose_format(engine, images, reps))
        if layers:
            for step in steps:
                step.samples = []
            try:
                with _untouched(steps):
                    for image in images:
                        engine._run(image[None])
            finally:
                recorded = [step.samples or [] for step in steps]
                for step in steps:
                    step.samples = None
            for (block, step), samples in zip(engine.convs, recorded):
                report["layers"].append(_choose_layer(step, block, samples, reps))
        if whole:
            report.update(_choose_whole(engine, images, reps))
    return report


def _choose_layer(step: ConvStep, block: int | None, samples: list, reps: int) -> dict:
    keep = np.mean([1.0 if m is None else m.mean() for _, m in samples])
    active = np.mean([x.idx.size / x.width for x, _ in samples])
    # Nothing to choose where every call is the full conv anyway (or a general grouped conv: always dense).
    g = step.geometry
    choosable = (g.depthwise or g.groups == 1) and (keep < 1.0 or active < 1.0)
    with _untouched([step]):
        sparse_us, dense_us = _layer_times(step, samples, reps)
    runs_sparse = bool(choosable and sparse_us < (1.0 - SPARSE_MARGIN) * dense_us)
    step.sparse = runs_sparse
    return {
        "name": step.name,
        "block": block,
        "sparse": runs_sparse,
        "sparse_us": sparse_us,
        "dense_us": dense_us,
        "keep": float(keep),
        "active_in": float(active),
        "macs": g.macs,
    }


def _timed_rounds(candidates: dict, images: torch.Tensor, reps: int, before=None) -> dict[str, float]:
    """Best per-image ms of each candidate (callable on a batch-1 input), rounds alternated."""
    times: dict[str, list[float]] = {k: [] for k in candidates}
    for round_, batch in enumerate(_rounds(list(images), reps)):
        order = list(candidates) if round_ % 2 == 0 else list(candidates)[::-1]
        for name in order:
            if before is not None:
                before(name)
            start = time.perf_counter_ns()
            for image in batch:
                candidates[name](image[None])
            if round_:
                times[name].append((time.perf_counter_ns() - start) / 1e6 / len(batch))
    return {k: min(v) for k, v in times.items()}


def _choose_format(engine, images: torch.Tensor, reps: int) -> dict:
    """The engine in the default and in the channels-last memory format, alternated: keep the faster."""
    steps = engine.steps
    with _untouched(steps):
        stats = [(s.repeats, s.lookups, set(s.seen_keys)) for s in steps]

        def switch(name: str) -> None:
            engine.set_channels_last(name == "channels_last")
            for step, saved in zip(steps, stats):
                _fresh(step, saved)

        best = _timed_rounds({"default": engine._run, "channels_last": engine._run}, images, reps, before=switch)
    engine.set_channels_last(best["channels_last"] < best["default"])
    return {"engine_channels_last": engine.channels_last, "format_ms": best}


def _choose_whole(engine, images: torch.Tensor, reps: int) -> dict:
    """Engine (with its per-layer choices) against the dense model in both memory formats, alternated."""
    candidates = {
        "engine": engine._run,
        "dense": dense_fallback(engine.source, engine.input_size),
        "dense_channels_last": dense_fallback(engine.source, engine.input_size, channels_last=True),
    }
    steps = engine.steps
    with _untouched(steps):
        stats = [(s.repeats, s.lookups, set(s.seen_keys)) for s in steps]

        def fresh(name: str) -> None:
            if name == "engine":
                for step, saved in zip(steps, stats):
                    _fresh(step, saved)

        best = _timed_rounds(candidates, images, reps, before=fresh)
    dense_name = min(("dense", "dense_channels_last"), key=best.__getitem__)
    use_dense = best[dense_name] < best["engine"]
    engine.fallback = candidates[dense_name] if use_dense else None
    return {
        "engine_ms": best["engine"],
        "dense_ms": best[dense_name],
        "dense_channels_last": dense_name == "dense_channels_last",
        "fallback": use_dense,
    }
