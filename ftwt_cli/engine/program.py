"""Graph compilation: an FTWT model (or a dense backbone) traced once with torch.fx and compiled into a
flat program of steps over numbered slots (no fx interpreter at run time).

* gated block / conv: a :class:`~ftwt_cli.engine.conv.ConvStep` (head in numpy, then only the kept filters);
* zero-preserving channel-wise layers (activations with f(0) = 0, pooling, dropout, identity, the same
  list graph.py uses for producers) act on the compact values and keep the indices;
* residual adds combine by index; flatten of a 1×1 map and linear layers keep the compact form;
* anything else scatters its inputs to full width and runs unchanged (a dense fallback).
"""

from __future__ import annotations

import operator

import numpy as np
import torch
import torch.fx
from torch import nn
from torch.fx.node import map_arg
from torch.fx.passes.shape_prop import ShapeProp

from ftwt_cli.core.batchnorm import LeafTracer
from ftwt_cli.core.gating import FTWTModel, GatedBlock
from ftwt_cli.core.graph import is_zero_preserving
from ftwt_cli.engine import choice
from ftwt_cli.engine.cache import WeightCache
from ftwt_cli.engine.compact import Compact, add, as_compact, as_dense, flatten, linear
from ftwt_cli.engine.conv import ConvStep
from ftwt_cli.engine.geometry import ConvGeometry
from ftwt_cli.engine.reference import dense_fallback, folded_dense


class _LeafGatedBlocks(LeafTracer):  # BN modules and modules fx cannot trace stay leaves, as in core.graph
    def is_leaf_module(self, m: nn.Module, qualified_name: str) -> bool:
        return isinstance(m, GatedBlock) or super().is_leaf_module(m, qualified_name)


