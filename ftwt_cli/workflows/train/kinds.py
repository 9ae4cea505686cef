"""Run kinds: what a run trains, from what, towards which targets. One registered class per kind.

==========  ==============================================  ===========================================
kind        model                                           objective
==========  ==============================================  ===========================================
dense       the plain backbone (profile's ``[dense]``)      cross-entropy
ftwt        dense weights + a decision head per block       cross-entropy + head BCE towards the target
static      dense weights pruned by a static method         cross-entropy (dynamic recipe)
signature   ftwt with per-block kept counts fixed           as ftwt, top-k targets of the fixed counts
==========  ==============================================  ===========================================

A kind checks its spec, builds the model a new run starts from, makes the choices recorded before the
run is built (the r of a FLOPs budget, the pruned widths), and configures the model (new or resumed):
the targets its heads learn and the meta every checkpoint carries. :mod:`.objectives` says what a step
minimises.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from ftwt_cli.algorithms.estimate import UnreachableTarget, find_ratio
from ftwt_cli.algorithms.static import (
    STATIC_METHODS,
    TAYLOR_BATCHES,
    apply_signature,
    counts,
    read_signature,
    signature_macs,
    taylor,
)
from ftwt_cli.console import console
from ftwt_cli.core.gating import FTWTModel
from ftwt_cli.core.graph import analyze
from ftwt_cli.core.registry import Registry
from ftwt_cli.core.targets import Target, make_target
from ftwt_cli.errors import BadInput
from ftwt_cli.io import loading
from ftwt_cli.io.config import Config, check_target_flops
from ftwt_cli.io.data import make_loader
from ftwt_cli.workflows.train.hooks import BudgetPolicy, Hook
from ftwt_cli.workflows.train.objectives import CrossEntropyObjective, Distillation, MaskObjective
from ftwt_cli.workflows.train.processes import Distributed
from ftwt_cli.workflows.train.spec import RunSpec

#: Accepted distance (points) between the --target-flops goal and the estimate of the chosen r.
SEARCH_TOLERANCE = 0.25


@dataclass
class Built:
    """A run's model on its device, configured; the meta its checkpoints carry; the heads' targets."""

    model: nn.Module
    meta: dict
    target: Target | Sequence[Target] | None = None


class RunKind:
    """Base: a dense-like run (no heads). Subclasses override what differs."""

    #: What the run's last.pt holds (``--resume`` reloads it as this checkpoint kind).
    checkpoint_kind = "dense"

    def check(self, spec: RunSpec) -> None:
        """Kind-specific consistency checks (one-line BadInput), after the spec's own."""

    def initial(self, spec: RunSpec, device: torch.device) -> loading.LoadedModel:
        """The model a new run starts from (what it decides goes into the spec's records)."""
        return loading.load_model(spec.config, None, warn_untrained=False)

    def prepare(self, spec: RunSpec, model: nn.Module, dist: Distributed, device: torch.device) -> None:
        """Choices made on the initial model before the run is built and config.json written (the r search)."""

    def configure(self, spec: RunSpec, loaded: loading.LoadedModel) -> Built:
        """The run's model (new, or from last.pt on resume) set up for training, with its checkpoints' meta."""
        return Built(loaded.model, dict(loaded.meta))

    def objective(self, spec: RunSpec, built: Built) -> CrossEntropyObjective:
        return CrossEntropyObjective(spec, distillation(spec, built))

    def hooks(self, spec: RunSpec) -> list[Hook]:
        return []


#: Run kinds by name.
RUN_KINDS: Registry[type[RunKind]] = Registry("run kind")


@RUN_KINDS.register("dense")
class Dense(RunKind):
    """The plain backbone with the profile's dense recipe: the baseline every other kind starts from."""

    def check(self, spec: RunSpec) -> None:
        if spec.config.distill > 0:
            raise BadInput("--distill learns from the dense model a run starts from; a dense run has none")


