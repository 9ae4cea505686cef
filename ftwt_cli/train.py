"""Dense baselines and FTWT dynamic training: plain loops in the style of torchvision's
references/classification, resumable exactly, single process or DistributedDataParallel under torchrun.

A run lives in one directory::

    config.json   the resolved configuration, mode, r, init checkpoint and --target-flops record
    metrics.csv   one row per epoch (regenerated from the history kept in last.pt)
    last.pt       weights + train_state (optimizers, schedulers, epoch, best top-1, history)
    best.pt       weights of the epoch with the best test top-1

Randomness (shuffling, augmentation) is reseeded at the start of every epoch from (seed, epoch, rank),
so the epoch number in ``train_state`` fixes every random stream: a resumed run repeats the straight
run bit for bit on CPU, for any number of processes and DataLoader workers.
"""

from __future__ import annotations

import contextlib
import functools
import datetime
import itertools
import json
import math
import os
import random
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset

from ftwt_cli import checkpoint as ckpt
from ftwt_cli import runtime, static
from ftwt_cli.config import Config, check_target_flops, resolve_device
from ftwt_cli.config import validate as validate_config
from ftwt_cli.console import console, progress_bar
from ftwt_cli.data import make_loader
from ftwt_cli.errors import BadInput
from ftwt_cli.estimate import UnreachableTarget, find_ratio
from ftwt_cli.flops import FlopsCounter
from ftwt_cli.calibrate import Calibration, CalibrationError, calibrate
from ftwt_cli.calibrate import before_and_after
from ftwt_cli.gating import FTWTModel, Target, head_loss, make_target, truth_masks
from ftwt_cli.metrics import MaskStats

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.csv"
LAYERS_FILE = "layers.csv"
LAST_FILE = "last.pt"
BEST_FILE = "best.pt"
#: Accepted distance (points) between the --target-flops goal and the estimate of the chosen r.
SEARCH_TOLERANCE = 0.25
#: --head-init ones: head-only steps until every logit of a batch exceeds the margin (sigmoid 0.73).
WARMUP_MARGIN = 1.0
WARMUP_MAX_STEPS = 200


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; the run stops and keeps its last good checkpoint."""


# ---------------------------------------------------------------------------------------------------
# Processes


@dataclass(frozen=True)
class Distributed:
    """This process's place in a torchrun job (world_size 1: a plain single-process run)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            torch_dist.all_reduce(tensor)
        return tensor

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (plain picklable values)."""
        if not self.enabled:
            return value
        box = [value]
        torch_dist.broadcast_object_list(box, src=0)
        return box[0]

    def sync_buffers(self, module: nn.Module) -> None:
        """Rank 0's buffers (BN running statistics) on every rank. DDP broadcasts them before each forward,
        so after an epoch's last step every rank holds its own update; evaluation and checkpoints need one."""
        if self.enabled:
            for buffer in module.buffers():
                torch_dist.broadcast(buffer, src=0)

    def barrier(self) -> None:
        if self.enabled:
            torch_dist.barrier()


def start_processes(device_name: str) -> tuple[Distributed, torch.device]:
    """Join the torchrun process group when WORLD_SIZE > 1 (gloo on CPU, nccl on CUDA)."""
    device = resolve_device(device_name)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed(), device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not torch_dist.is_initialized():
        torch_dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Distributed(rank, world_size, local_rank), device


def stop_processes(dist: Distributed) -> None:
    if dist.enabled and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def wrap_for_processes(model: nn.Module, dist: Distributed, device: torch.device, sync_bn: bool) -> tuple[nn.Module, nn.Module]:
    """(model, net): under torchrun ``net`` is the DDP wrapper, and with ``sync_bn`` every BatchNorm of
    ``model`` becomes a SyncBatchNorm (same parameters and buffers, so optimizers and checkpoints are
    unchanged) that normalises with the statistics of the whole global batch."""
    if not dist.enabled:
        if sync_bn:
            warnings.warn("--sync-bn has no effect in a single process (run under torchrun)", stacklevel=2)
        return model, model
    if sync_bn:
        if device.type != "cuda":
            raise BadInput("--sync-bn needs CUDA devices (PyTorch's SyncBatchNorm does not run on CPU); drop --sync-bn")
        model = sync_batchnorm(model)
    return model, DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def sync_batchnorm(model: nn.Module) -> nn.Module:
    """Every BatchNorm of ``model`` (inside gated blocks too) as a SyncBatchNorm holding the same
    parameter and buffer tensors: optimizers built before stay valid, state_dict keys do not change."""
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


