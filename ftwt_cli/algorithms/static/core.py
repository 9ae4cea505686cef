"""The static core of a calibrated FTWT model: what its heads never keep removed physically, what they
always keep left ungated, heads only for the rest.

From per-filter keep rates measured on held-out images (:func:`keep_rates`), every gated block's filters
fall into three sets: *removed* (kept in fewer than ``min_keep_rate`` of the images, or never), *always*
(kept in every image) and *gated*. Removed filters leave the model through torch-pruning's dependency
graph, one coupled group at a time; a group loses a channel only when every conv writing it is a gated
block that removes it (a residual stream channel is zero only when all its writers are), so the pruned
model computes what the gated model computes with those masks fixed to zero.

A core block's head (:class:`CoreHead`) is the original head cut to its gated filters' rows, fed the
pooled block input put back at the original width (the removed input channels were zeros, and the
paper's softmax over channels counts them), with fixed logits for the other filters. The core is
rebuilt from plain values (:meth:`CoreSpec.to_meta`): torch-pruning's history and, per block, which
original filters and inputs survive and which filters stay gated.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ftwt_cli.algorithms.static.groups import _conv_groups, _dependency_graph, example_input, plain_history
from ftwt_cli.core.gating import FTWTModel, GatedBlock
from ftwt_cli.core.graph import ConvSpec, LinearSpec, ModelGraph, UnsupportedModel
from ftwt_cli.core.heads import DecisionHead

#: The logit of a filter a core keeps without asking (sigmoid = 1 in float32) or never computes.
ALWAYS_LOGIT = 1e4
NEVER_LOGIT = -1e4
#: The head tensors with one row per filter, cut to the gated filters (others are copied whole).
_ROW_TENSORS = ("proj.weight", "proj.bias", "logit_offset")


class CoreHead(nn.Module):
    """A block head that decides only its ``gated`` filters; ``always`` filters get ALWAYS_LOGIT and
    ``never`` ones NEVER_LOGIT. Positions refer to the block's original filters and inputs; ``kept`` are
    the filters the conv still has (in order), ``inputs`` the input channels it still reads."""

    def __init__(self, head: DecisionHead, kept: list[int], gated: list[int], inputs: list[int], never: list[int] = ()) -> None:
        super().__init__()
        in_width = head.proj.in_features
        self.spec = head.spec
        self.inner: DecisionHead | None = None
        if gated:
            self.inner = head.spec.build(in_width, len(gated)).to(head.proj.weight)
            rows = torch.tensor(gated, dtype=torch.long)
            state = {k: (v.index_select(0, rows) if k in _ROW_TENSORS else v) for k, v in head.state_dict().items()}
            self.inner.load_state_dict(state)
        # pooled input at the original width: inputs gathered from [pooled, 0]; logits from [gated, ALWAYS, NEVER]
        position = {c: i for i, c in enumerate(inputs)}
        self.register_buffer("expand", torch.tensor([position.get(c, len(inputs)) for c in range(in_width)], dtype=torch.long))
        slot = {c: i for i, c in enumerate(gated)}
        never_set = set(never)
        place = [slot[c] if c in slot else len(gated) + (1 if c in never_set else 0) for c in kept]
        self.register_buffer("place", torch.tensor(place, dtype=torch.long))
        self.register_buffer("logit_offset", torch.zeros(len(kept), dtype=head.proj.weight.dtype))
        self.gated_count = len(gated)
        # Fewer ops where nothing needs placing (batch-1 latency is mostly per-op overhead on small maps).
        self.every_input = list(inputs) == list(range(in_width))
        self.only_gated = list(gated) == list(kept)
        self.all_always = not gated and not never_set

    def pool(self, block_input: torch.Tensor) -> torch.Tensor:
        return block_input.amax(dim=(2, 3)) if self.spec.pool == "max" else block_input.mean(dim=(2, 3))

    def logits(self, pooled: torch.Tensor) -> torch.Tensor:
        fixed = pooled[:, :1] * 0
        if self.all_always:  # every filter kept: no head to run
            return (fixed + ALWAYS_LOGIT).expand(-1, self.place.numel()) + self.logit_offset
        columns = [fixed + ALWAYS_LOGIT, fixed + NEVER_LOGIT]
        if self.inner is not None:
            full = pooled if self.every_input else torch.cat([pooled, fixed], dim=1).index_select(1, self.expand)
            gated = self.inner.logits(full)
            if self.only_gated:
                return gated + self.logit_offset
            columns.insert(0, gated)
        return torch.cat(columns, dim=1).index_select(1, self.place) + self.logit_offset

    def forward(self, block_input: torch.Tensor) -> torch.Tensor:
        return self.logits(self.pool(block_input))

    def affine(self) -> None:
        return None  # no closed form the engine's fast path knows: it calls logits()

    @property
    def macs(self) -> int:
        return 0 if self.inner is None else self.inner.macs


@dataclass
class CoreSpec:
    """How a core is rebuilt: torch-pruning's history and, per block (graph order), the surviving filters
    (``kept``), those still gated, and the surviving inputs, all as original indices."""

    history: list
    kept: list[list[int]]
    gated: list[list[int]]
    inputs: list[list[int]]
    min_keep_rate: float = 0.0

    def to_meta(self) -> dict:
        return {
            "pruning_history": self.history, "kept": self.kept, "gated": self.gated, "inputs": self.inputs,
            "min_keep_rate": self.min_keep_rate,
        }  # fmt: skip

    @classmethod
    def from_meta(cls, meta: dict) -> "CoreSpec":
        return cls(meta["pruning_history"], meta["kept"], meta["gated"], meta["inputs"], float(meta.get("min_keep_rate", 0.0)))


@torch.no_grad()
def keep_rates(model: FTWTModel, batches) -> list[torch.Tensor]:
    """Per block, the fraction of images in which each filter is kept (the model's predicted masks)."""
    model.eval().configure(mask_source="predicted", record=True)
    sums, count = None, 0
    for images in batches:
        model(images)
        masks = [r.mask.double().sum(dim=0).cpu() for r in model.records()]
        sums = masks if sums is None else [s + m for s, m in zip(sums, masks)]
        count += images.shape[0]
    model.configure(record=False)
    if not count:
        raise ValueError("keep rates need at least one image")
    return [s / count for s in sums]


def build_core(model: FTWTModel, rates: list[torch.Tensor], min_keep_rate: float = 0.0) -> tuple[FTWTModel, CoreSpec]:
    """The static core of ``model`` (unchanged) from per-filter keep ``rates``; see the module docstring."""
    core = copy.deepcopy(model).eval().configure(mask_source="dense", record=False)
    never = [set(torch.nonzero((r <= 0) | (r < min_keep_rate)).flatten().tolist()) for r in rates]
    graph = _dependency_graph(core.backbone, example_input(core.backbone, core.graph.input_size))
    block_of = {id(b.conv): i for i, b in enumerate(core.blocks)}
    widths = [b.conv.out_channels for b in core.blocks]
    removals = []
    for group in _conv_groups(graph, [m for m in core.backbone.modules() if isinstance(m, nn.Linear)]):
        root = group[0].dep.target.module
        writers = [item for item in group if isinstance(item.dep.target.module, nn.Conv2d) and graph.is_out_channel_pruning_fn(item.dep.handler)]
        if any(id(item.dep.target.module) not in block_of for item in writers):
            continue  # a channel written by an ungated conv is never all zeros
        full = graph.get_pruning_group(root, graph.get_pruner_of_module(root).prune_out_channels, list(range(root.out_channels)))
        removable = set(range(root.out_channels))
        for item in full:
            module = item.dep.target.module
            if isinstance(module, nn.Conv2d) and graph.is_out_channel_pruning_fn(item.dep.handler):
                mine = never[block_of[id(module)]]
                removable &= {int(r) for i, r in zip(item.idxs, item.root_idxs) if int(i) in mine}
        if len(removable) >= root.out_channels:  # a conv keeps at least one filter: the most used one
            rate = rates[block_of[id(root)]]
            removable.discard(int(rate.argmax()))
        if removable:
            removals.append((root, sorted(removable)))
    survivors_out = [list(range(w)) for w in widths]
    survivors_in = [list(range(b.conv.in_channels)) for b in core.blocks]
    for root, idxs in removals:
        group = graph.get_pruning_group(root, graph.get_pruner_of_module(root).prune_out_channels, idxs)
        for item in group:
            module, positions = item.dep.target.module, sorted((int(i) for i in item.idxs), reverse=True)
            block = block_of.get(id(module))
            if block is None:
                continue
            out = graph.is_out_channel_pruning_fn(item.dep.handler)
            depthwise = module.groups > 1 and module.groups == module.in_channels
            for survivors in ([survivors_out[block]] if out else []) + ([survivors_in[block]] if (not out or depthwise) else []):
                for p in positions:
                    del survivors[p]
        group.prune()
    history = plain_history(graph.pruning_history())
    always = [set(torch.nonzero(r >= 1).flatten().tolist()) for r in rates]
    gated = [[c for c in kept if c not in always[b]] for b, kept in enumerate(survivors_out)]
    spec = CoreSpec(history, survivors_out, gated, survivors_in, float(min_keep_rate))
    install_heads(core, spec, [b.head for b in model.blocks])
    return core.configure(mask_source="predicted"), spec


def install_heads(core: FTWTModel, spec: CoreSpec, heads: list[DecisionHead]) -> None:
    """Give every block of a pruned ``core`` its :class:`CoreHead` and refresh the graph's widths."""
    for block, head, kept, gated, inputs in zip(core.blocks, heads, spec.kept, spec.gated, spec.inputs):
        if not isinstance(head, DecisionHead) or type(head).__init__ is not DecisionHead.__init__:
            raise UnsupportedModel(f"a static core needs heads built like the paper's; {type(head).__name__} is not")
        block.head = CoreHead(head, kept, gated, inputs)
    core.graph = refreshed_graph(core.graph, core.backbone)
    core.graph.head_macs = sum(block.head.macs for block in core.blocks)


def forced_reference(model: FTWTModel, spec: CoreSpec) -> FTWTModel:
    """``model`` (unpruned) deciding exactly as its core does: removed filters never kept, the always-kept
    ones always, the rest by their heads. The core must compute what this model computes."""
    reference = copy.deepcopy(model).eval()
    for block, kept, gated in zip(reference.blocks, spec.kept, spec.gated):
        width = block.conv.out_channels
        kept_set = set(kept)
        removed = [c for c in range(width) if c not in kept_set]
        block.head = CoreHead(block.head, list(range(width)), gated, list(range(block.conv.in_channels)), never=removed)
    return reference.configure(mask_source="predicted")


def refreshed_graph(graph: ModelGraph, backbone: nn.Module) -> ModelGraph:
    """``graph`` with every layer's width read again from the (pruned) backbone."""

    def conv_of(name: str) -> nn.Conv2d:
        module = backbone.get_submodule(name)
        return module.conv if isinstance(module, GatedBlock) else module

    convs = []
    for c in graph.convs:
        m = conv_of(c.name)
        convs.append(ConvSpec(c.name, m.in_channels, m.out_channels, m.groups, c.kernel_size, c.out_hw, c.block, c.producer))
    blocks = [
        type(b)(b.conv, b.bn, b.activation, b.monotone_activation, conv_of(b.conv).in_channels, conv_of(b.conv).out_channels)
        for b in graph.blocks
    ]
    linears = [LinearSpec(lin.name, backbone.get_submodule(lin.name).in_features, lin.out_features, lin.positions) for lin in graph.linears]
    return ModelGraph(graph.input_size, blocks, convs, linears, graph.traced)


def restore_core(model: FTWTModel, meta: dict) -> FTWTModel:
    """Rebuild a core checkpoint's model on a freshly built FTWT ``model`` (before its weights load)."""
    spec = CoreSpec.from_meta(meta)
    model.eval().configure(mask_source="dense")
    graph = _dependency_graph(model.backbone, example_input(model.backbone, model.graph.input_size))
    graph.load_pruning_history([(name, bool(is_out), list(idxs)) for name, is_out, idxs in spec.history])
    install_heads(model, spec, [b.head for b in model.blocks])
    return model.configure(mask_source="predicted")