@RUN_KINDS.register("ftwt")
class FTWT(RunKind):
    """FTWT dynamic training from dense weights, at a fixed r or at the r a FLOPs search chose."""

    checkpoint_kind = "ftwt"

    def initial(self, spec: RunSpec, device: torch.device) -> loading.LoadedModel:
        loaded = loading.load_model(spec.config, spec.init, require="dense")
        return loading.LoadedModel(loading.wrap(loaded.model, spec.config), loaded.meta, loaded.path)

    def prepare(self, spec: RunSpec, model: nn.Module, dist: Distributed, device: torch.device) -> None:
        """--target-flops: rank 0 searches r on the training split; every rank gets its record (or its error)."""
        if spec.target_flops is None or spec.estimate is not None:
            return
        record: dict | None = None
        if dist.is_main:
            cfg = spec.config
            loader = make_loader(loading.dataset(cfg, "train"), cfg.batch_size, workers=cfg.workers)
            try:
                result = find_ratio(model, loader, device, spec.target_flops, SEARCH_TOLERANCE)
                record = {
                    "target": result.target,
                    "chosen_r": result.chosen_r,
                    "estimated_reduction_pct": result.estimated_reduction_pct,
                    "converged": result.converged,
                }
            except UnreachableTarget as exc:
                record = {"error": str(exc)}
        record = dist.broadcast(record)
        if "error" in record:
            raise BadInput(record["error"])
        if dist.is_main:
            console.print(
                f"target {record['target']:g}% FLOPs → r = {record['chosen_r']:.6f} "
                f"(estimated {record['estimated_reduction_pct']:.2f}%)",
                highlight=False,
            )
        spec.estimate = record
        spec.config.r = record["chosen_r"]

    def targets(self, spec: RunSpec, model: FTWTModel) -> Target | Sequence[Target]:
        return make_target(spec.config.target, spec.config.r)

    def configure(self, spec: RunSpec, loaded: loading.LoadedModel) -> Built:
        cfg, model = spec.config, loaded.model
        target = self.targets(spec, model)
        model.configure(mask_source="predicted", record=True, target=target, decoupled=cfg.mode == "decoupled")
        meta = loading.ftwt_meta(cfg, loaded.meta["num_classes"], cfg.r)
        if spec.estimate is not None:
            meta["estimate"] = spec.estimate
        if any(model.codebook_sizes()):  # resumed after the codebook was fitted
            meta["codebook_sizes"] = model.codebook_sizes()
        return Built(model, meta, target)

    def objective(self, spec: RunSpec, built: Built) -> MaskObjective:
        return MaskObjective(spec, built.target, distillation(spec, built))

    def hooks(self, spec: RunSpec) -> list[Hook]:
        return [BudgetPolicy()] if spec.target_flops is not None and spec.config.calibrate else []


@RUN_KINDS.register("signature")
class Signature(FTWT):
    """A predefined signature (Table 6): every head keeps exactly its block's count, highest logits first."""

    def check(self, spec: RunSpec) -> None:
        if not spec.signature or "counts" not in spec.signature:
            raise BadInput("a signature run needs per-block counts (--signature FILE|taylor)")

    def targets(self, spec: RunSpec, model: FTWTModel) -> Sequence[Target]:
        return apply_signature(model, spec.signature["counts"])

    def configure(self, spec: RunSpec, loaded: loading.LoadedModel) -> Built:
        built = super().configure(spec, loaded)
        built.meta["signature"] = spec.signature["counts"]
        return built


@RUN_KINDS.register("static")
class Static(RunKind):
    """A static baseline: the dense init pruned once (torch-pruning) when the run starts, then fine-tuned
    with the profile's dynamic recipe (epochs, lr, milestones) on cross-entropy."""

    checkpoint_kind = "static"

    def check(self, spec: RunSpec) -> None:
        method = (spec.static or {}).get("method")
        if method not in (*STATIC_METHODS, "signature"):
            raise BadInput(f"--static must be {STATIC_METHODS.alternatives()}, got {method!r}")

    def initial(self, spec: RunSpec, device: torch.device) -> loading.LoadedModel:
        """Load the run's dense init and prune it (CPU, deterministic)."""
        cfg, record = spec.config, spec.static
        loaded = dense_init(cfg, record["init"])
        dense = loaded.model.eval()
        size = loading.input_size(cfg)
        method = record["method"]
        if method == "signature":
            result = counts(dense, record["counts"], size)
        else:
            result = STATIC_METHODS[method](dense, record["target_flops"], size, lambda: taylor_batches(cfg))
        record |= {
            "reduction_pct": result.reduction_pct,
            "fraction": result.fraction,
            "steps": result.steps,
            "left_whole": result.whole,
        }
        meta = {**loaded.meta, **result.meta(), "init": record["init"], **loading.distill_meta(cfg)}
        if method == "signature":
            meta["signature_source"] = record.get("signature_source")
        console.print(
            f"static {method}: {result.dense_macs / 1e6:.2f} → {result.macs / 1e6:.2f} MMACs "
            f"({result.reduction_pct:.2f}% FLOPs reduction)"
            + (f", {len(result.whole)} convs left whole" if result.whole else ""),
            highlight=False,
        )
        return loading.LoadedModel(result.model.train(), meta, None)