# ---------------------------------------------------------------------------------------------------
# What a run does


@dataclass
class RunSpec:
    """Everything that defines a run; saved as config.json so that --resume can rebuild it."""

    config: Config
    dense: bool
    init: str | None = None  # the dense checkpoint a dynamic run starts from
    target_flops: float | None = None  # percent of FLOPs to remove; r is searched when set
    estimate: dict | None = None  # the search record: target, chosen_r, estimated_reduction_pct
    static: dict | None = None  # a static baseline (see ftwt_cli.static): pruned from its init, trained like dense
    signature: dict | None = None  # a predefined signature: {"source", "counts": {block conv: kept filters}}

    @property
    def mode(self) -> str:
        if self.static is not None:
            return "static"
        return "dense" if self.dense else self.config.mode

    @property
    def epochs(self) -> int:
        return self.config.dense_epochs if self.dense else self.config.epochs

    @property
    def lr(self) -> float:
        return self.config.dense_lr if self.dense else self.config.lr

    @property
    def milestones(self) -> list[int]:
        return self.config.dense_milestones if self.dense else self.config.milestones

    @property
    def r(self) -> float | None:
        return None if self.dense else self.config.r

    @property
    def freeze_epoch(self) -> int:
        """First epoch with frozen heads: ceil(F × epochs), so F = 1 never freezes and one epoch trains them."""
        return math.ceil(self.config.freeze_heads_after * self.epochs - 1e-9)

    def default_dir(self, now: datetime.datetime | None = None) -> Path:
        stamp = (now or datetime.datetime.now()).strftime("%Y%m%d-%H%M%S")
        ratio = "" if self.dense else f"-r{self.config.r:.4g}"
        return Path("runs") / f"{self.config.profile}-{self.mode}{ratio}-{stamp}"

    def to_dict(self) -> dict:
        return {
            "config": self.config.to_dict(),
            "dense": self.dense,
            "mode": self.mode,
            "r": self.r,
            "init": self.init,
            "target_flops": self.target_flops,
            "estimate": self.estimate,
            "static": self.static,
            "signature": self.signature,
            "best_selected_on": self.selected_on,
        }

    @property
    def selected_on(self) -> str:
        """The split whose top-1 chooses best.pt."""
        return "val" if self.config.val_fraction > 0 else "test"

    @classmethod
    def from_dict(cls, doc: dict) -> "RunSpec":
        config = dict(doc["config"])
        config.setdefault("train_samples", config.get("samples", 0))  # runs from before train_samples existed
        return cls(
            Config(**config), bool(doc["dense"]), doc.get("init"), doc.get("target_flops"), doc.get("estimate"),
            doc.get("static"), doc.get("signature"),
        )  # fmt: skip

    def check(self) -> None:
        """One-line BadInput for every inconsistent choice (before anything is loaded or written)."""
        validate_config(self.config)
        if self.epochs < 1:
            raise BadInput(f"--epochs must be at least 1, got {self.epochs}")
        if self.lr <= 0 or (not self.dense and self.config.head_lr <= 0):
            raise BadInput("--lr and --head-lr must be positive")
        if any(m < 1 for m in self.milestones):
            raise BadInput(f"--milestones must be positive epoch numbers, got {self.milestones}")
        if self.dense:
            if self.init is not None or self.target_flops is not None:
                raise BadInput("--dense trains the plain backbone; --init and --target-flops are for dynamic training")
            return
        if self.init is None:
            raise BadInput(
                "dynamic training needs --init with dense weights: an ftwt checkpoint or state_dict FILE, or torchvision; "
                f"train them with 'ftwt train --dense --model {self.config.model}'"
            )
        if self.target_flops is not None:
            check_target_flops(self.target_flops)


def parse_milestones(text: str) -> list[int]:
    """``80,120,150`` → [80, 120, 150]."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise BadInput(f"--milestones must be comma-separated epoch numbers (80,120,150), got {text!r}") from None
    return sorted(values)


def read_spec(run_dir: Path) -> RunSpec:
    """The spec of an existing run directory (for --resume)."""
    path = run_dir / CONFIG_FILE
    if not (run_dir / LAST_FILE).is_file() or not path.is_file():
        raise BadInput(f"{run_dir} is not an ftwt run directory (no {CONFIG_FILE} and {LAST_FILE})")
    try:
        return RunSpec.from_dict(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError) as exc:
        raise BadInput(f"{path} is not a valid run configuration: {exc}") from None


# ---------------------------------------------------------------------------------------------------
# Steps and passes


@dataclass
class Objective:
    """What one step minimises: cross-entropy, plus the heads' loss towards ``target`` for FTWT models."""

    target: Target | None = None
    head_weight: float = 1.0

    def __call__(
        self, model: nn.Module, logits: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor] | None]:
        """(task loss, head loss, ground-truth masks per block or None for a dense model)."""
        task = F.cross_entropy(logits, labels)
        if self.target is None:
            return task, torch.zeros((), device=logits.device), None
        records = model.records()
        truth = truth_masks(records, self.target)
        return task, head_loss(records, truth), truth


