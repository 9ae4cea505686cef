"""What each traced node becomes in the engine's program: a step for batch 1 and one for batches.

* gated block / conv: a :class:`~ftwt_cli.engine.conv.ConvStep` (head first, then only the kept filters);
* zero-preserving channel-wise layers (activations with f(0) = 0, pooling, dropout, identity, the same
  list graph.py uses for producers) act on the compact values and keep the indices;
* residual adds combine by index, in place where no later step reads an operand (:mod:`.liveness`);
* flatten of a 1×1 map and linear layers keep the compact form;
* anything else scatters its inputs to full width and runs unchanged (a dense fallback).

A step takes the slot list ``s`` (the engine's input in the last slot) and returns its node's value.
"""

from __future__ import annotations

import operator

import torch
import torch.fx
from torch import nn
from torch.fx.node import map_arg

from ftwt_cli.core.gating import GatedBlock
from ftwt_cli.core.graph import is_zero_preserving
from ftwt_cli.engine import batched
from ftwt_cli.engine.batched import Grouped, as_grouped, assemble
from ftwt_cli.engine.compact import Compact, add, as_compact, as_dense, flatten, linear
from ftwt_cli.engine.conv import ConvStep
from ftwt_cli.engine.geometry import ConvGeometry

ADDS = (operator.add, torch.add, operator.iadd)


def is_add(node: torch.fx.Node) -> bool:
    a = node.args
    return node.op == "call_function" and node.target in ADDS and len(a) == 2 and not node.kwargs and all(isinstance(x, torch.fx.Node) for x in a)


def is_flatten_from_channels(node: torch.fx.Node) -> bool:
    if not (node.target is torch.flatten or (node.op == "call_method" and node.target == "flatten")):
        return False
    start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
    return start == 1 and len(node.args) <= 2 and set(node.kwargs) <= {"start_dim"}


def kind(node: torch.fx.Node, modules: dict[str, nn.Module]) -> str:
    """How the node's value relates to its inputs' storage (see :func:`liveness.writable_operands`)."""
    module = modules.get(node.target) if node.op == "call_module" else None
    if node.op in ("placeholder", "get_attr"):
        return "external"
    if isinstance(module, (GatedBlock, nn.Conv2d, nn.Linear)):
        return "fresh"
    return "add" if is_add(node) else "alias"


def compile_node(engine, node: torch.fx.Node, writable: tuple[bool, bool]):
    """(batch-1 step, batched step) for ``node``; conv steps are appended to ``engine.convs``."""
    slot = engine.slot
    if node.op == "placeholder":  # the input sits in the last slot
        return (lambda s: Compact.of(s[-1])), (lambda s: Grouped.of(s[-1]))
    if node.op == "output":
        return (
            lambda s: map_arg(node.args[0], lambda n: as_dense(s[slot[n]])),
            lambda s: map_arg(node.args[0], lambda n: assemble(s[slot[n]])),
        )
    module = engine.modules_by_name.get(node.target) if node.op == "call_module" else None
    if isinstance(module, (GatedBlock, nn.Conv2d)):
        step = _conv_step(engine, node, module)
        i = slot[node.args[0]]
        return (lambda s: step(as_compact(s[i]))), (lambda s: batched.conv(step, as_grouped(s[i], s[-1].shape[0])))
    if isinstance(module, nn.Linear):
        i = slot[node.args[0]]
        return (
            lambda s: linear(module, as_compact(s[i])),
            lambda s: batched.grouped_linear(module, as_grouped(s[i], s[-1].shape[0])),
        )
    if is_zero_preserving(node, engine.modules_by_name) and isinstance(node.args[0], torch.fx.Node):
        channelwise = _channelwise(engine, node, module)
        if channelwise is not None:
            return channelwise
    if is_add(node):
        i, j = slot[node.args[0]], slot[node.args[1]]
        return (
            lambda s: add(as_compact(s[i]), as_compact(s[j]), writable),
            lambda s: batched.grouped_add(as_grouped(s[i], s[-1].shape[0]), as_grouped(s[j], s[-1].shape[0]), writable),
        )
    if is_flatten_from_channels(node):
        i = slot[node.args[0]]
        return (lambda s: flatten(s[i])), (lambda s: batched.grouped_flatten(as_grouped(s[i], s[-1].shape[0])))
    return _dense_node(engine, node, module)


def _conv_step(engine, node: torch.fx.Node, module: nn.Module) -> ConvStep:
    gated = isinstance(module, GatedBlock)
    conv, bn, head = (module.conv, module.bn, module.head) if gated else (module, None, None)
    in_shape = node.args[0].meta["tensor_meta"].shape
    out_hw = node.meta["tensor_meta"].shape[2:]
    geometry = ConvGeometry(conv, bn, in_shape, out_hw, key=len(engine.convs), name=str(node.target))
    step = ConvStep(
        geometry, head, engine.cache, strategy=engine.strategy, gather_cost_macs=engine.gather_cost_macs,
        memory=engine.memory, block=module if gated else None,
    )  # fmt: skip
    engine.convs.append((engine.block_index[id(module)] if gated else None, step))
    return step


def _channelwise(engine, node: torch.fx.Node, module: nn.Module | None):
    """A zero-preserving, channel-wise op: run it on the compact values, keep the index (None when it
    takes other nodes as arguments: then it runs as a dense node)."""
    i, rest, kwargs = engine.slot[node.args[0]], node.args[1:], node.kwargs
    if any(isinstance(a, torch.fx.Node) for a in (*rest, *kwargs.values())):
        return None
    if module is not None:
        # Bound forward: skips nn.Module.__call__ (hook dispatch, ~2 µs a call); channel-wise
        # zero-preserving layers carry no hooks here.
        op = module.forward if not (module._forward_hooks or module._forward_pre_hooks) else module
    elif node.op == "call_function":
        op = node.target
    else:
        op = lambda v, *a, **k: getattr(v, node.target)(*a, **k)
    rest = tuple(rest)

    def run(s):
        c = as_compact(s[i])
        return c.with_values(op(c.values, *rest, **kwargs))

    def run_grouped(s):
        return batched.channelwise(as_grouped(s[i], s[-1].shape[0]), lambda v: op(v, *rest, **kwargs))

    return run, run_grouped


def _dense_node(engine, node: torch.fx.Node, module: nn.Module | None):
    """Anything else: scatter compact inputs to full width and run the node as traced."""
    slot = engine.slot
    if node.op == "get_attr":
        value = operator.attrgetter(node.target)(engine.graph_module)
        return (lambda s: value), (lambda s: value)
    if node.op == "call_module":
        op = module
    elif node.op == "call_function":
        op = node.target
    else:
        op = lambda self_, *a, **k: getattr(self_, node.target)(*a, **k)

    def run(s):
        args = map_arg(node.args, lambda n: as_dense(s[slot[n]]))
        kwargs = map_arg(node.kwargs, lambda n: as_dense(s[slot[n]]))
        return op(*args, **kwargs)

    def run_grouped(s):
        args = map_arg(node.args, lambda n: assemble(s[slot[n]]))
        kwargs = map_arg(node.kwargs, lambda n: assemble(s[slot[n]]))
        return op(*args, **kwargs)

    return run, run_grouped
