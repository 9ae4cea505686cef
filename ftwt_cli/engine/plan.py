"""Plan: which sub-networks exist. The model is traced once (torch.fx, gated blocks and BNs as leaves)
and every node is given its role; every conv, the channel sets its sub-convs are sliced to.

* A gated block whose codebook holds K prototypes is **routed**: K output sets, one per prototype. Its
  input sets are its producer's prototypes when the input is another routed block's output (through
  zero-preserving channel-wise layers only), so K_in × K sub-convs; a dense input (the residual stream,
  the image) gives K.
* A gated block without a codebook (free per-image masks) is **masked**: the dense conv, then its
  head's mask multiplied in. Free masks cannot be pre-sliced; this is the exact, not the fast, path.
* A plain conv (a dense model, an ungated conv) is one sub-conv per input set, every output channel.
* A ReLU or ReLU6 that is a conv's only user is fused into that conv's sub-convs.

Nothing here slices a weight: :mod:`~ftwt_cli.engine.program` builds what the plan names.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from ftwt_cli.core.batchnorm import LeafTracer
from ftwt_cli.core.gating import FTWTModel, GatedBlock
from ftwt_cli.core.graph import is_zero_preserving
from ftwt_cli.engine.kernels import RELU, RELU6, Activation

ADDS = (operator.add, torch.add, operator.iadd)


class _LeafGatedBlocks(LeafTracer):  # BN modules and modules fx cannot trace stay leaves, as in core.graph
    def is_leaf_module(self, m: nn.Module, qualified_name: str) -> bool:
        return isinstance(m, GatedBlock) or super().is_leaf_module(m, qualified_name)


@dataclass
class ConvPlan:
    """One conv of the program: its module, how it decides its filters, and its channel sets."""

    name: str
    conv: nn.Conv2d
    bn: nn.BatchNorm2d | None
    mode: str  # "routed", "masked" or "plain"
    block: GatedBlock | None
    block_index: int | None
    in_sets: list[torch.Tensor | None]  # None: the dense input, every channel
    out_sets: list[torch.Tensor]
    producer: str | None  # the routed conv whose prototypes are the in_sets (None: dense input)
    in_hw: tuple[int, int]
    activation: Activation | None = None

    @property
    def subconvs(self) -> int:
        return len(self.in_sets) * len(self.out_sets)


@dataclass
class Plan:
    graph_module: torch.fx.GraphModule
    order: list[torch.fx.Node]  # the nodes that run, in graph order
    slot: dict[torch.fx.Node, int]  # where each node's value lives (aliases share)
    roles: dict[torch.fx.Node, str]  # input, conv, channelwise, add, dense, output
    convs: dict[torch.fx.Node, ConvPlan] = field(default_factory=dict)
    gated: bool = False

    @property
    def routed(self) -> bool:
        return any(c.mode == "routed" for c in self.convs.values())


def is_add(node: torch.fx.Node) -> bool:
    a = node.args
    return node.op == "call_function" and node.target in ADDS and len(a) == 2 and not node.kwargs and all(isinstance(x, torch.fx.Node) for x in a)


def _fusable(node: torch.fx.Node, modules: dict) -> Activation | None:
    """The oneDNN form of ``node`` when it is a ReLU or ReLU6 (None for anything else)."""
    module = modules.get(node.target) if node.op == "call_module" else None
    if isinstance(module, nn.ReLU) or (node.op == "call_function" and node.target in (F.relu, torch.relu)):
        return RELU
    if isinstance(module, nn.ReLU6) or (node.op == "call_function" and node.target is F.relu6):
        return RELU6
    if isinstance(module, nn.Hardtanh) and (module.min_val, module.max_val) == (0.0, 6.0):
        return RELU6
    return None


def make_plan(model: nn.Module, input_size: tuple[int, int]) -> Plan:
    """The plan of an eval-mode :class:`FTWTModel` (heads and codebooks as they are) or of a dense
    backbone whose BNs are already folded (:func:`~ftwt_cli.engine.reference.folded_dense`)."""
    gated = isinstance(model, FTWTModel)
    backbone = model.backbone if gated else model
    block_index = {id(b): i for i, b in enumerate(model.blocks)} if gated else {}
    codebooks = [b.codebook is not None for b in model.blocks] if gated else []
    if any(codebooks) and not all(codebooks):
        raise ValueError("some gated blocks have a codebook and others not; fit one for every block (ftwt calibrate --codebook K)")
    gm = torch.fx.GraphModule(backbone, _LeafGatedBlocks().trace(backbone))
    param = next(backbone.parameters())
    with torch.no_grad():
        ShapeProp(gm).propagate(torch.zeros(1, 3, *input_size, dtype=param.dtype))
    modules = dict(gm.named_modules())
    plan = Plan(gm, [], {}, {}, gated=gated)
    routed_from: dict[int, ConvPlan] = {}  # slot → the routed conv whose compact output it holds
    for i, node in enumerate(gm.graph.nodes):
        module = modules.get(node.target) if node.op == "call_module" else None
        identity = isinstance(module, nn.Identity) or (isinstance(module, nn.Dropout) and not module.training)
        if identity and len(node.args) == 1 and not node.kwargs and isinstance(node.args[0], torch.fx.Node):
            plan.slot[node] = plan.slot[node.args[0]]
            continue
        source = node.args[0] if node.args and isinstance(node.args[0], torch.fx.Node) else None
        fused_into = _fusion_target(plan, source, node, modules) if source is not None else None
        if fused_into is not None:
            fused_into.activation = _fusable(node, modules)
            plan.slot[node] = plan.slot[source]
            continue
        plan.slot[node] = i
        plan.order.append(node)
        if node.op == "placeholder":
            plan.roles[node] = "input"
        elif node.op == "output":
            plan.roles[node] = "output"
        elif isinstance(module, (GatedBlock, nn.Conv2d)):
            producer = routed_from.get(plan.slot[source])
            conv = _conv_plan(node, module, producer, block_index)
            plan.convs[node] = conv
            plan.roles[node] = "conv"
            if conv.mode == "routed":
                routed_from[i] = conv
        elif is_zero_preserving(node, modules) and source is not None and not any(
            isinstance(a, torch.fx.Node) for a in (*node.args[1:], *node.kwargs.values())
        ):
            plan.roles[node] = "channelwise"
            if plan.slot[source] in routed_from:
                routed_from[i] = routed_from[plan.slot[source]]
        elif is_add(node):
            plan.roles[node] = "add"
        else:
            plan.roles[node] = "dense"
    return plan


def _fusion_target(plan: Plan, source: torch.fx.Node, node: torch.fx.Node, modules: dict) -> ConvPlan | None:
    """The conv whose only user (through identities) is ``node``, a fusable activation."""
    if _fusable(node, modules) is None or len(node.args) != 1:
        return None
    producer = next((n for n in plan.convs if plan.slot[n] == plan.slot[source]), None)
    if producer is None or plan.convs[producer].activation is not None:
        return None
    users = _users_through_aliases(plan, producer)
    return plan.convs[producer] if users == [node] else None


def _users_through_aliases(plan: Plan, node: torch.fx.Node) -> list[torch.fx.Node]:
    found = []
    for user in node.users:
        if user in plan.slot and plan.slot[user] == plan.slot[node] and user is not node:
            found += _users_through_aliases(plan, user)
        else:
            found.append(user)
    return found


def _conv_plan(node: torch.fx.Node, module: nn.Module, producer: ConvPlan | None, block_index: dict) -> ConvPlan:
    gated = isinstance(module, GatedBlock)
    conv, bn = (module.conv, module.bn) if gated else (module, None)
    if gated and module.codebook is not None:
        mode = "routed"
        out_sets = [torch.nonzero(p > 0).flatten() for p in module.codebook.prototypes]
    else:
        mode = "masked" if gated else "plain"
        out_sets = [torch.arange(conv.out_channels)]
    regular = conv.groups == 1 or conv.groups == conv.in_channels == conv.out_channels
    if producer is not None and mode != "masked" and regular:
        in_sets: list = list(producer.out_sets)
    else:
        producer = None
        in_sets = [None]
    in_hw = tuple(node.args[0].meta["tensor_meta"].shape[2:])
    return ConvPlan(
        name=str(node.target), conv=conv, bn=bn, mode=mode, block=module if gated else None,
        block_index=block_index.get(id(module)), in_sets=in_sets, out_sets=out_sets,
        producer=None if producer is None else producer.name, in_hw=in_hw,
    )  # fmt: skip