def train_step(
    net: nn.Module,
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    objective: Objective,
    optimizers: list[torch.optim.Optimizer],
    dist: Distributed = Distributed(),
    stats: MaskStats | None = None,
) -> tuple[float, float, int, int]:
    """One SGD step; returns (task loss, head loss, correct, images) summed over the batch on every rank.

    ``net`` is what runs forward (the model or its DDP wrapper), ``model`` the unwrapped module whose
    blocks hold the records. The head loss is multiplied by its weight, never dropped, so heads stay in
    the graph (DDP needs a gradient for every parameter) even when the weight is 0. A non-finite loss on
    any rank raises NonFiniteLoss on every rank before any weight changes. ``stats`` (FTWT models)
    accumulates the step's masks against the ground truth (the training split's per-layer figures).
    """
    logits = net(images)
    task, heads, truth = objective(model, logits, labels)
    loss = task + objective.head_weight * heads
    if stats is not None and truth is not None:
        records = model.records()
        stats.update([rec.mask > 0 for rec in records], truth, [rec.logits for rec in records])
    n = labels.shape[0]
    sums = torch.stack([task.detach() * n, heads.detach() * n, (logits.argmax(1) == labels).sum().to(task.dtype), task.new_tensor(n)])
    task_sum, head_sum, correct, count = dist.all_sum(sums.double()).tolist()
    if not (math.isfinite(task_sum) and math.isfinite(head_sum)):
        raise NonFiniteLoss(f"non-finite loss (task {task_sum / count:g}, heads {head_sum / count:g})")
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
    loss.backward()
    for optimizer in optimizers:
        optimizer.step()
    return task_sum, head_sum, int(correct), int(count)


@dataclass
class TestMetrics:
    test_top1: float
    head_acc: float | None = None  # percent of channel decisions equal to the ground truth
    flops_reduction_pct: float | None = None
    flops_reduction_with_heads_pct: float | None = None


def mask_stats(model: nn.Module, track_masks: bool) -> MaskStats | None:
    """A fresh statistics accumulator for an FTWT model (None for a dense one)."""
    if not isinstance(model, FTWTModel):
        return None
    return MaskStats(FlopsCounter(model.graph), [b.conv for b in model.graph.blocks], track_masks=track_masks)


def summarise(correct: float, count: float, stats: MaskStats | None) -> TestMetrics:
    metrics = TestMetrics(test_top1=100.0 * correct / max(count, 1))
    if stats is not None:
        layers = stats.layers()
        decisions = sum(layer.channels for layer in layers)
        metrics.head_acc = 100.0 * sum(layer.head_accuracy * layer.channels for layer in layers) / decisions
        metrics.flops_reduction_pct = stats.reduction_pct()
        metrics.flops_reduction_with_heads_pct = stats.reduction_pct(with_heads=True)
    return metrics


@torch.no_grad()
def validate(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    target: Target | None = None,
    dist: Distributed = Distributed(),
    show: Callable = progress_bar,
    label: str = "test",
) -> tuple[TestMetrics, MaskStats | None]:
    """Top-1 of ``model``; for an FTWT model also the per-layer mask statistics (:class:`MaskStats`:
    keep rates vs the ground truth, precision / recall, head BCE, distinct masks) and the measured FLOPs.

    The masks are those the heads applied; the ground truth comes from each block's unmasked output.
    Every rank passes over its own shard; sums are reduced across ranks.
    """
    model.eval()
    stats = mask_stats(model, track_masks=not dist.enabled)
    if stats is not None:
        model.configure(record=True)
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # correct, images
    with show(label, len(loader)) as advance:
        for images, labels in loader:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            logits = model(images)
            sums[0] += (logits.argmax(1) == labels).sum()
            sums[1] += labels.shape[0]
            if stats is not None:
                records = model.records()
                stats.update([rec.mask > 0 for rec in records], truth_masks(records, target), [rec.logits for rec in records])
            advance()
    correct, count = dist.all_sum(sums).tolist()
    if stats is not None:
        stats.reduce(dist.all_sum)
    return summarise(correct, count, stats), stats


