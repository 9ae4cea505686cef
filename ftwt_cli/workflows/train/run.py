"""One training run: the orchestration of epochs, validation, best.pt selection and checkpoints, in the
style of torchvision's references/classification. What differs between run kinds lives in the kind
(:mod:`.kinds`: model, targets, meta), its objective (:mod:`.objectives`) and its hooks (:mod:`.hooks`).

A run lives in one directory::

    config.json   the resolved run spec (kind, configuration, r and the --target-flops record)
    metrics.csv   one row per epoch (regenerated from the history kept in last.pt)
    layers.csv    per epoch, split and gated layer: the heads' masks against the ground truth
    last.pt       weights + train_state (optimizers, schedulers, epoch, best top-1, history)
    best.pt       weights of the epoch with the best held-out (or test) top-1
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DistributedSampler

from ftwt_cli.algorithms.evaluation import validate
from ftwt_cli.console import console, progress_bar
from ftwt_cli.core.flops import FlopsCounter
from ftwt_cli.core.masks import MaskStats
from ftwt_cli.io import checkpoint as ckpt
from ftwt_cli.io import loading
from ftwt_cli.io.data import make_loader
from ftwt_cli.workflows.train.kinds import Built, RunKind
from ftwt_cli.workflows.train.objectives import NonFiniteLoss, train_step
from ftwt_cli.workflows.train.processes import Distributed, seed_epoch, shard, wrap_for_processes
from ftwt_cli.workflows.train.records import Summary, epoch_line, layer_rows, write_table
from ftwt_cli.workflows.train.spec import BEST_FILE, LAST_FILE, LAYERS_FILE, METRICS_FILE, RunSpec
from ftwt_cli.workflows.train.warmup import warm_up_heads, warm_up_on_targets


class Run:
    """A built run (model, objective, optimizers, data, hooks); :meth:`fit` trains it."""

    def __init__(
        self, spec: RunSpec, kind: RunKind, built: Built, run_dir: Path | None, dist: Distributed,
        device: torch.device, resume: bool,
    ) -> None:  # fmt: skip
        self.spec, self.run_dir, self.dist, self.device = spec, run_dir, dist, device
        cfg = spec.config
        self.start_epoch, self.best_top1, self.history, self.layer_history = 0, -math.inf, [], []
        self.calibration: dict | None = None
        self.best_epoch: int | None = None
        self.model, self.target = built.model, built.target
        self.meta = {**built.meta, "best_selected_on": spec.selected_on}  # every checkpoint says which split chose best.pt
        self.objective = kind.objective(spec, built)
        self.hooks = kind.hooks(spec)
        self.optimizers = self.objective.optimizers(self.model)
        self.schedulers = {
            name: torch.optim.lr_scheduler.MultiStepLR(opt, milestones=spec.milestones, gamma=cfg.gamma)
            for name, opt in self.optimizers.items()
        }
        self._build_data()
        if resume:
            self._restore(ckpt.load_checkpoint(run_dir / LAST_FILE)["train_state"])
        elif spec.gated and cfg.head_init == "ones":
            steps = warm_up_heads(self.model, self.train_loader, device, cfg.head_lr, cfg.momentum)
            self.log(f"head warm-up: {steps} head-only steps until every channel is kept")
        if not resume and spec.gated and cfg.head_warmup > 0:
            seed_epoch(cfg.seed, -2, dist.rank)
            warm_up_on_targets(
                self.model, self.train_loader, device, self.target, cfg.head_warmup, cfg.head_lr, cfg.momentum, self.show
            )  # fmt: skip
        self.model, self.net = wrap_for_processes(self.model, dist, device, cfg.sync_bn)
        self.log(
            f"batch size {cfg.batch_size} per process × {dist.world_size} process(es) = {cfg.batch_size * dist.world_size} "
            f"images per step{' (SyncBatchNorm)' if cfg.sync_bn and dist.enabled else ''}"
        )

    # -- setup -------------------------------------------------------------------------------------

    def _build_data(self) -> None:
        cfg, dist = self.spec.config, self.dist
        train_set, val_set = loading.training_splits(cfg)
        test_set = loading.dataset(cfg, "test")
        self.sampler = (
            DistributedSampler(train_set, dist.world_size, dist.rank, shuffle=True, seed=cfg.seed) if dist.enabled else None
        )
        self.train_loader = make_loader(
            train_set, cfg.batch_size, shuffle=True, workers=cfg.workers, seed=cfg.seed, sampler=self.sampler
        )
        self.test_loader = make_loader(shard(test_set, dist), cfg.batch_size, workers=cfg.workers)
        self.val_loader = make_loader(shard(val_set, dist), cfg.batch_size, workers=cfg.workers) if val_set else None

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

    @property
    def all_sum(self):
        """Sum across processes (None in a single process: nothing to reduce, distinct masks tracked)."""
        return self.dist.all_sum if self.dist.enabled else None

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
        write_table(self.run_dir / METRICS_FILE, self.history)
        write_table(self.run_dir / LAYERS_FILE, self.layer_history)

    # -- training ----------------------------------------------------------------------------------

    def train_epoch(self, epoch: int) -> dict:
        spec, cfg, gated = self.spec, self.spec.config, self.spec.gated
        seed_epoch(cfg.seed, epoch, self.dist.rank)
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
        else:
            self.train_loader.generator.manual_seed(cfg.seed + epoch)
        self.net.train()
        loss = self.objective.begin_epoch(self.model, epoch)
        stepping = self.objective.stepping(self.optimizers, epoch)
        stats = MaskStats(FlopsCounter(self.model.graph), [b.conv for b in self.model.graph.blocks], track_masks=False) if gated else None
        task_sum = head_sum = 0.0
        correct = seen = 0
        with self.show(f"epoch {epoch + 1}/{spec.epochs}", len(self.train_loader)) as advance:
            for images, labels in self.train_loader:
                images, labels = images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
                task, heads, right, count = train_step(self.net, self.model, images, labels, loss, stepping, self.dist, stats)
                task_sum, head_sum, correct, seen = task_sum + task, head_sum + heads, correct + right, seen + count
                info = f"loss {task_sum / seen:.3f} top-1 {100 * correct / seen:.1f}"
                advance(info=info + (f" heads {head_sum / seen:.3f}" if gated else ""))
        row: dict[str, Any] = {"epoch": epoch + 1, "lr": self.optimizers["backbone"].param_groups[0]["lr"]}
        if gated:
            row["head_lr"] = self.optimizers["heads"].param_groups[0]["lr"]
            row["heads_frozen"] = self.objective.heads_frozen(epoch)
        row |= {"task_loss": task_sum / seen, "train_top1": 100.0 * correct / seen}
        if gated:
            row["head_loss"] = head_sum / seen
            stats.reduce(self.dist.all_sum)
            row["train_flops_reduction_pct"] = stats.reduction_pct(with_heads=True)
            self.layer_history += layer_rows(epoch + 1, "train", stats)
        return row

    def fit(self) -> Summary:
        spec = self.spec
        for epoch in range(self.start_epoch, spec.epochs):
            for hook in self.hooks:
                hook.on_epoch_start(self, epoch)
            row = self.train_epoch(epoch)
            check_finite(self.model, epoch + 1)
            self.dist.sync_buffers(self.model)
            for scheduler in self.schedulers.values():
                scheduler.step()
            row |= self._validate(epoch + 1)
            self.history.append(row)
            # best.pt is chosen on held-out training images when there are some, never on the test split then
            score = row.get("val_top1", row["test_top1"])
            eligible = all(hook.eligible(self, epoch) for hook in self.hooks)
            improved = eligible and score > self.best_top1
            self.best_top1 = max(self.best_top1, score) if eligible else self.best_top1
            self.best_epoch = epoch + 1 if improved else self.best_epoch
            self._save(epoch + 1, row, improved)
            self.log(epoch_line(row, spec.target_flops))
        for hook in self.hooks:
            hook.on_fit_end(self)
        last = self.history[-1] if self.history else {}
        return Summary(
            run_dir=str(self.run_dir) if self.run_dir else None,
            mode=spec.mode,
            r=spec.r,
            epochs=spec.epochs,
            best_top1=self.best_top1,
            test_top1=last.get("test_top1", math.nan),
            flops_reduction_pct=last.get("flops_reduction_pct", (spec.static or {}).get("reduction_pct")),
            flops_reduction_with_heads_pct=last.get("flops_reduction_with_heads_pct"),
            estimate=spec.estimate,
            selected_on="val" if self.val_loader is not None else "test",
            calibration=self.calibration,
            history=list(self.history),
            best_epoch=self.best_epoch,
            best_test_top1=self._best_test_top1(),
        )

    def _best_test_top1(self) -> float | None:
        """best.pt's test top-1: calibrated when calibration delivered it, else its epoch's."""
        if self.calibration is not None:
            return self.calibration["test_top1_calibrated"]
        if self.best_epoch is None or not self.history:
            return None
        row = next((r for r in self.history if r.get("epoch") == self.best_epoch), None)
        return row["test_top1"] if row else None

    def _validate(self, epoch: int) -> dict:
        """The epoch's held-out (val) and test figures; per-layer statistics go to layers.csv."""
        row: dict[str, Any] = {}
        if self.val_loader is not None:
            val, stats = validate(self.model, self.val_loader, self.device, self.target, self.all_sum, self.show, "val")
            row["val_top1"] = val.test_top1
            if stats is not None:
                row["val_flops_reduction_pct"] = val.flops_reduction_with_heads_pct
                self.layer_history += layer_rows(epoch, "val", stats)
        test, stats = validate(self.model, self.test_loader, self.device, self.target, self.all_sum, self.show)
        row |= {k: v for k, v in asdict(test).items() if v is not None}
        self.layer_history += layer_rows(epoch, "test", stats)
        return row


def check_finite(model, epoch: int) -> None:
    """A finite last loss does not make finite weights (the last step can still overflow them): stop
    before non-finite weights are saved, keeping the last good checkpoint."""
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise NonFiniteLoss(f"non-finite weights after epoch {epoch} ({name})")
