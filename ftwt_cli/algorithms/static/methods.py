"""Static pruning methods: how many filters each layer keeps so that a FLOPs target is met.

Each method is one function registered in :data:`STATIC_METHODS` (``--static`` lists them), called as
``method(dense, target_pct, input_size, batches)`` where ``batches()`` returns a few training
mini-batches for methods that score filters with gradients (it is not called otherwise):

* ``uniform``  the same fraction of filters from every prunable conv (to within one filter), ranked
               by L1 norm (``MagnitudeImportance(p=1)``); the fraction is bisected on the measured
               reduction;
* ``taylor``   global first-order Taylor importance (Molchanov et al., CVPR 2019) over a few
               mini-batches, pruned in shrinking steps, gradients recomputed before every step,
               until the target is reached.

:func:`counts` prunes to given per-layer counts (a predefined signature's static counterpart).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ftwt_cli.algorithms.outputs import training_outputs
from ftwt_cli.algorithms.static.groups import (
    torch_pruning,
    _conv_groups,
    _dependency_graph,
    _groups,
    _ignored,
    example_input,
    kept_counts,
    macs_of,
    plain_history,
    prune_groups,
    unprunable_convs,
)
from ftwt_cli.core.graph import analyze
from ftwt_cli.core.registry import Registry
from ftwt_cli.errors import BadInput

#: Accepted distance (points) between the target FLOPs reduction and the pruned model's.
TOLERANCE = 0.5
#: Largest fraction of a layer's filters any method may remove (a layer never disappears).
MAX_LAYER_FRACTION = 0.9
#: Mini-batches whose summed gradients score the filters before each Taylor step.
TAYLOR_BATCHES = 4
TAYLOR_MAX_STEPS = 80
BISECTION_STEPS = 18

Batches = Callable[[], list[tuple[torch.Tensor, torch.Tensor]]]
#: Static pruning methods by name (``--static``).
STATIC_METHODS: Registry[Callable[..., "StaticResult"]] = Registry("static pruning method")


@dataclass
class StaticResult:
    """A pruned model and how it was reached; ``history`` rebuilds it (see :func:`restore`)."""

    model: nn.Module
    method: str
    target_pct: float | None
    dense_macs: int
    macs: int
    history: list = field(default_factory=list)
    fraction: float | None = None  # uniform: the bisected fraction of filters removed per layer
    steps: int = 0  # taylor: pruning steps taken
    kept: dict[str, int] = field(default_factory=dict)  # gated block conv name → filters kept
    whole: list[str] = field(default_factory=list)  # convs left whole (groups torch-pruning cannot prune)

    @property
    def reduction_pct(self) -> float:
        return 100.0 * (1.0 - self.macs / self.dense_macs)

    def meta(self) -> dict:
        """The checkpoint meta fields of a static model (plain values only)."""
        return {
            "kind": "static",
            "method": self.method,
            "target_flops": self.target_pct,
            "dense_macs": int(self.dense_macs),
            "static_macs": int(self.macs),
            "static_reduction_pct": self.reduction_pct,
            "pruning_history": plain_history(self.history),
            "kept_filters": dict(self.kept),
        }


@STATIC_METHODS.register("uniform")
def uniform(dense: nn.Module, target_pct: float, input_size: tuple[int, int], batches: Batches | None = None) -> StaticResult:
    """Remove the same fraction of filters from every prunable group (L1 ranking), the fraction bisected
    on the measured reduction of pruned copies of ``dense``.

    Widths are integers, so one fraction step can move many layers at once (every 32- and 64-wide layer
    of a CIFAR net drops a filter at the same fraction). Between the last fraction below the target and
    the first above it, layers are therefore stepped one filter at a time, in the order the fraction
    would step them: every layer stays within one filter of the common fraction.
    """
    dense = dense.eval()
    example = example_input(dense, input_size)
    dense_macs = macs_of(dense, input_size)
    whole = unprunable_convs(dense, example)
    groups = _groups(dense, example, whole)

    def keep_at(fraction: float) -> dict[str, int]:
        return {root: max(1, int(width * (1.0 - fraction) + 1e-9)) for root, width, _ in groups}

    def attempt(keep: dict[str, int]) -> tuple[nn.Module, list, float]:
        model = copy.deepcopy(dense)
        history = prune_groups(model, keep, example)
        return model, history, 100.0 * (1.0 - macs_of(model, input_size) / dense_macs)

    if attempt(keep_at(MAX_LAYER_FRACTION))[2] < target_pct - TOLERANCE:
        raise BadInput(
            f"static uniform pruning reaches at most {attempt(keep_at(MAX_LAYER_FRACTION))[2]:.1f}% FLOPs "
            f"reduction on this model (target {target_pct:g}%); lower --target-flops"
        )
    low, high = 0.0, MAX_LAYER_FRACTION
    for _ in range(BISECTION_STEPS):
        middle = (low + high) / 2
        reduction = attempt(keep_at(middle))[2]
        if reduction < target_pct:
            low = middle
        else:
            high = middle
    # Step from the fraction below the target towards the one above, one filter of one layer at a time.
    keep, goal = keep_at(low), keep_at(high)
    best = (abs(attempt(keep)[2] - target_pct), dict(keep))
    widths = {root: width for root, width, _ in groups}
    while keep != goal:
        # The layer the fraction steps next: the one whose next filter removal comes at the lowest fraction.
        root = min((r for r in keep if keep[r] > goal[r]), key=lambda r: (1.0 - (keep[r] - 1) / widths[r], r))
        keep[root] -= 1
        distance = abs(attempt(keep)[2] - target_pct)
        if distance < best[0]:
            best = (distance, dict(keep))
    model, history, _ = attempt(best[1])
    return _result(dense, model, "uniform", target_pct, dense_macs, history, input_size, whole, fraction=low)


@STATIC_METHODS.register("taylor")
def taylor(dense: nn.Module, target_pct: float, input_size: tuple[int, int], batches: Batches) -> StaticResult:
    """Global first-order Taylor pruning of a copy of ``dense`` in shrinking steps until ``target_pct``.

    Each step sums the gradients of ``batches`` (BN in eval mode, so the statistics stay the dense
    model's), scores every filter with torch-pruning's ``TaylorImportance`` (normalised per group, so
    scores compare across layers), and removes the globally lowest ones. The step size comes from the
    remaining gap, so the last steps remove single filters; a step that lands further past the target
    than its start was short of it is undone. Exactly the chosen number of filters is removed (ties,
    e.g. dead ReLU channels that all score 0, are broken by order), unlike a score threshold.
    """
    model = copy.deepcopy(dense).eval()
    example = example_input(model, input_size)
    dense_macs = macs_of(model, input_size)
    whole = unprunable_convs(model, example)
    batches = batches()
    floor = {
        name: max(1, math.ceil((1 - MAX_LAYER_FRACTION) * m.out_channels))
        for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d)
    }
    importance = torch_pruning().importance.TaylorImportance()
    history: list = []
    reduction, steps, stalled = 0.0, 0, False
    while reduction < target_pct - TOLERANCE and steps < TAYLOR_MAX_STEPS:
        before = (copy.deepcopy(model), len(history), reduction)
        names = {m: n for n, m in model.named_modules()}
        graph = _dependency_graph(model, example)
        model.zero_grad(set_to_none=True)
        for images, labels in batches:
            training_outputs(model(images)).loss(labels).backward()
        candidates: list[tuple[float, int, str, int]] = []  # (score, rank within its group, root, filter)
        for group in _conv_groups(graph, _ignored(model, whole)):
            root = group[0].dep.target.module
            removable = root.out_channels - floor[names[root]]
            scores = importance(group)
            if removable <= 0 or scores is None:
                continue
            for rank, index in enumerate(scores.argsort(stable=True)[:removable].tolist()):
                candidates.append((float(scores[index]), rank, names[root], index))
        if not candidates:
            stalled = True  # every layer is at its floor
            break
        # Removing a fraction c of all filters removes at most about 2c of the MACs (inputs and outputs).
        total = sum(m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d))
        count = max(1, int(total * min(0.1, (target_pct - reduction) / 100.0 / 2.5)))
        chosen: dict[str, list[int]] = {}
        for _, _, root_name, index in sorted(candidates)[:count]:
            chosen.setdefault(root_name, []).append(index)
        for root_name, indices in chosen.items():
            root = model.get_submodule(root_name)
            graph.get_pruning_group(root, graph.get_pruner_of_module(root).prune_out_channels, indices).prune()
        model.zero_grad(set_to_none=True)
        history += plain_history(graph.pruning_history())
        steps += 1
        reduction = 100.0 * (1.0 - macs_of(model, input_size) / dense_macs)
        if reduction > target_pct + TOLERANCE and abs(before[2] - target_pct) < abs(reduction - target_pct):
            # The smallest step overshot further than where it started: keep the state before it.
            model, history, reduction = before[0], history[: before[1]], before[2]
            steps -= 1
            break
    if (stalled or steps == TAYLOR_MAX_STEPS) and reduction < target_pct - 2 * TOLERANCE:
        raise BadInput(
            f"static Taylor pruning stopped at {reduction:.1f}% FLOPs reduction (target {target_pct:g}%); "
            "lower --target-flops"
        )
    return _result(dense, model, "taylor", target_pct, dense_macs, history, input_size, whole, steps=steps)


def counts(dense: nn.Module, kept: dict[str, int], input_size: tuple[int, int]) -> StaticResult:
    """Static counterpart of a predefined signature: keep ``kept[conv]`` filters (highest L1) per layer.

    Coupled convs (a residual stream, a pointwise conv and its depthwise follower) share one filter
    set; it keeps the largest count asked of any member. Convs left whole keep every filter.
    """
    model = copy.deepcopy(dense).eval()
    example = example_input(model, input_size)
    dense_macs = macs_of(model, input_size)
    whole = unprunable_convs(model, example)
    keep = {}
    for root, width, members in _groups(model, example, whole):
        wanted = [kept[m] for m in members if m in kept]
        if wanted:
            keep[root] = min(width, max(wanted))
    history = prune_groups(model, keep, example)
    return _result(dense, model, "signature", None, dense_macs, history, input_size, whole)


def _result(dense, model, method, target_pct, dense_macs, history, input_size, whole, **extra) -> StaticResult:
    blocks = [b.conv for b in analyze(dense, input_size).blocks]
    return StaticResult(
        model=model,
        method=method,
        target_pct=target_pct,
        dense_macs=dense_macs,
        macs=macs_of(model, input_size),
        history=history,
        kept=kept_counts(model, blocks),
        whole=whole,
        **extra,
    )