def layer_rows(epoch: int, split: str, stats: MaskStats | None) -> list[dict]:
    """Per-layer rows of ``layers.csv``: target vs heads' keep rate, precision, recall, BCE, distinct masks."""
    if stats is None:
        return []
    return [{"epoch": epoch, "split": split, **asdict(layer)} for layer in stats.layers()]


def detach_frozen_heads(model: FTWTModel, frozen: bool, mode: str) -> None:
    """Frozen heads leave the backbone's graph: joint mode's straight-through path and undetached head
    input would otherwise keep sending the task loss's gradient through them; their masks become
    constants, exactly as in decoupled training."""
    model.configure(decoupled=frozen or mode == "decoupled")


def warm_up_heads(model: FTWTModel, loader: DataLoader, device: torch.device, lr: float, momentum: float) -> int:
    """``--head-init ones``: head-only SGD towards the keep-everything target, with the backbone frozen
    (eval mode, detached head inputs), until every head keeps every channel of a batch with a margin
    (logit > WARMUP_MARGIN); at most WARMUP_MAX_STEPS steps. Returns the number of steps taken."""
    decoupled = model.blocks[0].detach_head_input
    model.eval().configure(decoupled=True)
    optimizer = torch.optim.SGD(model.head_parameters(), lr=lr, momentum=momentum)
    batches = (batch for _ in itertools.count() for batch in loader)  # cycles through epochs
    for steps, (images, _) in enumerate(batches):
        model(images.to(device, non_blocking=True))
        logits = [rec.logits for rec in model.records()]
        if steps == WARMUP_MAX_STEPS or all(bool((lg > WARMUP_MARGIN).all()) for lg in logits):
            break
        # Summed over heads: each head is trained on its own loss, whatever the number of blocks.
        loss = sum(F.binary_cross_entropy_with_logits(lg, torch.ones_like(lg), reduction="none").sum(1).mean() for lg in logits)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.configure(decoupled=decoupled)
    for p in model.parameters():
        p.grad = None
    return steps


# ---------------------------------------------------------------------------------------------------
# Runs


@dataclass
class Summary:
    run_dir: str | None
    mode: str
    r: float | None
    epochs: int
    best_top1: float
    test_top1: float
    flops_reduction_pct: float | None
    flops_reduction_with_heads_pct: float | None
    estimate: dict | None = None
    selected_on: str = "test"  # the split whose top-1 chose best.pt
    calibration: dict | None = None  # --target-flops: what calibration chose and measured (raw vs calibrated)
    history: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "history"}


def seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Every random stream of an epoch is a function of (seed, epoch, rank)."""
    value = (seed * 1_000_003 + epoch * 1_009 + rank) % 2**63
    torch.manual_seed(value)
    random.seed(value)


def build_optimizers(model: nn.Module, spec: RunSpec) -> dict[str, torch.optim.SGD]:
    """Backbone SGD (lr, momentum, weight decay); for FTWT models also the heads' SGD (head_lr, no decay)."""
    cfg = spec.config
    if spec.dense:
        return {"backbone": torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)}
    return {
        "backbone": torch.optim.SGD(
            model.backbone_parameters(), lr=spec.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        ),
        "heads": torch.optim.SGD(model.head_parameters(), lr=cfg.head_lr, momentum=cfg.momentum, weight_decay=0.0),
    }


def build_schedulers(optimizers: dict[str, torch.optim.Optimizer], spec: RunSpec) -> dict[str, torch.optim.lr_scheduler.MultiStepLR]:
    return {
        name: torch.optim.lr_scheduler.MultiStepLR(opt, milestones=spec.milestones, gamma=spec.config.gamma)
        for name, opt in optimizers.items()
    }


