"""Fitting an engine's pre-sliced sub-networks on held-out images, under a memory cap.

1. The held-out images run once with every conv dense (the masks are exact whatever the path): each
   gated conv records its heads' masks and how many input channels it sees.
2. :func:`~ftwt_cli.engine.prototypes.allocate` picks each conv's prototype sets under the cap
   (a codebook's prototypes are taken as they are), rounded up to oneDNN's channel block on the convs
   that run on it.
3. The images run again on the prototypes: the (prototype, input channel set) pairs they use get their
   sub-convs sliced, counted; the least used are dropped until the cap holds.
4. Every sub-conv is laid out for the engine's memory format and its kernel timed.

:func:`prototype_report` says what was fitted and, after timed runs, how the calls were served.
"""

from __future__ import annotations

import numpy as np
import torch

from ftwt_cli.engine.conv import ConvStep
from ftwt_cli.engine.percall import on_onednn
from ftwt_cli.engine.prototypes import CHANNEL_BLOCK, Prototypes, allocate, from_lists, to_lists


def gated_steps(engine) -> list[ConvStep]:
    """The convs with a head whose kind has prototypes (regular and depthwise convs)."""
    return [s for s in engine.steps if s.head is not None and (s.geometry.regular or s.geometry.depthwise)]


def _record_masks(engine, images: torch.Tensor, steps: list[ConvStep]) -> None:
    flags = [s.sparse for s in engine.steps]
    tables = [s.prototypes for s in engine.steps]
    for step in engine.steps:
        step.sparse, step.prototypes, step.seen = False, None, []
    try:
        with torch.no_grad():
            for image in images:
                engine._run(image[None])
    finally:
        for step, flag, table in zip(engine.steps, flags, tables):
            step.sparse, step.prototypes = flag, table


def fit_prototypes(engine, images: torch.Tensor, budget_bytes: float) -> dict:
    """Fit ``engine``'s prototypes and sub-convs on ``images`` [N, 3, H, W]; returns :func:`prototype_report`."""
    if images.dim() != 4 or images.shape[0] == 0:
        raise ValueError(f"prototype images must be a non-empty [N, 3, H, W] tensor, got shape {tuple(images.shape)}")
    steps = gated_steps(engine)
    _record_masks(engine, images, steps)
    layers = []
    for step in steps:
        seen, step.seen = step.seen or [], None
        g = step.geometry
        kernel = g.weight[0, 0].numel()
        inputs = float(np.mean([m.sum() for _, m in seen])) if seen else float(g.in_per_group)
        per_channel = kernel * 4 * 2 * (1 if g.depthwise else inputs)  # two layouts reserved (see SubConv.nbytes)
        fixed = step.head.prototypes
        block = CHANNEL_BLOCK if on_onednn(g, round(inputs)) else 1
        layers.append({"masks": np.stack([m for m, _ in seen]), "macs": g.macs, "bytes_per_channel": per_channel, "fixed": fixed, "block": block})
    for step, sets in zip(steps, allocate(layers, budget_bytes)):
        fixed = step.head.prototypes is not None
        step.set_prototypes(Prototypes(np.stack(sets), "codebook" if fixed else "fitted") if len(sets) else None)
    prebuild(engine, images, budget_bytes)
    engine.fitted_on = len(images)
    return prototype_report(engine)


def prebuild(engine, images: torch.Tensor, budget_bytes: float) -> None:
    """Run ``images`` on the prototypes (cap lifted), keep the most used sub-convs within the cap."""
    memory = engine.memory
    cap, memory.budget = memory.budget, float("inf")
    flags = [s.sparse for s in engine.steps]
    steps = [s for s in engine.steps if s.prototypes is not None]
    for step in engine.steps:
        step.sparse = True
    for step in steps:
        step.pair_counts = {}
    try:
        with torch.no_grad():
            for image in images:
                engine._run(image[None])
    finally:
        memory.budget = cap
        for step, flag in zip(engine.steps, flags):
            step.sparse = flag
    usage = sorted(
        ((count, -step.subconvs[pair].nbytes, i, pair) for i, step in enumerate(steps) for pair, count in step.pair_counts.items() if pair in step.subconvs),
    )  # fmt: skip
    for _, _, i, pair in usage:  # the least used (and, among those, the biggest) go first
        if memory.used <= min(cap, budget_bytes):
            break
        steps[i].drop_subconvs([pair])
    for step in steps:
        step.pair_counts = None
        step.counts = dict.fromkeys(step.counts, 0)
        step.extra_macs = 0
    for step in engine.steps:
        step.prepare(engine.channels_last)


def load_prototypes(engine, document: dict, source: str = "checkpoint") -> None:
    """Install prototype sets from plain lists (:func:`~ftwt_cli.engine.prototypes.to_lists`); ValueError
    when a conv is unknown or a set's width is not its filter count."""
    sets = from_lists(document)
    by_name = {s.name: s for s in gated_steps(engine)}
    unknown = sorted(set(sets) - set(by_name))
    if unknown:
        raise ValueError(f"engine prototypes name convs this model has no head for: {', '.join(unknown[:3])}")
    for name, table in sets.items():
        if table.shape[1] != by_name[name].geometry.out_channels:
            raise ValueError(f"engine prototypes of {name}: width {table.shape[1]}, the conv has {by_name[name].geometry.out_channels} filters")
        by_name[name].set_prototypes(Prototypes(table, source))


def prototype_lists(engine) -> dict:
    """The engine's prototype sets as plain lists (for a checkpoint's meta or JSON)."""
    return to_lists({s.name: s.prototypes for s in gated_steps(engine) if s.prototypes is not None})


def prototype_report(engine) -> dict:
    """What the prototypes hold and, since the counters were last reset, how calls were served:
    ``coverage`` (calls of convs with prototypes that ran one), ``extra_mac_pct`` (MACs computed for
    channels a prototype adds and the mask drops, % of the dense MACs of those calls)."""
    steps = [s for s in gated_steps(engine) if s.prototypes is not None]
    served = sum(s.counts["proto"] for s in steps)
    missed = sum(s.counts["uncovered"] + s.counts["over_cap"] for s in steps)
    built = sum(s.counts["proto_built"] for s in steps)
    calls_macs = sum(s.geometry.macs * (s.counts["proto"] + s.counts["uncovered"] + s.counts["over_cap"]) for s in steps)
    extra = sum(s.extra_macs for s in steps)
    sources = sorted({s.prototypes.source for s in steps})
    return {
        "layers": len(steps),
        "prototypes": sum(len(s.prototypes) for s in steps),
        "subconvs": sum(len(s.subconvs) for s in steps),
        "memory_mb": engine.memory.used / 2**20,
        "memory_cap_mb": engine.memory.budget / 2**20,
        "fitted_on": getattr(engine, "fitted_on", 0),
        "source": ",".join(sources) if sources else None,
        "calls": served + missed,
        "coverage": served / (served + missed) if served + missed else float("nan"),
        "uncovered": sum(s.counts["uncovered"] for s in steps),
        "over_cap": sum(s.counts["over_cap"] for s in steps),
        "built_at_run_time": built,
        "extra_mac_pct": 100.0 * extra / calls_macs if calls_macs else 0.0,
    }
