"""Find the gated blocks and the MAC-relevant layers of any CNN by tracing it.

``analyze(model, input_size)`` traces the model with torch.fx and returns a :class:`ModelGraph`:

* every conv→BN pair whose conv feeds only that BN becomes a block (in execution order); if the BN
  feeds only a zero-preserving activation, that activation is the block's and the target is taken
  after it, otherwise before (e.g. the second conv of a residual block, before the add). A BN with
  its activation fused in (timm's ``BatchNormAct2d``) is read as the BN followed by that activation
  (:func:`split_batchnorm`);
* every conv and linear layer with its output size, for FLOPs accounting;
* for every conv, the block whose (masked) output reaches it through zero-preserving layers only
  (activations with f(0) = 0, pooling, dropout): its "producer", whose mask tells which input
  channels are exactly zero and so cost nothing.

Tracing runs the model in eval mode (fx bakes ``if self.training`` branches into the graph) with every
BatchNorm module a leaf, so it never depends on batch statistics. Models that fx cannot trace fall
back to module order: blocks are conv modules immediately followed by a matching BN, with no producers
(every input channel counted) and a warning. A model the shape pass cannot run is refused with
:class:`UnsupportedModel` naming the layer.
"""

from __future__ import annotations

import contextlib
import functools
import io
import operator
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from ftwt_cli.core.batchnorm import FusedTail, split_batchnorm, trace
from ftwt_cli.core.registry import Registry

# module type → (functional form that never works in place, monotone and non-negative?)
_ACTIVATION_MODULES: dict[type, Callable[[nn.Module], tuple[Callable, bool]]] = {
    nn.ReLU: lambda m: (F.relu, True),
    nn.ReLU6: lambda m: (F.relu6, True),
    nn.SiLU: lambda m: (F.silu, False),
    nn.Hardswish: lambda m: (F.hardswish, False),
    nn.GELU: lambda m: (functools.partial(F.gelu, approximate=m.approximate), False),
    nn.LeakyReLU: lambda m: (functools.partial(F.leaky_relu, negative_slope=m.negative_slope), False),
    nn.ELU: lambda m: (functools.partial(F.elu, alpha=m.alpha), False),
    nn.Mish: lambda m: (F.mish, False),
    nn.Tanh: lambda m: (torch.tanh, False),
}
_ACTIVATION_FUNCTIONS: dict[Callable, tuple[Callable, bool]] = {
    F.relu: (F.relu, True),
    torch.relu: (F.relu, True),
    F.relu6: (F.relu6, True),
    F.silu: (F.silu, False),
    F.hardswish: (F.hardswish, False),
    F.gelu: (F.gelu, False),
    torch.tanh: (torch.tanh, False),
}
_ACTIVATION_METHODS = {"relu": (F.relu, True), "relu_": (F.relu, True)}

# Layers that map an all-zero channel to an all-zero channel (and keep channels where they are).
_ZERO_PRESERVING_MODULES = (
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.Dropout,
    nn.Dropout2d,
    nn.Identity,
)
_ZERO_PRESERVING_FUNCTIONS = {F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.dropout}
class UnsupportedModel(ValueError):
    """A model ftwt cannot gate (no conv→BN block) or trace; the message names the module and why."""


#: In-place ops that change a node's value after it was computed (``x[:, :c] += y`` traces to setitem).
_MUTATING_FUNCTIONS = {operator.setitem}


def _mutated(node: torch.fx.Node) -> bool:
    """True when a later node changes ``node``'s tensor in place (so its zeros may not stay zeros)."""
    for user in node.users:
        if user.args and user.args[0] is node:
            if user.op == "call_function" and user.target in _MUTATING_FUNCTIONS:
                return True
            if user.op == "call_method" and str(user.target).endswith("_") and user.target not in _ACTIVATION_METHODS:
                return True
    return False


@dataclass(frozen=True)
class BlockSpec:
    """One conv→BN[→act] block; names are qualified module names in the dense backbone."""

    conv: str
    bn: str
    activation: Callable[[torch.Tensor], torch.Tensor] | None
    monotone_activation: bool
    in_channels: int
    out_channels: int
    internal: bool = False  # its output feeds convs only (no residual add, concat or output)