class Run:
    """One training run: model, optimizers, data and the run directory; :meth:`fit` trains it."""

    def __init__(self, spec: RunSpec, run_dir: Path | None, dist: Distributed, device: torch.device, resume: bool) -> None:
        self.spec, self.run_dir, self.dist, self.device = spec, run_dir, dist, device
        cfg = spec.config
        self.start_epoch, self.best_top1, self.history, self.layer_history = 0, -math.inf, [], []
        self.calibration: dict | None = None
        self.best_epoch: int | None = None
        seed_epoch(cfg.seed, -1, 0)  # model initialisation (identical on every rank)
        if resume:
            kind = "static" if spec.static is not None else "dense" if spec.dense else "ftwt"
            loaded = runtime.load_model(cfg, str(run_dir / LAST_FILE), require=kind)
        elif spec.static is not None:
            loaded = static.prune_for_run(spec, device)
        elif spec.dense:
            loaded = runtime.load_model(cfg, None, warn_untrained=False)
        else:
            loaded = runtime.load_model(cfg, spec.init, require="dense")
        self.meta = dict(loaded.meta)
        model = loaded.model if (spec.dense or resume) else runtime.wrap(loaded.model, cfg)
        self.model = model.to(device)
        self.target = None
        if not spec.dense:
            if spec.target_flops is not None and spec.estimate is None:
                spec.estimate = self._search_ratio()
                cfg.r = spec.estimate["chosen_r"]
            self.target = make_target(cfg.target, cfg.r)
            if spec.signature is not None:
                self.target = static.apply_signature(self.model, spec.signature["counts"])
            self.model.configure(mask_source="predicted", record=True, target=self.target, decoupled=cfg.mode == "decoupled")
            self.meta = runtime.ftwt_meta(cfg, self.meta["num_classes"], cfg.r)
            if spec.estimate is not None:
                self.meta["estimate"] = spec.estimate
            if spec.signature is not None:
                self.meta["signature"] = spec.signature["counts"]
        self.meta["best_selected_on"] = spec.selected_on  # every checkpoint says which split chose best.pt
        self.optimizers = build_optimizers(self.model, spec)
        self.schedulers = build_schedulers(self.optimizers, spec)
        self._build_data()
        if resume:
            self._restore(ckpt.load_checkpoint(run_dir / LAST_FILE)["train_state"])
        elif not spec.dense and cfg.head_init == "ones":
            steps = warm_up_heads(self.model, self.train_loader, device, cfg.head_lr, cfg.momentum)
            self.log(f"head warm-up: {steps} head-only steps until every channel is kept")
        if not resume and not spec.dense and cfg.head_warmup > 0:
            seed_epoch(cfg.seed, -2, dist.rank)
            self._warm_up_on_targets(cfg.head_warmup)
        self.model, self.net = wrap_for_processes(self.model, dist, device, cfg.sync_bn)
        self.log(
            f"batch size {cfg.batch_size} per process × {dist.world_size} process(es) = {cfg.batch_size * dist.world_size} "
            f"images per step{' (SyncBatchNorm)' if cfg.sync_bn and dist.enabled else ''}"
        )

    # -- setup -------------------------------------------------------------------------------------

    def _warm_up_on_targets(self, epochs: int) -> None:
        """--head-warmup: train the heads towards their targets on the frozen backbone (eval mode, no mask
        applied) before training starts, so the backbone never fine-tunes under an untrained head's masks."""
        model, cfg = self.model, self.spec.config
        optimizer = torch.optim.SGD(model.head_parameters(), lr=cfg.head_lr, momentum=cfg.momentum)
        model.eval().configure(mask_source="observed")
        for head in model.heads():
            head.train()  # a head's own norm learns its statistics
        for epoch in range(epochs):
            with self.show(f"head warm-up {epoch + 1}/{epochs}", len(self.train_loader)) as advance:
                for images, _ in self.train_loader:
                    model(images.to(self.device, non_blocking=True))
                    records = model.records()
                    loss = head_loss(records, truth_masks(records, self.target))
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    advance(info=f"head loss {loss.item():.3f}")
        model.configure(mask_source="predicted")
        for p in model.parameters():
            p.grad = None

    def _search_ratio(self) -> dict:
        """--target-flops: rank 0 searches r on the training split; every rank gets its record (or its error)."""
        record: dict | None = None
        if self.dist.is_main:
            cfg = self.spec.config
            loader = make_loader(runtime.dataset(cfg, "train"), cfg.batch_size, workers=cfg.workers)
            try:
                result = find_ratio(self.model, loader, self.device, self.spec.target_flops, SEARCH_TOLERANCE)
                record = {
                    "target": result.target,
                    "chosen_r": result.chosen_r,
                    "estimated_reduction_pct": result.estimated_reduction_pct,
                    "converged": result.converged,
                }
            except UnreachableTarget as exc:
                record = {"error": str(exc)}
        record = self.dist.broadcast(record)
        if "error" in record:
            raise BadInput(record["error"])
        self.log(f"target {record['target']:g}% FLOPs → r = {record['chosen_r']:.6f} (estimated {record['estimated_reduction_pct']:.2f}%)")
        return record

    def _build_data(self) -> None:
        cfg, dist = self.spec.config, self.dist
        train_set, val_set = runtime.training_splits(cfg)
        test_set = runtime.dataset(cfg, "test")
        self.sampler = (
            DistributedSampler(train_set, dist.world_size, dist.rank, shuffle=True, seed=cfg.seed) if dist.enabled else None
        )
        self.train_loader = make_loader(
            train_set, cfg.batch_size, shuffle=True, workers=cfg.workers, seed=cfg.seed, sampler=self.sampler
        )
        self.test_loader = make_loader(self._shard(test_set), cfg.batch_size, workers=cfg.workers)
        self.val_loader = make_loader(self._shard(val_set), cfg.batch_size, workers=cfg.workers) if val_set else None

    def _shard(self, dataset):
        """A strided shard per rank, so every evaluation image is counted exactly once."""
        if not self.dist.enabled:
            return dataset
        return Subset(dataset, range(self.dist.rank, len(dataset), self.dist.world_size))

    def _restore(self, state: dict) -> None:
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state["optimizers"][name])
        for name, sched in self.schedulers.items():
            sched.load_state_dict(state["schedulers"][name])
        self.start_epoch = int(state["epoch"])
        self.best_epoch = state.get("best_epoch")
        self.best_top1 = float(state["best_top1"])
        self.history = list(state["history"])
        self.layer_history = list(state.get("layer_history", []))

    def train_state(self, epoch: int) -> dict:
        return {
            "epoch": epoch,
            "best_top1": self.best_top1,
            "best_epoch": self.best_epoch,
            "history": self.history,
            "layer_history": self.layer_history,
            "optimizers": {n: o.state_dict() for n, o in self.optimizers.items()},
            "schedulers": {n: s.state_dict() for n, s in self.schedulers.items()},
        }

    # -- output ------------------------------------------------------------------------------------

    def log(self, message: str) -> None:
        if self.dist.is_main:
            console.print(message, highlight=False)

    def show(self, description: str, total: int):
        """A progress bar on rank 0; a silent stand-in elsewhere."""
        if self.dist.is_main:
            return progress_bar(description, total)
        return contextlib.nullcontext(lambda *args, **kwargs: None)

    def _save(self, epoch: int, metrics: dict, improved: bool) -> None:
        if not self.dist.is_main:
            return
        meta = {**self.meta, "epoch": epoch, "test_top1": metrics["test_top1"]}
        if "val_top1" in metrics:
            meta["val_top1"] = metrics["val_top1"]
        if improved:
            ckpt.save_checkpoint(self.run_dir / BEST_FILE, self.model, meta)
        ckpt.save_checkpoint(self.run_dir / LAST_FILE, self.model, meta, self.train_state(epoch))
        for name, rows in ((METRICS_FILE, self.history), (LAYERS_FILE, self.layer_history)):
            if rows:
                text = pd.DataFrame(rows).to_csv(index=False).encode()
                ckpt.atomic_write_bytes(self.run_dir / name, lambda f, text=text: f.write(text))

    # -- training ----------------------------------------------------------------------------------

    def train_epoch(self, epoch: int) -> dict:
        spec, cfg = self.spec, self.spec.config
        seed_epoch(cfg.seed, epoch, self.dist.rank)
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
        else:
            self.train_loader.generator.manual_seed(cfg.seed + epoch)
        heads_frozen = not spec.dense and epoch >= spec.freeze_epoch
        if not spec.dense:
            detach_frozen_heads(self.model, heads_frozen, cfg.mode)
        objective = Objective(self.target, head_weight=0.0 if heads_frozen else 1.0)
        stepping = [opt for name, opt in self.optimizers.items() if not (name == "heads" and heads_frozen)]
        self.net.train()
        if heads_frozen:
            for head in self.model.heads():
                head.eval()  # frozen heads keep their norm statistics, so their calibrated thresholds hold
        stats = mask_stats(self.model, track_masks=False)
        task_sum = head_sum = 0.0
        correct = seen = 0
        with self.show(f"epoch {epoch + 1}/{spec.epochs}", len(self.train_loader)) as advance:
            for images, labels in self.train_loader:
                images, labels = images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
                task, heads, right, count = train_step(
                    self.net, self.model, images, labels, objective, stepping, self.dist, stats
                )
                task_sum, head_sum, correct, seen = task_sum + task, head_sum + heads, correct + right, seen + count
                info = f"loss {task_sum / seen:.3f} top-1 {100 * correct / seen:.1f}"
                advance(info=info + ("" if spec.dense else f" heads {head_sum / seen:.3f}"))
        row: dict[str, Any] = {"epoch": epoch + 1, "lr": self.optimizers["backbone"].param_groups[0]["lr"]}
        if not spec.dense:
            row["head_lr"] = self.optimizers["heads"].param_groups[0]["lr"]
            row["heads_frozen"] = heads_frozen
        row |= {"task_loss": task_sum / seen, "train_top1": 100.0 * correct / seen}
        if not spec.dense:
            row["head_loss"] = head_sum / seen
            stats.reduce(self.dist.all_sum)
            row["train_flops_reduction_pct"] = stats.reduction_pct(with_heads=True)
            self.layer_history += layer_rows(epoch + 1, "train", stats)
        return row

    def fit(self) -> Summary:
        spec = self.spec
        budgeted = not spec.dense and spec.target_flops is not None and spec.config.calibrate
        for epoch in range(self.start_epoch, spec.epochs):
            if budgeted and epoch == spec.freeze_epoch:
                # The heads stop learning here: set their thresholds to the budget now, so the backbone
                # fine-tunes under the masks it will be delivered with (calibrating only at the end would
                # change the masks of a backbone that never saw them).
                self._calibrate(f"epoch {epoch + 1}, heads frozen")
            row = self.train_epoch(epoch)
            self.dist.sync_buffers(self.model)
            for scheduler in self.schedulers.values():
                scheduler.step()
            row |= self._validate(epoch + 1)
            self.history.append(row)
            # best.pt is chosen on held-out training images when there are some, never on the test split then;
            # a budgeted run delivers only epochs trained under its calibrated (on-budget) masks
            score = row.get("val_top1", row["test_top1"])
            eligible = not (budgeted and spec.freeze_epoch < spec.epochs and epoch < spec.freeze_epoch)
            improved = eligible and score > self.best_top1
            self.best_top1 = max(self.best_top1, score) if eligible else self.best_top1
            self.best_epoch = epoch + 1 if improved else self.best_epoch
            self._save(epoch + 1, row, improved)
            self.log(epoch_line(row, self.spec.target_flops))
        if budgeted:
            self.calibration = self._calibrate_best()
        last = self.history[-1] if self.history else {}
        return Summary(
            run_dir=str(self.run_dir) if self.run_dir else None,
            mode=spec.mode,
            r=spec.r,
            epochs=spec.epochs,
            best_top1=self.best_top1,
            test_top1=last.get("test_top1", math.nan),
            flops_reduction_pct=last.get("flops_reduction_pct"),
            flops_reduction_with_heads_pct=last.get("flops_reduction_with_heads_pct"),
            estimate=spec.estimate,
            selected_on="val" if self.val_loader is not None else "test",
            calibration=self.calibration,
            history=list(self.history),
        )

    def _validate(self, epoch: int) -> dict:
        """The epoch's held-out (val) and test figures; per-layer statistics go to layers.csv."""
        row: dict[str, Any] = {}
        if self.val_loader is not None:
            val, stats = validate(self.model, self.val_loader, self.device, self.target, self.dist, self.show, "val")
            row["val_top1"] = val.test_top1
            if stats is not None:
                row["val_flops_reduction_pct"] = val.flops_reduction_with_heads_pct
                self.layer_history += layer_rows(epoch, "val", stats)
        test, stats = validate(self.model, self.test_loader, self.device, self.target, self.dist, self.show)
        row |= {k: v for k, v in asdict(test).items() if v is not None}
        self.layer_history += layer_rows(epoch, "test", stats)
        return row

    def _calibrate(self, when: str) -> Calibration:
        """Calibrate the heads to --target-flops on the held-out training images (never the test split)."""
        cfg = self.spec.config
        images = self.val_loader
        if images is None:
            self.log("[yellow]warning:[/yellow] --val-fraction 0: calibrating on training images (none are held out)")
            images = make_loader(runtime.dataset(cfg, "train"), cfg.batch_size, workers=cfg.workers)
        try:
            result = calibrate(self.model, images, self.device, self.spec.target_flops, show=self.show)
        except CalibrationError as exc:
            raise BadInput(str(exc)) from None
        self.dist.sync_buffers(self.model)  # every rank applies rank 0's offsets
        self.log(
            f"calibrated ({when}) to {result.target_pct:g}% on {result.images} held-out images: "
            f"{result.raw_pct:.2f}% → {result.reached_pct:.2f}% FLOPs ↓ (per-layer keep rates of r' = {result.ratio:.4f})"
        )
        return result

    def _calibrate_best(self) -> dict:
        """--target-flops: recalibrate best.pt's heads to the budget on held-out training images, report the
        test split for the raw heads (no offsets), as trained, and calibrated, and save the calibrated
        best.pt (last.pt keeps the heads as trained)."""
        if self.dist.is_main and self.run_dir is not None:
            state = ckpt.load_checkpoint(self.run_dir / BEST_FILE)["model"]
            ckpt.load_weights(self.model, state, self.run_dir / BEST_FILE, "best.pt")
        for tensor in [*self.model.parameters(), *self.model.buffers()]:  # every rank needs best.pt
            if self.dist.enabled:
                torch_dist.broadcast(tensor.data, src=0)
        test = functools.partial(validate, self.model, self.test_loader, self.device, self.target, self.dist, self.show)
        record, raw_stats, stats = before_and_after(self.model, lambda label: test(label=label), lambda: self._calibrate("best.pt"))
        record |= {
            "split": "val" if self.val_loader is not None else "train",
            "calibrated_at_freeze": self.spec.freeze_epoch < self.spec.epochs,
            "best_epoch": self.best_epoch,
        }
        self.layer_history += layer_rows(self.spec.epochs, "best-raw", raw_stats) + layer_rows(self.spec.epochs, "best-calibrated", stats)
        if self.dist.is_main and self.run_dir is not None:
            meta = {**self.meta, "epoch": self.spec.epochs, "test_top1": record["test_top1_calibrated"], "calibration": record}
            ckpt.save_checkpoint(self.run_dir / BEST_FILE, self.model, meta)
            text = pd.DataFrame(self.layer_history).to_csv(index=False).encode()
            ckpt.atomic_write_bytes(self.run_dir / LAYERS_FILE, lambda f: f.write(text))
        self.log(
            "best.pt on the test split (FLOPs ↓ / top-1): "
            + ", ".join(f"{what} {record[f'test_reduction_{key}_pct']:.2f}% / {record[f'test_top1_{key}']:.2f}%"
                        for what, key in (("raw heads", "raw"), ("as trained", "trained"), ("calibrated", "calibrated")))
        )
        return record


