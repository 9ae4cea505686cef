"""Static pruning baselines through torch-pruning: the comparisons FTWT has to win (paper Tables 1 and 6).

Layering follows torch-pruning's own: its ``DependencyGraph`` says which layers are coupled (residual
adds, depthwise convs, BN), its importance criteria say which filters matter, and this module only
decides how many filters go so that ftwt's own MAC accounting (:mod:`ftwt_cli.flops`) reaches a target:

* ``uniform``  the same fraction of filters from every prunable conv (to within one filter), ranked
               by L1 norm (``MagnitudeImportance(p=1)``); the fraction is bisected on the measured
               reduction;
* ``taylor``   global first-order Taylor importance (Molchanov et al., CVPR 2019) over a few
               mini-batches, pruned in shrinking steps, gradients recomputed before every step,
               until the target is reached;
* ``counts``   a predefined signature: per-layer kept-filter counts (L1 ranking within each layer).

Only conv output channels are pruned; linear layers (the classifier) stay whole. A group torch-pruning
cannot prune consistently is left whole: the CIFAR ResNets' option-A shortcut (subsample + zero-pad,
no parameters) joins residual streams of different widths, which the dependency graph cannot map, so
there only the first conv of every basic block is pruned (as in Li et al., ICLR 2017). Such groups
are found by a trial prune of one filter per group, not by model name.

A pruned model is stored without pickling modules: the checkpoint meta carries torch-pruning's
pruning history (module names and removed indices, plain lists), and :func:`restore` replays it on a
freshly created dense model before the state dict is loaded.
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from ftwt_cli.config import check_target_flops
from ftwt_cli.errors import BadInput
from ftwt_cli.graph import analyze

METHODS = ("uniform", "taylor")
#: Accepted distance (points) between the target FLOPs reduction and the pruned model's.
TOLERANCE = 0.5
#: Largest fraction of a layer's filters any method may remove (a layer never disappears).
MAX_LAYER_FRACTION = 0.9
#: Mini-batches whose summed gradients score the filters before each Taylor step.
TAYLOR_BATCHES = 4
TAYLOR_MAX_STEPS = 80
BISECTION_STEPS = 18


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


# ---------------------------------------------------------------------------------------------------
# Graph helpers


def example_input(model: nn.Module, input_size: tuple[int, int]) -> torch.Tensor:
    param = next(model.parameters())
    return torch.zeros(1, 3, *input_size, device=param.device, dtype=param.dtype)


def macs_of(model: nn.Module, input_size: tuple[int, int]) -> int:
    """Dense MACs of conv and linear layers, ftwt's accounting (the same number every command reports)."""
    return int(analyze(model, input_size).dense_macs)


def plain_history(history: Iterable) -> list:
    """torch-pruning's history as JSON/``weights_only``-safe lists: [module name, out-channels?, [indices]]."""
    return [[str(name), bool(is_out), [int(i) for i in idxs]] for name, is_out, idxs in history]


def _dependency_graph(model: nn.Module, example: torch.Tensor) -> tp.DependencyGraph:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tp.DependencyGraph().build_dependency(model, example_inputs=example, verbose=False)


def _out_pruned_convs(graph: tp.DependencyGraph, group) -> list[nn.Conv2d]:
    return [
        dep.target.module
        for dep, _ in group
        if isinstance(dep.target.module, nn.Conv2d) and graph.is_out_channel_pruning_fn(dep.handler)
    ]


def _conv_groups(graph: tp.DependencyGraph, ignored: list[nn.Module]) -> list:
    return list(graph.get_all_groups(ignored_layers=ignored, root_module_types=[nn.Conv2d]))