@dataclass(frozen=True)
class ConvSpec:
    name: str
    in_channels: int
    out_channels: int
    groups: int
    kernel_size: tuple[int, int]
    out_hw: tuple[int, int]
    block: int | None  # index of the block this conv belongs to (its outputs are gated)
    producer: int | None  # index of the block whose mask zeroes this conv's inputs

    @property
    def dense_macs(self) -> int:
        kh, kw = self.kernel_size
        return self.out_channels * (self.in_channels // self.groups) * kh * kw * self.out_hw[0] * self.out_hw[1]


@dataclass(frozen=True)
class LinearSpec:
    name: str
    in_features: int
    out_features: int
    positions: int = 1  # vectors the layer maps per image (tokens of a transformer's MLP; 1 for a classifier)

    @property
    def dense_macs(self) -> int:
        return self.in_features * self.out_features * self.positions


@dataclass
class ModelGraph:
    input_size: tuple[int, int]
    blocks: list[BlockSpec] = field(default_factory=list)
    convs: list[ConvSpec] = field(default_factory=list)
    linears: list[LinearSpec] = field(default_factory=list)
    traced: bool = True
    head_macs: int | None = None  # the heads' MACs when they are not one C_in × C_out map per block (a static core)

    @property
    def dense_macs(self) -> int:
        return sum(c.dense_macs for c in self.convs) + sum(lin.dense_macs for lin in self.linears)


def _activation_of(node: torch.fx.Node, modules: dict[str, nn.Module]) -> tuple[Callable, bool] | None:
    if node.op == "call_module":
        return _activation_of_module(modules[node.target])
    if node.op == "call_function":
        return _ACTIVATION_FUNCTIONS.get(node.target)
    if node.op == "call_method":
        return _ACTIVATION_METHODS.get(node.target)
    return None


def is_zero_preserving(node: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    if _activation_of(node, modules) is not None:
        return True
    if node.op == "call_module":
        return isinstance(modules[node.target], _ZERO_PRESERVING_MODULES)
    return node.op == "call_function" and node.target in _ZERO_PRESERVING_FUNCTIONS


def feeds_convs_only(node: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether every path from ``node`` reaches a conv through single-input zero-preserving layers only
    (a block-internal output), never a residual add, a concatenation or the network's output."""
    for user in node.users:
        if user.op == "call_module" and isinstance(modules[user.target], nn.Conv2d):
            continue
        single_input = len([a for a in user.all_input_nodes]) == 1
        if not (single_input and is_zero_preserving(user, modules) and feeds_convs_only(user, modules)):
            return False
    return bool(node.users)


#: Which conv→BN blocks get a decision head: ``all`` (every one, the paper) or ``internal`` (only those
#: whose output feeds convs alone: a residual block's inner convs, not the conv before each add; static
#: pruning of option-A ResNets prunes just those).
GATES: Registry[Callable[[BlockSpec], bool]] = Registry("gated-block policy")
GATES.register("all")(lambda block: True)
GATES.register("internal")(lambda block: block.internal)


def analyze(model: nn.Module, input_size: tuple[int, int], gate: str = "all") -> ModelGraph:
    """Trace ``model`` (dense, not yet gated) on a 3×H×W input and describe its blocks and layers;
    ``gate`` names the policy (:data:`GATES`) that decides which conv→BN blocks are gated."""
    gated = GATES[gate]
    try:
        traced = trace(model)
    except Exception as exc:  # noqa: BLE001 - any tracing failure falls back to module order
        warnings.warn(
            f"model could not be traced with torch.fx ({type(exc).__name__}: {exc}); blocks are found by "
            "module order and every conv input counts as dense in FLOPs accounting",
            stacklevel=2,
        )
        return _analyze_by_module_order(model, input_size)
    modules = dict(traced.named_modules())
    _propagate_shapes(model, traced, input_size)

    graph = ModelGraph(input_size=tuple(input_size))
    block_of_bn: dict[torch.fx.Node, int] = {}  # the node whose output is the block's (masked) output
    block_of_conv: dict[torch.fx.Node, int] = {}
    for node in traced.graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], nn.Conv2d):
            continue
        users = list(node.users)
        if len(users) != 1 or users[0].op != "call_module":
            continue
        bn_node = users[0]
        bn = modules[bn_node.target]
        conv = modules[node.target]
        if not isinstance(bn, nn.BatchNorm2d) or bn_node.args[0] is not node or bn.num_features != conv.out_channels:
            continue
        split = split_batchnorm(bn)
        if split is None:
            continue
        tail = split[1]
        fused = isinstance(tail, FusedTail) and not isinstance(tail.act, nn.Identity)
        bn_users = list(bn_node.users)
        if fused:
            act = _activation_of_module(tail.act)  # inside the BN module; None: one that is not zero-preserving
            clean = act is not None
        else:
            act = _activation_of(bn_users[0], modules) if len(bn_users) == 1 else None
            clean = True
        spec = BlockSpec(
            conv=node.target,
            bn=bn_node.target,
            activation=act[0] if act else None,
            monotone_activation=act[1] if act else False,
            in_channels=conv.in_channels,
            out_channels=conv.out_channels,
            internal=clean and feeds_convs_only(bn_users[0] if act and not fused else bn_node, modules),
        )
        if not gated(spec):
            continue
        index = block_of_conv[node] = len(graph.blocks)
        if clean:
            block_of_bn[bn_node] = index  # masked channels leave this node as zeros
        graph.blocks.append(spec)

    for node in traced.graph.nodes:
        if node.op != "call_module":
            continue
        module = modules[node.target]
        if isinstance(module, nn.Conv2d):
            shape = node.meta["tensor_meta"].shape
            graph.convs.append(
                ConvSpec(
                    name=node.target,
                    in_channels=module.in_channels,
                    out_channels=module.out_channels,
                    groups=module.groups,
                    kernel_size=tuple(module.kernel_size),
                    out_hw=(int(shape[2]), int(shape[3])),
                    block=block_of_conv.get(node),
                    producer=_producer(node.args[0], block_of_bn, modules),
                )
            )
        elif isinstance(module, nn.Linear):
            shape = node.meta["tensor_meta"].shape
            positions = max(1, int(torch.Size(shape).numel()) // (int(shape[0]) * module.out_features))
            graph.linears.append(LinearSpec(node.target, module.in_features, module.out_features, positions))
    return graph


def _producer(source, block_of_bn: dict[torch.fx.Node, int], modules: dict[str, nn.Module]) -> int | None:
    """The block whose mask zeroes ``source``'s channels, through zero-preserving layers not changed in place."""
    while isinstance(source, torch.fx.Node) and not _mutated(source):
        if source in block_of_bn:
            return block_of_bn[source]
        if not is_zero_preserving(source, modules) or not source.args:
            return None
        source = source.args[0]
    return None


def _propagate_shapes(model: nn.Module, traced: torch.fx.GraphModule, input_size: tuple[int, int]) -> None:
    """Run the traced model once on zeros in eval mode (never on batch statistics) to record shapes."""
    param = next(model.parameters(), None)
    if param is None:
        raise UnsupportedModel(f"{type(model).__name__} has no parameters: nothing to gate")
    was_training = model.training
    model.eval()
    try:
        # ShapeProp prints the traceback of a failing node itself; the refusal below says it in one line.
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            ShapeProp(traced).propagate(torch.zeros(1, 3, *input_size, device=param.device, dtype=param.dtype))
    except Exception as exc:  # noqa: BLE001 - the model cannot run on this input: say where and why
        cause = exc.__cause__ or exc
        node = str(exc).split("node=", 1)[1].split(" ", 1)[0] if "node=" in str(exc) else "?"
        detail = " ".join(str(cause).split())[:200]
        raise UnsupportedModel(
            f"{type(model).__name__} does not run on 3×{input_size[0]}×{input_size[1]} inputs (at {node.lstrip('%')}: "
            f"{type(cause).__name__}: {detail})"
        ) from None
    finally:
        model.train(was_training)


def _activation_of_module(module: nn.Module) -> tuple[Callable, bool] | None:
    maker = _ACTIVATION_MODULES.get(type(module))
    return maker(module) if maker else None


def _analyze_by_module_order(model: nn.Module, input_size: tuple[int, int]) -> ModelGraph:
    # Leaves in module order, a BN module (fused BN+activation included) counting as one leaf.
    norms = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    named = [
        (n, m)
        for n, m in model.named_modules()
        if (n in norms or not list(m.children())) and not any(n.startswith(f"{b}.") for b in norms)
    ]
    graph = ModelGraph(input_size=tuple(input_size), traced=False)
    block_of_conv: dict[str, int] = {}
    for (name, module), (next_name, next_module) in zip(named, named[1:]):
        if (
            isinstance(module, nn.Conv2d)
            and isinstance(next_module, nn.BatchNorm2d)
            and next_module.num_features == module.out_channels
            and split_batchnorm(next_module) is not None
        ):
            block_of_conv[name] = len(graph.blocks)
            graph.blocks.append(BlockSpec(name, next_name, None, False, module.in_channels, module.out_channels))

    out_hw: dict[str, tuple[int, int]] = {}
    hooks = [
        m.register_forward_hook(lambda mod, inp, out, name=n: out_hw.__setitem__(name, tuple(out.shape[2:])))
        for n, m in named
        if isinstance(m, nn.Conv2d)
    ]
    param = next(model.parameters())
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, *input_size, device=param.device, dtype=param.dtype))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    for name, module in named:
        if isinstance(module, nn.Conv2d) and name in out_hw:
            graph.convs.append(
                ConvSpec(
                    name,
                    module.in_channels,
                    module.out_channels,
                    module.groups,
                    tuple(module.kernel_size),
                    out_hw[name],
                    block_of_conv.get(name),
                    None,
                )
            )
        elif isinstance(module, nn.Linear):
            graph.linears.append(LinearSpec(name, module.in_features, module.out_features))
    return graph


__all__ = [
    "BlockSpec", "ConvSpec", "FusedTail", "LinearSpec", "ModelGraph", "UnsupportedModel", "analyze", "split_batchnorm", "trace",
]