class SparseEngine(nn.Module):
    """Batch-1 sparse execution of a gated (or dense) backbone; see :mod:`ftwt_cli.engine`."""

    def __init__(
        self,
        model: nn.Module,
        input_size: tuple[int, int],
        cache_mb: float = 64.0,
        strategy: str = "auto",
        gather_cost_macs: float | None = None,
    ) -> None:
        super().__init__()
        gated = isinstance(model, FTWTModel)
        self.gated = gated
        self.input_size = tuple(input_size)
        backbone = model.backbone if gated else folded_dense(model, input_size)
        self.source = model  # for the whole-engine fallback (built on demand)
        self.block_index = {id(b): i for i, b in enumerate(model.blocks)} if gated else {}
        self.cache = WeightCache(cache_mb)
        self.strategy = strategy
        self.gather_cost_macs = gather_cost_macs
        self.graph_module = torch.fx.GraphModule(backbone, _LeafGatedBlocks().trace(backbone))
        param = next(backbone.parameters())
        with torch.no_grad():
            ShapeProp(self.graph_module).propagate(torch.zeros(1, 3, *input_size, dtype=param.dtype))
        self.modules_by_name = dict(self.graph_module.named_modules())
        self.convs: list[tuple[int | None, ConvStep]] = []  # (block index or None, step)
        # Compiled program: (output slot, step(slots) -> value); slot i is the i-th node in graph order,
        # except that identity layers (nn.Identity: the BNs folded away; eval-mode dropout) get no step
        # and share their input's slot.
        self.slot: dict[torch.fx.Node, int] = {}
        self.program = []
        for i, node in enumerate(self.graph_module.graph.nodes):
            module = self.modules_by_name.get(node.target) if node.op == "call_module" else None
            identity = isinstance(module, nn.Identity) or (isinstance(module, nn.Dropout) and not module.training)
            if identity and len(node.args) == 1 and not node.kwargs and isinstance(node.args[0], torch.fx.Node):
                self.slot[node] = self.slot[node.args[0]]
                continue
            self.slot[node] = i
            self.program.append((i, self._handler(node)))
        self.num_slots = len(self.slot)
        self.fallback: nn.Module | None = None  # set: the whole engine runs this dense module instead
        self.measurement: dict | None = None  # what fallback.measure found (per-layer and whole-engine times)

    @property
    def num_blocks(self) -> int:
        return len(self.block_index)

    @property
    def steps(self) -> list[ConvStep]:
        return [step for _, step in self.convs]

    def block_masks(self) -> list[torch.Tensor]:
        """Kept-output masks (bool [C]) of the last sample, in block order (the FTWTModel's ``blocks``)."""
        if self.fallback is not None and self.gated:
            return [m[-1] for m in self.fallback.last_masks()]
        masks: list[torch.Tensor] = [torch.empty(0)] * self.num_blocks
        for block, step in self.convs:
            if block is not None and step.last_mask is not None:
                masks[block] = torch.from_numpy(step.last_mask)
        return masks

    def set_layers(self, choice) -> None:
        """Which convs take their sparse paths: "sparse" (all), "dense" (all run the dense conv), a
        sequence of bools in program order, or a collection of layer names (those run sparse)."""
        steps = self.steps
        if isinstance(choice, str):
            if choice not in ("sparse", "dense"):
                raise ValueError(f"layers must be 'sparse', 'dense', 'measure', a list of bools or of layer names, got {choice!r}")
            flags = [choice == "sparse"] * len(steps)
        else:
            choice = list(choice)
            if all(isinstance(c, (bool, np.bool_)) for c in choice):
                if len(choice) != len(steps):
                    raise ValueError(f"layers: {len(choice)} flags for {len(steps)} convs")
                flags = [bool(c) for c in choice]
            else:
                names = {s.name for s in steps}
                unknown = set(choice) - names
                if unknown:
                    raise ValueError(f"layers: unknown conv name(s) {sorted(unknown)}")
                flags = [s.name in set(choice) for s in steps]
        for step, flag in zip(steps, flags):
            step.sparse = flag

    def sparse_layers(self) -> list[str]:
        """Names of the convs that run their sparse paths (none while the whole engine falls back)."""
        return [] if self.fallback is not None else [s.name for s in self.steps if s.sparse]

    def use_fallback(self, enabled: bool) -> None:
        """Run the whole engine as the dense model (BN folded; for an FTWT model with its heads and masks)."""
        self.fallback = dense_fallback(self.source, self.input_size) if enabled else None

    def calibrate(self, reps: int = 3) -> dict[int, dict[str, float]]:
        """Time every conv on this machine so that the cost model picks strategies from real costs."""
        with torch.no_grad():
            return {step.key: step.calibrate(reps) for step in self.steps}

    def fit_layout(self, images: torch.Tensor, threshold: float | None = None) -> dict[str, float]:
        """Run ``images`` [N, 3, H, W] and give every conv a static core: the filters kept in at least
        ``threshold`` of them × the inputs ever active, stored contiguously. Default threshold: per
        layer, the cheapest candidate under the calibrated costs, else ``CORE_THRESHOLD``.
        Returns the mean core size as a fraction of the dense MACs."""
        for step in self.steps:
            step.seen = []
        try:
            with torch.no_grad():
                for image in images:
                    self._run(image[None])
        finally:
            for step in self.steps:
                step.fit_core(threshold)
        fractions = [step.core.macs for step in self.steps if step.core is not None]
        return {"layers_with_core": len(fractions), "mean_core_mac_fraction": float(np.mean(fractions)) if fractions else float("nan")}

    def measure(self, images: torch.Tensor, reps: int = 3, layers: bool = True, whole: bool = True) -> dict:
        """Never slower than dense, measured on this machine: see :func:`choice.measure`."""
        self.measurement = choice.measure(self, images, reps=reps, layers=layers, whole=whole)
        return self.measurement

    def strategy_counts(self) -> dict[str, int]:
        """How often each conv path ran (summed over convs) since the engine was built."""
        total: dict[str, int] = {}
        for step in self.steps:
            for k, v in step.counts.items():
                total[k] = total.get(k, 0) + v
        return total

    def _handler(self, node: torch.fx.Node):
        slot = self.slot
        if node.op == "placeholder":
            return lambda s: Compact.of(s[-1])  # the input sits in the last slot
        if node.op == "output":
            return lambda s: map_arg(node.args[0], lambda n: as_dense(s[slot[n]]))
        module = self.modules_by_name.get(node.target) if node.op == "call_module" else None
        if isinstance(module, (GatedBlock, nn.Conv2d)):
            gated = isinstance(module, GatedBlock)
            conv, bn, head = (module.conv, module.bn, module.head) if gated else (module, None, None)
            in_shape = node.args[0].meta["tensor_meta"].shape
            out_hw = node.meta["tensor_meta"].shape[2:]
            geometry = ConvGeometry(conv, bn, in_shape, out_hw, key=len(self.convs), name=str(node.target))
            step = ConvStep(geometry, head, self.cache, strategy=self.strategy, gather_cost_macs=self.gather_cost_macs)
            self.convs.append((self.block_index[id(module)] if gated else None, step))
            i = slot[node.args[0]]
            return lambda s: step(as_compact(s[i]))
        if isinstance(module, nn.Linear):
            i = slot[node.args[0]]
            return lambda s: linear(module, as_compact(s[i]))
        if is_zero_preserving(node, self.modules_by_name) and isinstance(node.args[0], torch.fx.Node):
            return self._channelwise(node, module)
        if node.op == "call_function" and node.target in (operator.add, torch.add, operator.iadd) and len(node.args) == 2:
            a, b = node.args
            if isinstance(a, torch.fx.Node) and isinstance(b, torch.fx.Node) and not node.kwargs:
                i, j = slot[a], slot[b]
                return lambda s: add(as_compact(s[i]), as_compact(s[j]))
        if _is_flatten_from_channels(node):
            i = slot[node.args[0]]
            return lambda s: flatten(s[i])
        return self._dense_node(node, module)

    def _channelwise(self, node: torch.fx.Node, module: nn.Module | None):
        """A zero-preserving, channel-wise op: run it on the compact values, keep the index."""
        slot = self.slot
        i, rest, kwargs = slot[node.args[0]], node.args[1:], node.kwargs
        if module is not None:
            # Bound forward: skips nn.Module.__call__ (hook dispatch, ~2 µs a call); channel-wise
            # zero-preserving layers carry no hooks here.
            op = module.forward if not (module._forward_hooks or module._forward_pre_hooks) else module
        elif node.op == "call_function":
            op = node.target
        else:
            op = lambda v, *a, **k: getattr(v, node.target)(*a, **k)  # noqa: E731
        if not any(isinstance(a, torch.fx.Node) for a in rest):
            rest = tuple(rest)

            def run(s):
                c = as_compact(s[i])
                return c.with_values(op(c.values, *rest, **kwargs))

            return run

        def run_with_args(s):
            c = as_compact(s[i])
            return c.with_values(op(c.values, *map_arg(rest, lambda n: s[slot[n]]), **kwargs))

        return run_with_args

    def _dense_node(self, node: torch.fx.Node, module: nn.Module | None):
        """Anything else: scatter compact inputs to full width and run the node as traced."""
        slot = self.slot
        if node.op == "get_attr":
            value = operator.attrgetter(node.target)(self.graph_module)
            return lambda s: value
        if node.op == "call_module":
            op = module
        elif node.op == "call_function":
            op = node.target
        else:
            op = lambda self_, *a, **k: getattr(self_, node.target)(*a, **k)  # noqa: E731

        def run(s):
            args = map_arg(node.args, lambda n: as_dense(s[slot[n]]))
            kwargs = map_arg(node.kwargs, lambda n: as_dense(s[slot[n]]))
            return op(*args, **kwargs)

        return run

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fallback is not None:
            return self.fallback(x)
        return self._run(x)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != 1:  # each sample has its own masks: run them one by one
            return torch.cat([self._run(sample[None]) for sample in x])
        s: list = [None] * self.num_slots + [x]
        for out, step in self.program:
            s[out] = step(s)
        return s[self.program[-1][0]]