def distillation(spec: RunSpec, built: Built) -> Distillation | None:
    """``--distill T``: soft targets from the dense model the run starts from (frozen, eval mode)."""
    cfg = spec.config
    if cfg.distill <= 0:
        return None
    teacher = loading.load_model(cfg, spec.init, require="dense").model
    device = next(built.model.parameters()).device
    teacher = teacher.to(device).eval().requires_grad_(False)
    return Distillation(teacher, cfg.distill, cfg.distill_weight)


def check(spec: RunSpec) -> RunKind:
    """The spec's own checks and its kind's; returns the kind."""
    spec.check()
    kind = RUN_KINDS[spec.kind]()
    kind.check(spec)
    return kind


# ---------------------------------------------------------------------------------------------------
# Building specs of the baselines (before the run: they load the dense model once)


def check_target(target_pct: float | None, what: str) -> float:
    if target_pct is None:
        raise BadInput(f"{what} needs --target-flops P (percent of FLOPs to remove)")
    return check_target_flops(target_pct)


def dense_init(cfg: Config, init: str | None) -> loading.LoadedModel:
    if init is None:
        raise BadInput("static pruning and signatures start from a dense model: pass --init DENSE_CKPT")
    return loading.load_model(cfg, init, require="dense")


def taylor_batches(cfg: Config) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first TAYLOR_BATCHES shuffled (seeded) training mini-batches, without augmentation, never from
    the validation images a run holds out."""
    train_set, _ = loading.training_splits(cfg, augment=False)  # never the held-out validation images
    loader = make_loader(train_set, cfg.batch_size, shuffle=True, workers=cfg.workers, seed=cfg.seed)
    batches = []
    for images, labels in loader:
        batches.append((images, labels))
        if len(batches) == TAYLOR_BATCHES:
            break
    return batches


def signature_record(cfg: Config, init: str | None, source: str, target_pct: float | None) -> dict:
    """Resolve ``--signature FILE|taylor`` into per-block kept-filter counts (a run spec's ``signature``)."""
    dense = dense_init(cfg, init).model.eval()
    size = loading.input_size(cfg)
    graph = analyze(dense, size)
    widths = {b.conv: b.out_channels for b in graph.blocks}
    if source == "taylor":
        target_pct = check_target(target_pct, "--signature taylor")
        kept = taylor(dense, target_pct, size, lambda: taylor_batches(cfg)).kept
    else:
        if target_pct is not None:
            raise BadInput("a signature file fixes the FLOPs itself; drop --target-flops (or use --signature taylor)")
        kept = read_signature(source, widths)
    reduction = 100.0 * (1.0 - signature_macs(graph, kept) / graph.dense_macs)
    return {"source": source, "target_flops": target_pct, "counts": kept, "reduction_pct": reduction}


def static_record(method: str, init: str | None, target_pct: float | None, signature: dict | None = None) -> dict:
    """The ``static`` record of a static baseline's spec (pruned from ``init`` when the run starts)."""
    if method not in (*STATIC_METHODS, "signature"):
        raise BadInput(f"--static must be {STATIC_METHODS.alternatives()}, got {method!r}")
    if method != "signature":
        target_pct = check_target(target_pct, f"--static {method}")
    if init is None:
        raise BadInput("static pruning starts from a dense model: pass --init DENSE_CKPT")
    record = {"method": method, "target_flops": target_pct, "init": init}
    if signature is not None:
        record |= {"signature_source": signature["source"], "counts": signature["counts"]}
    return record
