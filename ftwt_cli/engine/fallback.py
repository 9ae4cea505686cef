"""Never slower than dense: the dense references, and the build-time measurement that picks, per
layer, the sparse paths or the dense conv, and for the whole engine, the engine or the dense model.

Both choices are measured on this machine on a few calibration images (their real masks): a layer
keeps its sparse paths only where they beat its dense conv on those inputs, and the whole engine runs
the dense model (BN folded; for an FTWT model with its heads applying the masks, so outputs stay the
same) where that is faster than the engine with its per-layer choices.
"""

from __future__ import annotations

import copy
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from ftwt_cli.engine.cache import WeightCache
from ftwt_cli.gating import FTWTModel, replace_submodule
from ftwt_cli.graph import analyze

if TYPE_CHECKING:
    from ftwt_cli.engine.conv import ConvStep
    from ftwt_cli.engine.program import SparseEngine

#: A layer runs sparse only when its sparse paths are at least this much faster than its dense conv
#: (timings this close are noise; dense is the safe side).
SPARSE_MARGIN = 0.02


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


class _MaskedConv(nn.Module):
    """A BN-folded conv whose (unchanged) decision head zeroes the filters it drops."""

    def __init__(self, conv: nn.Conv2d, head: nn.Module) -> None:
        super().__init__()
        self.conv, self.head = conv, head
        self.mask: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.mask = self.head(x) > 0  # binarize's rule
        return self.conv(x).mul_(self.mask[:, :, None, None].to(x.dtype))


class DenseModel(nn.Module):
    """The whole-engine fallback: BN-folded dense convs (for an FTWT model, masked by its own heads),
    optionally in channels-last memory format. ``masked=False`` drops an FTWT model's heads: the plain
    dense backbone, the reference latencies are measured against."""

    def __init__(self, model: nn.Module, input_size: tuple[int, int], channels_last: bool = False, masked: bool = True) -> None:
        super().__init__()
        self.gates: list[_MaskedConv] = []
        if isinstance(model, FTWTModel) and masked:
            backbone = copy.deepcopy(model.backbone).eval()
            for spec in model.graph.blocks:
                gated = backbone.get_submodule(spec.conv)
                gate = _MaskedConv(fuse_conv_bn_eval(gated.conv, gated.bn), gated.head)
                replace_submodule(backbone, spec.conv, gate)
                self.gates.append(gate)
        else:
            backbone = folded_dense(model, input_size)
        self.channels_last = channels_last
        self.backbone = backbone.to(memory_format=torch.channels_last) if channels_last else backbone

    def last_masks(self) -> list[torch.Tensor]:
        """Kept masks [N, C] of the last batch, in block order."""
        return [g.mask for g in self.gates]

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.backbone(x)


def dense_fallback(model: nn.Module, input_size: tuple[int, int], channels_last: bool = False, masked: bool = True) -> DenseModel:
    return DenseModel(model, input_size, channels_last, masked).eval()


@contextmanager
def _untouched(steps: list["ConvStep"]):
    """Time steps without leaving a trace: counters, mask-repeat statistics and cache are restored."""
    saved = [(s.sparse, s.cache, dict(s.counts), s.repeats, s.lookups, set(s.seen_keys)) for s in steps]
    try:
        yield
    finally:
        for s, (sparse, cache, counts, repeats, lookups, seen) in zip(steps, saved):
            s.sparse, s.cache, s.counts, s.repeats, s.lookups, s.seen_keys = sparse, cache, counts, repeats, lookups, seen


def _fresh(step: "ConvStep", saved_stats: tuple) -> None:
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


def _layer_times(step: "ConvStep", samples: list, reps: int) -> tuple[float, float]:
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


def measure(engine: "SparseEngine", images: torch.Tensor, reps: int = 3, layers: bool = True, whole: bool = True) -> dict:
    """Pick each conv's path (sparse or dense) and the whole engine's (engine or dense model) from
    timings on ``images`` [N, 3, H, W] (a few calibration images; their masks are the heads' own).

    Returns ``{"images", "layers": [{name, block, sparse, sparse_us, dense_us, keep, active_in, macs}],
    "engine_ms", "dense_ms", "dense_channels_last", "fallback"}`` (the whole-engine entries when ``whole``).
    """
    images = images.detach()
    if images.dim() != 4 or images.shape[0] == 0:
        raise ValueError(f"calibration images must be a non-empty [N, 3, H, W] tensor, got shape {tuple(images.shape)}")
    engine.fallback = None
    steps = engine.steps
    report: dict = {"images": len(images), "layers": []}
    with torch.no_grad():
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


def _choose_layer(step: "ConvStep", block: int | None, samples: list, reps: int) -> dict:
    keep = np.mean([1.0 if m is None else m.mean() for _, m in samples])
    active = np.mean([x.idx.size / x.width for x, _ in samples])
    # Nothing to choose where every call is the full conv anyway (or a general grouped conv: always dense).
    choosable = (step.depthwise or step.groups == 1) and (keep < 1.0 or active < 1.0)
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
        "macs": step.macs,
    }


def _choose_whole(engine: "SparseEngine", images: torch.Tensor, reps: int) -> dict:
    """Engine (with its per-layer choices) against the dense model in both memory formats, alternated."""
    candidates = {
        "engine": engine._run,
        "dense": dense_fallback(engine.source, engine.input_size),
        "dense_channels_last": dense_fallback(engine.source, engine.input_size, channels_last=True),
    }
    times: dict[str, list[float]] = {k: [] for k in candidates}
    steps = engine.steps
    with _untouched(steps):
        stats = [(s.repeats, s.lookups, set(s.seen_keys)) for s in steps]
        for round_, batch in enumerate(_rounds(list(images), reps)):
            order = list(candidates) if round_ % 2 == 0 else list(candidates)[::-1]
            for name in order:
                if name == "engine":
                    for step, saved in zip(steps, stats):
                        _fresh(step, saved)
                start = time.perf_counter_ns()
                for image in batch:
                    candidates[name](image[None])
                if round_:
                    times[name].append((time.perf_counter_ns() - start) / 1e6 / len(batch))
    best = {k: min(v) for k, v in times.items()}
    dense_name = min(("dense", "dense_channels_last"), key=best.__getitem__)
    use_dense = best[dense_name] < best["engine"]
    engine.fallback = candidates[dense_name] if use_dense else None
    return {
        "engine_ms": best["engine"],
        "dense_ms": best[dense_name],
        "dense_channels_last": dense_name == "dense_channels_last",
        "fallback": use_dense,
    }
