"""torch-pruning's dependency graph, seen from ftwt: coupled conv groups, which ones can be pruned
alone, pruning by kept counts (L1 ranking over the whole group), and replaying a pruning history.

Only conv output channels are pruned; linear layers (the classifier) stay whole. A group torch-pruning
cannot prune consistently is left whole: the CIFAR ResNets' option-A shortcut (subsample + zero-pad,
no parameters) joins residual streams of different widths, which the dependency graph cannot map, so
there only the first conv of every basic block is pruned (as in Li et al., ICLR 2017). Such groups
are found by a trial prune of one filter per group, not by model name.
"""

from __future__ import annotations

import copy
import importlib
import warnings
from typing import TYPE_CHECKING, Iterable

import torch
from torch import nn

if TYPE_CHECKING:
    import torch_pruning as tp

from ftwt_cli.core.graph import analyze
from ftwt_cli.errors import BadInput



def torch_pruning():
    """torch-pruning, imported on first use: it brings timm and huggingface_hub with it (about a second
    at start-up), which commands that never prune should not pay."""
    return importlib.import_module("torch_pruning")

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
    with warnings.catch_warnings(), torch.enable_grad():  # torch-pruning traces autograd: also under no_grad
        warnings.simplefilter("ignore")
        return torch_pruning().DependencyGraph().build_dependency(model, example_inputs=example, verbose=False)


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
    importance = torch_pruning().importance.MagnitudeImportance(p=1)
    for root_name, kept in keep.items():
        root = model.get_submodule(root_name)
        if kept >= root.out_channels:
            continue
        prune_fn = graph.get_pruner_of_module(root).prune_out_channels
        scores = importance(graph.get_pruning_group(root, prune_fn, list(range(root.out_channels))))
        drop = scores.argsort()[: root.out_channels - kept].tolist()
        graph.get_pruning_group(root, prune_fn, drop).prune()
    return plain_history(graph.pruning_history())


def restore(dense: nn.Module, history: list, input_size: tuple[int, int]) -> nn.Module:
    """Replay a pruning history on a freshly created dense model (in place; returns it)."""
    graph = _dependency_graph(dense.eval(), example_input(dense, input_size))
    try:
        graph.load_pruning_history([(name, bool(is_out), list(idxs)) for name, is_out, idxs in history])
    except (AttributeError, IndexError, ValueError) as exc:
        raise BadInput(f"the static checkpoint's pruning history does not fit this model: {exc}") from None
    return dense