def unprunable_convs(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Names of convs in groups whose pruning breaks the forward pass (found by trial, on copies).

    One filter of every group is removed in turn; the first group after which the model no longer
    runs (or changes its output shape) is marked and the trial restarts on a fresh copy without it.
    """
    with torch.no_grad():
        reference = model(example).shape
    marked: list[str] = []
    while True:
        trial = copy.deepcopy(model)
        names = {m: n for n, m in trial.named_modules()}
        graph = _dependency_graph(trial, example)
        ignored = [trial.get_submodule(n) for n in marked] + _linears(trial)
        broken = None
        for group in _conv_groups(graph, ignored):
            root = group[0].dep.target.module
            members = [names[c] for c in _out_pruned_convs(graph, group)]
            if root.out_channels < 2:
                continue
            graph.get_pruning_group(root, graph.get_pruner_of_module(root).prune_out_channels, [0]).prune()
            try:
                with torch.no_grad():
                    ok = trial(example).shape == reference
            except Exception:  # noqa: BLE001 - any failure means this group cannot be pruned alone
                ok = False
            if not ok:
                broken = members
                break
        if broken is None:
            return marked
        marked.extend(broken)


def _linears(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def _ignored(model: nn.Module, whole: list[str]) -> list[nn.Module]:
    return [model.get_submodule(n) for n in whole] + _linears(model)


def kept_counts(pruned: nn.Module, block_convs: list[str]) -> dict[str, int]:
    """Filters each gated block conv keeps in ``pruned`` (names are dense backbone names)."""
    return {name: int(pruned.get_submodule(name).out_channels) for name in block_convs}


# ---------------------------------------------------------------------------------------------------
# Methods


def _groups(model: nn.Module, example: torch.Tensor, whole: list[str]) -> list[tuple[str, int, list[str]]]:
    """(root conv name, width, names of every conv whose filters the group removes) per prunable group."""
    names = {m: n for n, m in model.named_modules()}
    graph = _dependency_graph(model, example)
    groups = []
    for group in _conv_groups(graph, _ignored(model, whole)):
        root = group[0].dep.target.module
        groups.append((names[root], root.out_channels, [names[c] for c in _out_pruned_convs(graph, group)]))
    return groups


def prune_groups(model: nn.Module, keep: dict[str, int], example: torch.Tensor) -> list:
    """Keep ``keep[root]`` filters (highest L1 norm over the whole coupled group) of every listed group,
    in place; returns torch-pruning's history."""
    graph = _dependency_graph(model, example)
    importance = tp.importance.MagnitudeImportance(p=1)
    for root_name, kept in keep.items():
        root = model.get_submodule(root_name)
        if kept >= root.out_channels:
            continue
        prune_fn = graph.get_pruner_of_module(root).prune_out_channels
        scores = importance(graph.get_pruning_group(root, prune_fn, list(range(root.out_channels))))
        drop = scores.argsort()[: root.out_channels - kept].tolist()
        graph.get_pruning_group(root, prune_fn, drop).prune()
    return plain_history(graph.pruning_history())


def uniform(dense: nn.Module, target_pct: float, input_size: tuple[int, int]) -> StaticResult:
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


def taylor(
    dense: nn.Module,
    target_pct: float,
    input_size: tuple[int, int],
    batches: list[tuple[torch.Tensor, torch.Tensor]],
) -> StaticResult:
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
    floor = {
        name: max(1, math.ceil((1 - MAX_LAYER_FRACTION) * m.out_channels))
        for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d)
    }
    importance = tp.importance.TaylorImportance()
    history: list = []
    reduction, steps, stalled = 0.0, 0, False
    while reduction < target_pct - TOLERANCE and steps < TAYLOR_MAX_STEPS:
        before = (copy.deepcopy(model), len(history), reduction)
        names = {m: n for n, m in model.named_modules()}
        graph = _dependency_graph(model, example)
        model.zero_grad(set_to_none=True)
        for images, labels in batches:
            F.cross_entropy(model(images), labels).backward()
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


# ---------------------------------------------------------------------------------------------------
# Checkpoints and signatures


def restore(dense: nn.Module, history: list, input_size: tuple[int, int]) -> nn.Module:
    """Replay a pruning history on a freshly created dense model (in place; returns it)."""
    graph = _dependency_graph(dense.eval(), example_input(dense, input_size))
    try:
        graph.load_pruning_history([(name, bool(is_out), list(idxs)) for name, is_out, idxs in history])
    except (AttributeError, IndexError, ValueError) as exc:
        raise BadInput(f"the static checkpoint's pruning history does not fit this model: {exc}") from None
    return dense


def read_signature(path: str, block_convs: dict[str, int]) -> dict[str, int]:
    """A signature file: JSON ``{"block conv name": kept filters, ...}``; ``block_convs`` maps names to widths.

    Blocks the file leaves out keep every filter.
    """
    try:
        doc = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise BadInput(f"signature file not found: {path}") from None
    except (OSError, ValueError) as exc:
        raise BadInput(f"signature file {path} is not valid JSON: {exc}") from None
    if isinstance(doc, dict) and isinstance(doc.get("kept_filters"), dict):
        doc = doc["kept_filters"]  # a static checkpoint's or run's record works as a file too
    if not isinstance(doc, dict) or not doc:
        raise BadInput(f"signature file {path} must map gated block names to kept-filter counts")
    unknown = sorted(set(doc) - set(block_convs))
    if unknown:
        raise BadInput(
            f"signature file {path} names {unknown[0]!r}, which is not a gated block "
            f"(blocks: {', '.join(list(block_convs)[:6])}...)"
        )
    result = dict(block_convs)
    for name, count in doc.items():
        if not isinstance(count, int) or isinstance(count, bool) or not (1 <= count <= block_convs[name]):
            raise BadInput(f"signature file {path}: {name} must keep 1..{block_convs[name]} filters, got {count!r}")
        result[name] = count
    return result


def signature_macs(graph, kept: dict[str, int]) -> float:
    """MACs of a dense graph when every block keeps ``kept`` filters (ftwt's accounting, per sample)."""
    from ftwt_cli.flops import FlopsCounter

    masks = []
    for block in graph.blocks:
        mask = torch.zeros(1, block.out_channels, dtype=torch.bool)
        mask[0, : kept[block.conv]] = True
        masks.append(mask)
    return float(FlopsCounter(graph).macs_from_masks(masks)[0])


# ---------------------------------------------------------------------------------------------------
# Runs: what `ftwt train --static` and `--signature` set up before the shared training loop