def epoch_line(row: dict, target_flops: float | None = None) -> str:
    text = f"epoch {row['epoch']}: loss {row['task_loss']:.4f}, train {row['train_top1']:.2f}%"
    if "val_top1" in row:
        text += f", val {row['val_top1']:.2f}%"
    text += f", test {row['test_top1']:.2f}%"
    if "head_acc" in row:
        text += f", heads {row['head_acc']:.2f}% right, FLOPs ↓ {row['flops_reduction_with_heads_pct']:.2f}% (test)"
        if "val_flops_reduction_pct" in row:
            text += f" {row['val_flops_reduction_pct']:.2f}% (held-out)"
        if target_flops is not None:
            text += f" vs target {target_flops:g}%"
        text += " (heads frozen)" if row["heads_frozen"] else f", head loss {row['head_loss']:.4f}"
    return text


def prepare_dir(spec: RunSpec, out: str | None) -> Path:
    """The new run's directory (not created yet); refuses one that already holds a run."""
    run_dir = Path(out) if out else spec.default_dir()
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise BadInput(f"{run_dir} already exists and is not empty (use --resume {run_dir} to continue it)")
    return run_dir


def train(spec: RunSpec, out: str | None = None, resume: str | None = None) -> Summary:
    """Train a new run (``spec`` into ``out`` or the default directory) or continue ``resume``.

    Call on every rank under torchrun; only rank 0 writes. With ``resume``, ``spec`` is the run's own
    spec (see :func:`read_spec`) with the wanted epoch count.
    """
    spec.check()
    # Checked on every rank before the process group forms (a rendezvous), so no rank sees rank 0's mkdir.
    run_dir = Path(resume) if resume else (prepare_dir(spec, out) if out else None)
    dist, device = start_processes(spec.config.device)
    try:
        run = Run(spec, run_dir, dist, device, resume=resume is not None)
        if dist.is_main:
            # The default name carries r, which a --target-flops search chooses while the run is built.
            run.run_dir = run.run_dir or prepare_dir(spec, None)
            run.run_dir.mkdir(parents=True, exist_ok=True)
            ckpt.atomic_write_json(run.run_dir / CONFIG_FILE, spec.to_dict())
        dist.barrier()
        return run.fit()
    finally:
        stop_processes(dist)
