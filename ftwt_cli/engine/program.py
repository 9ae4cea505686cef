"""Graph compilation: an FTWT model (or a dense backbone) traced once with torch.fx and compiled into a
flat program of steps over numbered slots (no fx interpreter at run time), one for batch 1 and one for
batches (:mod:`~ftwt_cli.engine.batched`); what each node becomes is :mod:`~ftwt_cli.engine.nodes`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from ftwt_cli.core.batchnorm import LeafTracer
from ftwt_cli.core.gating import FTWTModel, GatedBlock
from ftwt_cli.engine import choice, fitting, nodes
from ftwt_cli.engine.cache import WeightCache
from ftwt_cli.engine.conv import ConvStep, EngineMemory
from ftwt_cli.engine.liveness import writable_operands
from ftwt_cli.engine.prototypes import Prototypes
from ftwt_cli.engine.reference import dense_fallback, folded_dense

#: Default cap on the pre-sliced sub-convs' memory (``--engine-memory-mb``).
DEFAULT_MEMORY_MB = 256.0


class _LeafGatedBlocks(LeafTracer):  # BN modules and modules fx cannot trace stay leaves, as in core.graph
    def is_leaf_module(self, m: nn.Module, qualified_name: str) -> bool:
        return isinstance(m, GatedBlock) or super().is_leaf_module(m, qualified_name)


class SparseEngine(nn.Module):
    """Sparse execution of a gated (or dense) backbone; see :mod:`ftwt_cli.engine`."""

    def __init__(
        self,
        model: nn.Module,
        input_size: tuple[int, int],
        cache_mb: float = 64.0,
        strategy: str = "auto",
        gather_cost_macs: float | None = None,
        memory_mb: float = DEFAULT_MEMORY_MB,
    ) -> None:
        super().__init__()
        gated = isinstance(model, FTWTModel)
        self.gated = gated
        self.input_size = tuple(input_size)
        backbone = model.backbone if gated else folded_dense(model, input_size)
        self.source = model  # for the whole-engine fallback (built on demand)
        self.block_index = {id(b): i for i, b in enumerate(model.blocks)} if gated else {}
        self.cache = WeightCache(cache_mb)
        self.memory = EngineMemory(memory_mb)
        self.strategy = strategy
        self.gather_cost_macs = gather_cost_macs
        self.channels_last = False
        self.fitted_on = 0  # held-out images the prototypes were fitted on
        self.graph_module = torch.fx.GraphModule(backbone, _LeafGatedBlocks().trace(backbone))
        param = next(backbone.parameters())
        with torch.no_grad():
            ShapeProp(self.graph_module).propagate(torch.zeros(1, 3, *input_size, dtype=param.dtype))
        self.modules_by_name = dict(self.graph_module.named_modules())
        self.convs: list[tuple[int | None, ConvStep]] = []  # (block index or None, step)
        # Slot i is the i-th node in graph order, except that identity layers (nn.Identity: the BNs
        # folded away; eval-mode dropout) get no step and share their input's slot.
        self.slot: dict[torch.fx.Node, int] = {}
        order = []
        for i, node in enumerate(self.graph_module.graph.nodes):
            module = self.modules_by_name.get(node.target) if node.op == "call_module" else None
            identity = isinstance(module, nn.Identity) or (isinstance(module, nn.Dropout) and not module.training)
            if identity and len(node.args) == 1 and not node.kwargs and isinstance(node.args[0], torch.fx.Node):
                self.slot[node] = self.slot[node.args[0]]
                continue
            self.slot[node] = i
            order.append(node)
        kinds = {node: nodes.kind(node, self.modules_by_name) for node in order}
        writable = writable_operands(order, self.slot, kinds)
        self.program, self.grouped_program = [], []
        for node in order:
            single, grouped = nodes.compile_node(self, node, writable.get(node, (False, False)))
            self.program.append((self.slot[node], single))
            self.grouped_program.append((self.slot[node], grouped))
        self.num_slots = len(self.slot)
        for step in self.steps:  # a block routed among a codebook's prototypes: those are its sub-networks
            if step.head is not None and step.head.prototypes is not None:
                step.set_prototypes(Prototypes(step.head.prototypes, "codebook"))
        self.fallback: nn.Module | None = None  # set: the whole engine runs this dense module instead
        self.measurement: dict | None = None  # what choice.measure found (per-layer and whole-engine times)

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

    def batch_masks(self) -> list[torch.Tensor]:
        """Kept-output masks (bool [B, C]) of every image of the last batch (B > 1), in block order."""
        if self.fallback is not None and self.gated:
            return list(self.fallback.last_masks())
        masks: list[torch.Tensor] = [torch.empty(0)] * self.num_blocks
        for block, step in self.convs:
            if block is not None and step.last_masks is not None:
                masks[block] = torch.from_numpy(step.last_masks)
        return masks

    def set_layers(self, choice_) -> None:
        """Which convs take their sparse paths: "sparse" (all), "dense" (all run the dense conv), a
        sequence of bools in program order, or a collection of layer names (those run sparse)."""
        for step, flag in zip(self.steps, choice.layer_flags(choice_, self.steps)):
            step.sparse = flag

    def sparse_layers(self) -> list[str]:
        """Names of the convs that run their sparse paths (none while the whole engine falls back)."""
        return [] if self.fallback is not None else [s.name for s in self.steps if s.sparse]

    def use_fallback(self, enabled: bool) -> None:
        """Run the whole engine as the dense model (BN folded; for an FTWT model with its heads and masks)."""
        self.fallback = dense_fallback(self.source, self.input_size) if enabled else None

    def set_channels_last(self, enabled: bool, choose_kernels: bool = True) -> None:
        """Run activations in the channels-last memory format (or the default); every sub-conv is laid
        out for it and its kernel chosen on first use of that format; cached per-call slices are dropped
        (their shapes were chosen for the other format)."""
        if bool(enabled) != self.channels_last:
            self.cache.clear()
        self.channels_last = bool(enabled)
        for step in self.steps:
            step.prepare(self.channels_last, choose_kernels)

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

    def fit_prototypes(self, images: torch.Tensor, memory_mb: float | None = None) -> dict:
        """Pre-slice sub-networks for the masks of held-out ``images`` within ``memory_mb`` (default: the
        engine's cap); see :mod:`~ftwt_cli.engine.fitting`. Returns its report."""
        if memory_mb is not None:
            self.memory.budget = int(memory_mb * 2**20)
        return fitting.fit_prototypes(self, images, self.memory.budget)

    def load_prototypes(self, document: dict, images: torch.Tensor | None = None) -> None:
        """Prototype sets from plain lists (a checkpoint's meta); ``images`` pre-build their sub-convs."""
        fitting.load_prototypes(self, document)
        if images is not None and len(images):
            fitting.prebuild(self, images, self.memory.budget)

    def prototype_lists(self) -> dict:
        return fitting.prototype_lists(self)

    def prototype_report(self) -> dict:
        return fitting.prototype_report(self)

    def measure(self, images: torch.Tensor, reps: int = 3, layers: bool = True, whole: bool = True, formats: bool = False) -> dict:
        """Never slower than dense, measured on this machine: see :func:`choice.measure`."""
        self.measurement = choice.measure(self, images, reps=reps, layers=layers, whole=whole, formats=formats)
        return self.measurement

    def strategy_counts(self) -> dict[str, int]:
        """How often each conv path ran (summed over convs) since the engine was built."""
        total: dict[str, int] = {}
        for step in self.steps:
            for k, v in step.counts.items():
                total[k] = total.get(k, 0) + v
        return total

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fallback is not None:
            return self.fallback(x)
        return self._run(x)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        # In the channels-last format the first conv's weights convert the input (its head pools it as given).
        program = self.program if x.shape[0] == 1 else self.grouped_program
        s: list = [None] * self.num_slots + [x]
        for out, step in program:
            s[out] = step(s)
        return s[program[-1][0]]


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
    prototype_images: torch.Tensor | None = None,
    memory_mb: float = DEFAULT_MEMORY_MB,
    prototypes: dict | None = None,
    channels_last="auto",
) -> SparseEngine:
    """A :class:`SparseEngine` for an eval-mode FTWTModel (heads predict masks) or a dense backbone.

    ``input_size`` (H, W) is needed for a dense backbone; an FTWTModel knows it from its graph.
    ``strategy`` forces one conv path for masks no prototype covers ("slice", "rows", "dense", "core";
    "auto" = cost model). ``calibrate`` times every conv on this machine at build time and makes the
    cost model choose from those timings instead of the fixed ``gather_cost_macs`` rule.

    Pre-sliced sub-networks: ``prototype_images`` (held-out images) fit each gated conv's prototype sets
    and slice their sub-convs within ``memory_mb``; ``prototypes`` (plain lists, e.g. a checkpoint's
    ``meta["engine_prototypes"]``) gives the sets instead (their sub-convs are sliced on first use, or
    on ``prototype_images`` when given too). A codebook's prototypes are used as they are.

    Never slower than dense: ``layers`` says which convs run sparse — "auto" (measured on
    ``calibration_images`` when given, else all), "measure", "sparse", "dense", a list of bools in
    conv order, or a collection of conv names; ``fallback`` whether the whole engine runs the dense
    model instead — "auto" (measured when ``calibration_images`` are given, else no), "measure", or a
    bool; ``channels_last`` the activations' memory format — "auto" (the faster one, measured when
    ``calibration_images`` are given, else the default) or a bool. Every choice computes the same outputs.
    """
    if isinstance(model, FTWTModel):
        input_size = model.graph.input_size
    elif input_size is None:
        raise ValueError("a dense backbone needs input_size=(H, W)")
    if not memory_mb > 0:
        raise ValueError(f"memory_mb must be > 0, got {memory_mb}")
    engine = SparseEngine(model, tuple(input_size), cache_mb=cache_mb, strategy=strategy, gather_cost_macs=gather_cost_macs, memory_mb=memory_mb).eval()
    if calibrate:
        engine.calibrate()
    if prototypes is not None:
        engine.load_prototypes(prototypes, prototype_images)
    elif prototype_images is not None and len(prototype_images):
        engine.fit_prototypes(prototype_images)
    choice.decide(engine, calibration_images, layers, fallback, channels_last)
    return engine