def apply_signature(model, kept: dict[str, int]) -> list:
    """Fix every gated block of an FTWT model to keep ``kept[conv]`` channels per sample (top-k routing).

    Returns the per-block top-k targets the heads are trained towards.
    """
    from ftwt_cli.gating import FixedCountTarget

    names = [b.conv for b in model.graph.blocks]
    missing = [n for n in names if n not in kept]
    if missing:
        raise BadInput(f"the signature has no count for gated block {missing[0]!r}")
    counts = [int(kept[n]) for n in names]
    targets = [FixedCountTarget(k) for k in counts]
    model.configure(keep_counts=counts, target=targets)
    return targets


def check_target(target_pct: float | None, what: str) -> float:
    if target_pct is None:
        raise BadInput(f"{what} needs --target-flops P (percent of FLOPs to remove)")
    return check_target_flops(target_pct)


def _dense_init(cfg, init: str | None):
    from ftwt_cli import runtime

    if init is None:
        raise BadInput("static pruning and signatures start from a dense model: pass --init DENSE_CKPT")
    return runtime.load_model(cfg, init, require="dense")


def taylor_batches(cfg) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first TAYLOR_BATCHES shuffled (seeded) training mini-batches, without augmentation, never from
    the validation images a run holds out."""
    from ftwt_cli import runtime
    from ftwt_cli.data import make_loader

    train_set, _ = runtime.training_splits(cfg, augment=False)  # never the held-out validation images
    loader = make_loader(train_set, cfg.batch_size, shuffle=True, workers=cfg.workers, seed=cfg.seed)
    batches = []
    for images, labels in loader:
        batches.append((images, labels))
        if len(batches) == TAYLOR_BATCHES:
            break
    return batches


def signature_record(cfg, init: str | None, source: str, target_pct: float | None) -> dict:
    """Resolve ``--signature FILE|taylor`` into per-block kept-filter counts (a run spec's ``signature``)."""
    from ftwt_cli import runtime

    dense = _dense_init(cfg, init).model.eval()
    size = runtime.input_size(cfg)
    graph = analyze(dense, size)
    widths = {b.conv: b.out_channels for b in graph.blocks}
    if source == "taylor":
        target_pct = check_target(target_pct, "--signature taylor")
        kept = taylor(dense, target_pct, size, taylor_batches(cfg)).kept
    else:
        if target_pct is not None:
            raise BadInput("a signature file fixes the FLOPs itself; drop --target-flops (or use --signature taylor)")
        kept = read_signature(source, widths)
    reduction = 100.0 * (1.0 - signature_macs(graph, kept) / graph.dense_macs)
    return {"source": source, "target_flops": target_pct, "counts": kept, "reduction_pct": reduction}


def run_spec(cfg, method: str, init: str | None, target_pct: float | None, signature: dict | None = None):
    """The RunSpec of a static baseline: pruned from ``init`` when the run starts, then fine-tuned with
    the profile's dynamic recipe (epochs, lr, milestones) in the dense training loop."""
    from ftwt_cli.train import RunSpec

    if method not in (*METHODS, "signature"):
        raise BadInput(f"--static must be uniform or taylor, got {method!r}")
    if method != "signature":
        target_pct = check_target(target_pct, f"--static {method}")
    if init is None:
        raise BadInput("static pruning starts from a dense model: pass --init DENSE_CKPT")
    recipe = cfg.override(dense_epochs=cfg.epochs, dense_lr=cfg.lr, dense_milestones=list(cfg.milestones))
    record = {"method": method, "target_flops": target_pct, "init": init}
    if signature is not None:
        record |= {"signature_source": signature["source"], "counts": signature["counts"]}
    return RunSpec(recipe, dense=True, static=record)


def prune_for_run(spec, device: torch.device):
    """Load the run's dense init and prune it (called once when a static run starts; CPU, deterministic)."""
    from ftwt_cli import runtime
    from ftwt_cli.console import console

    cfg, record = spec.config, spec.static
    loaded = _dense_init(cfg, record["init"])
    dense = loaded.model.eval()
    size = runtime.input_size(cfg)
    method = record["method"]
    if method == "uniform":
        result = uniform(dense, record["target_flops"], size)
    elif method == "taylor":
        result = taylor(dense, record["target_flops"], size, taylor_batches(cfg))
    else:
        result = counts(dense, record["counts"], size)
    record |= {
        "reduction_pct": result.reduction_pct,
        "fraction": result.fraction,
        "steps": result.steps,
        "left_whole": result.whole,
    }
    meta = {**loaded.meta, **result.meta(), "init": record["init"]}
    if method == "signature":
        meta["signature_source"] = record.get("signature_source")
    console.print(
        f"static {method}: {result.dense_macs / 1e6:.2f} → {result.macs / 1e6:.2f} MMACs "
        f"({result.reduction_pct:.2f}% FLOPs reduction)"
        + (f", {len(result.whole)} convs left whole" if result.whole else ""),
        highlight=False,
    )
    return runtime.LoadedModel(result.model.train(), meta, None)