def build_engine(
    model: nn.Module,
    input_size: tuple[int, int] | None = None,
    cache_mb: float = 64.0,
    strategy: str = "auto",
    calibrate: bool = False,
    gather_cost_macs: float | None = None,
    calibration_images: torch.Tensor | None = None,
    layers="auto",
    fallback="auto",
) -> SparseEngine:
    """A :class:`SparseEngine` for an eval-mode FTWTModel (heads predict masks) or a dense backbone.

    ``input_size`` (H, W) is needed for a dense backbone; an FTWTModel knows it from its graph.
    ``strategy`` forces one conv path for every sparse call ("slice", "rows", "dense", "core"; "auto" =
    cost model). ``calibrate`` times every conv on this machine at build time and makes the cost model
    choose from those timings instead of the fixed ``gather_cost_macs`` rule (default ``GATHER_COST_MACS``).

    Never slower than dense: ``layers`` says which convs run sparse — "auto" (measured on
    ``calibration_images`` when given, else all), "measure", "sparse", "dense", a list of bools in
    conv order, or a collection of conv names; ``fallback`` whether the whole engine runs the dense
    model instead — "auto" (measured when ``calibration_images`` are given, else no), "measure", or a bool.
    Every choice computes the same outputs.
    """
    if isinstance(model, FTWTModel):
        input_size = model.graph.input_size
    elif input_size is None:
        raise ValueError("a dense backbone needs input_size=(H, W)")
    engine = SparseEngine(model, tuple(input_size), cache_mb=cache_mb, strategy=strategy, gather_cost_macs=gather_cost_macs).eval()
    if calibrate:
        engine.calibrate()
    choice.decide(engine, calibration_images, layers, fallback)
    return engine


def _is_flatten_from_channels(node: torch.fx.Node) -> bool:
    if not (node.target is torch.flatten or (node.op == "call_method" and node.target == "flatten")):
        return False
    start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
    return start == 1 and len(node.args) <= 2 and set(node.kwargs) <= {"start_dim"}
