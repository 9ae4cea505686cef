"""What a run minimises, per run kind: the loss, which parameters train with which optimizer, and when
the heads freeze; plus the one SGD step every kind shares.

* :class:`CrossEntropyObjective` (dense, static): cross-entropy; one SGD over every parameter.
* :class:`MaskObjective` (ftwt, signature): cross-entropy + the mean over blocks of the heads' BCE
  towards their targets; backbone and heads have their own SGD; from the freeze epoch the head loss
  weight is 0, the heads stop stepping and leave the backbone's graph.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ftwt_cli.algorithms.outputs import TrainingOutputs, training_outputs
from ftwt_cli.core.gating import FTWTModel, head_loss, truth_masks
from ftwt_cli.core.masks import MaskStats
from ftwt_cli.core.targets import Target
from ftwt_cli.workflows.train.processes import Distributed
from ftwt_cli.workflows.train.spec import RunSpec


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; the run stops and keeps its last good checkpoint."""


@dataclass
class Distillation:
    """Soft targets from a frozen teacher (the dense model a run starts from): the task loss becomes
    (1 − w)·CE + w·T²·KL(teacher_T ‖ student_T), softmaxes at temperature T (Hinton et al., 2015)."""

    teacher: nn.Module
    temperature: float
    weight: float

    def __call__(self, cross_entropy: torch.Tensor, logits: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            soft = (training_outputs(self.teacher(images)).logits / self.temperature).log_softmax(dim=1)
        kl = F.kl_div((logits / self.temperature).log_softmax(dim=1), soft, reduction="batchmean", log_target=True)
        return (1.0 - self.weight) * cross_entropy + self.weight * self.temperature**2 * kl


@dataclass
class Loss:
    """One step's loss: cross-entropy (distilled from a teacher when given), plus the heads' loss
    towards ``target`` for FTWT models."""

    target: Target | Sequence[Target] | None = None
    head_weight: float = 1.0
    distillation: Distillation | None = None

    def __call__(
        self, model: nn.Module, outputs: torch.Tensor | TrainingOutputs, labels: torch.Tensor, images: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor] | None]:
        """(task loss, head loss, ground-truth masks per block or None for a dense model); ``images`` are
        what the teacher sees (the same batch). Auxiliary classifiers (GoogLeNet, Inception) add their
        weighted cross-entropy to the task loss (:mod:`ftwt_cli.algorithms.outputs`)."""
        if isinstance(outputs, torch.Tensor):
            outputs = TrainingOutputs(outputs)
        logits = outputs.logits
        task = F.cross_entropy(logits, labels)
        if self.distillation is not None:
            task = self.distillation(task, logits, images)
        task = outputs.loss(labels, task)
        if self.target is None:
            return task, torch.zeros((), device=logits.device), None
        records = model.records()
        truth = truth_masks(records, self.target)
        return task, head_loss(records, truth), truth


class CrossEntropyObjective:
    """Dense and static runs: cross-entropy, every parameter in one SGD (lr, momentum, weight decay)."""

    gated = False

    def __init__(self, spec: RunSpec, distillation: Distillation | None = None) -> None:
        self.spec = spec
        self.distillation = distillation

    def optimizers(self, model: nn.Module) -> dict[str, torch.optim.SGD]:
        cfg = self.spec.config
        return {"backbone": torch.optim.SGD(model.parameters(), lr=self.spec.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)}

    def heads_frozen(self, epoch: int) -> bool:
        return False

    def begin_epoch(self, model: nn.Module, epoch: int) -> Loss:
        """Set the model up for ``epoch`` (after ``net.train()``) and return the epoch's step loss."""
        return Loss(distillation=self.distillation)

    def stepping(self, optimizers: dict[str, torch.optim.Optimizer], epoch: int) -> list[torch.optim.Optimizer]:
        """The optimizers that step in ``epoch``."""
        return list(optimizers.values())


class MaskObjective(CrossEntropyObjective):
    """FTWT runs: cross-entropy + head BCE towards ``target``; the heads freeze at the spec's freeze epoch."""

    gated = True

    def __init__(self, spec: RunSpec, target: Target | Sequence[Target], distillation: Distillation | None = None) -> None:
        super().__init__(spec, distillation)
        self.target = target

    def optimizers(self, model: FTWTModel) -> dict[str, torch.optim.SGD]:
        """Backbone SGD (lr, momentum, weight decay) and the heads' SGD (head_lr, no decay)."""
        cfg = self.spec.config
        return {
            "backbone": torch.optim.SGD(
                model.backbone_parameters(), lr=self.spec.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
            ),
            "heads": torch.optim.SGD(model.head_parameters(), lr=cfg.head_lr, momentum=cfg.momentum, weight_decay=0.0),
        }

    def heads_frozen(self, epoch: int) -> bool:
        return epoch >= self.spec.freeze_epoch

    def begin_epoch(self, model: FTWTModel, epoch: int) -> Loss:
        frozen = self.heads_frozen(epoch)
        detach_frozen_heads(model, frozen, self.spec.config.mode)
        if frozen:
            for head in model.heads():
                head.eval()  # frozen heads keep their norm statistics, so their calibrated thresholds hold
        return Loss(self.target, head_weight=0.0 if frozen else 1.0, distillation=self.distillation)

    def stepping(self, optimizers: dict[str, torch.optim.Optimizer], epoch: int) -> list[torch.optim.Optimizer]:
        frozen = self.heads_frozen(epoch)
        return [opt for name, opt in optimizers.items() if not (name == "heads" and frozen)]


def detach_frozen_heads(model: FTWTModel, frozen: bool, mode: str) -> None:
    """Frozen heads leave the backbone's graph: joint mode's straight-through path and undetached head
    input would otherwise keep sending the task loss's gradient through them; their masks become
    constants, exactly as in decoupled training."""
    model.configure(decoupled=frozen or mode == "decoupled")


def train_step(
    net: nn.Module,
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    loss: Loss,
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
    outputs = training_outputs(net(images))
    logits = outputs.logits
    task, heads, truth = loss(model, outputs, labels, images)
    total = task + loss.head_weight * heads
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
    total.backward()
    for optimizer in optimizers:
        optimizer.step()
    return task_sum, head_sum, int(correct), int(count)
