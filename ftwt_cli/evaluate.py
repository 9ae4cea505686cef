"""Evaluate dense and FTWT checkpoints: accuracy, measured FLOPs, Brier score under shift, mask analysis.

One data pass per perturbation serves every model: each batch is perturbed once (on [0, 1] pixels),
normalised, and fed to all models, so a ``--compare`` table is computed on identical inputs by
construction. The clean pass also records the masks the heads actually applied, from which come the
measured FLOPs, per-layer keep ratios, head accuracy against the ground truth at the run's r, and the
paper's Figure 4 statistics (distinct masks and always-kept "core" filters per layer).

A dense model is treated as a model whose masks keep every channel: 0 % reduction, one cluster per layer.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms.v2 import functional as TF

from ftwt_cli.console import progress_bar
from ftwt_cli.flops import FlopsCounter
from ftwt_cli.gating import FTWTModel, HeadSpec, Target, make_target, truth_masks
from ftwt_cli.metrics import DistinctRows, LayerStats, MaskStats  # noqa: F401 - re-exported
from ftwt_cli.graph import ModelGraph, analyze
from ftwt_cli.runtime import LoadedModel

#: The paper's Table 3 grids (σ on [0, 1] pixels).
BLUR_SIGMAS = (0.5, 0.7, 0.9, 1.09, 1.27, 1.45)
NOISE_SIGMAS = (0.0, 0.02, 0.05, 0.11, 0.14, 0.20)
PERTURBATION_KINDS = ("clean", "blur", "noise")


# ---------------------------------------------------------------------------------------------------
# Perturbations


def blur_kernel_size(sigma: float) -> int:
    """Odd kernel covering ±3σ (at least 3 wide), where the Gaussian has lost all but 0.3 % of its mass."""
    return 2 * max(1, math.ceil(3 * sigma)) + 1


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    if sigma == 0:
        return images
    size = blur_kernel_size(sigma)
    return TF.gaussian_blur(images, [size, size], [sigma, sigma])


def gaussian_noise(images: torch.Tensor, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """images + σ·N(0, 1), clipped back to [0, 1]; drawn on the CPU so every device sees the same noise."""
    if sigma == 0:
        return images
    noise = torch.randn(images.shape, generator=generator, dtype=images.dtype)
    return (images + sigma * noise.to(images.device)).clamp_(0.0, 1.0)


def noise_generator(seed: int, batch_index: int) -> torch.Generator:
    """The noise of a batch depends only on (seed, batch index): reproducible and the same for all models."""
    return torch.Generator().manual_seed(seed * 1_000_003 + batch_index)


@dataclass(frozen=True)
class Perturbation:
    kind: str  # one of PERTURBATION_KINDS
    sigma: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in PERTURBATION_KINDS:
            raise ValueError(f"unknown perturbation {self.kind!r}")
        if not self.sigma >= 0:
            raise ValueError(f"sigma must be >= 0, got {self.sigma}")

    @property
    def is_identity(self) -> bool:
        return self.kind == "clean" or self.sigma == 0

    @property
    def label(self) -> str:
        return "clean" if self.kind == "clean" else f"{self.kind} σ={self.sigma:g}"

    def apply(self, images: torch.Tensor, seed: int, batch_index: int) -> torch.Tensor:
        """Perturb a batch of [0, 1] images."""
        if self.is_identity:
            return images
        if self.kind == "blur":
            return gaussian_blur(images, self.sigma)
        return gaussian_noise(images, self.sigma, noise_generator(seed, batch_index))


def perturbation_grid(blur_sigmas: Sequence[float], noise_sigmas: Sequence[float]) -> list[Perturbation]:
    return [Perturbation("blur", s) for s in blur_sigmas] + [Perturbation("noise", s) for s in noise_sigmas]


# ---------------------------------------------------------------------------------------------------
# Scores


def brier_scores(probabilities: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample multi-class Brier score Σ_k (p_k − y_k)², [N, K] × [N] → [N]."""
    onehot = F.one_hot(labels, probabilities.shape[1]).to(probabilities.dtype)
    return (probabilities - onehot).pow(2).sum(dim=1)


@dataclass
class Scores:
    samples: int
    top1: float  # percent
    top5: float  # percent (top-k with k = min(5, classes))
    brier: float


class ScoreAccumulator:
    def __init__(self) -> None:
        self.samples = 0
        self.correct1 = 0
        self.correct5 = 0
        self.brier_sum = 0.0

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        k = min(5, logits.shape[1])
        hits = logits.topk(k, dim=1).indices == labels[:, None]
        self.correct1 += int(hits[:, 0].sum())
        self.correct5 += int(hits.any(dim=1).sum())
        self.brier_sum += float(brier_scores(logits.float().softmax(dim=1), labels).sum())
        self.samples += labels.shape[0]

    def result(self) -> Scores:
        n = max(self.samples, 1)
        return Scores(self.samples, 100.0 * self.correct1 / n, 100.0 * self.correct5 / n, self.brier_sum / n)


# ---------------------------------------------------------------------------------------------------
# Mask analysis


# Mask statistics live in ftwt_cli.metrics (shared with training); the old names stay importable.
MaskAccumulator = MaskStats


# ---------------------------------------------------------------------------------------------------
# Models under evaluation


def describe(meta: dict) -> str:
    """A short label for tables and legends: ``dense``, or ``ftwt r=0.9`` plus every choice that differs
    from the paper's defaults (target rule, joint mode, head options) and ``calibrated`` (Table 3 columns)."""
    if meta.get("kind") != "ftwt":
        return str(meta.get("kind", "dense"))
    parts = [f"ftwt r={meta.get('r'):.4g}" if meta.get("r") is not None else "ftwt"]
    if meta.get("target", "mass") != "mass":
        parts.append(str(meta["target"]))
    if meta.get("mode", "decoupled") != "decoupled":
        parts.append(str(meta["mode"]))
    parts.append(HeadSpec.from_meta(meta).label)
    if meta.get("calibration"):
        parts.append("calibrated")
    return " ".join(p for p in parts if p)


class EvaluatedModel:
    """A loaded checkpoint ready for no-grad passes: returns logits and the masks it applied."""

    def __init__(self, loaded: LoadedModel, label: str, device: torch.device) -> None:
        self.loaded = loaded
        self.label = label
        self.model: nn.Module = loaded.model.to(device).eval()
        self.target: Target | None = None
        if isinstance(self.model, FTWTModel):
            self.graph: ModelGraph = self.model.graph
            self.target = make_target(loaded.meta.get("target", "mass"), float(loaded.meta["r"]))
            self.model.configure(mask_source="predicted", record=True, target=self.target)
        else:
            self.graph = analyze(self.model, tuple(loaded.meta["input_size"]))
        self.counter = FlopsCounter(self.graph)
        self.block_names = [b.conv for b in self.graph.blocks]

    @torch.no_grad()
    def forward(
        self, images: torch.Tensor, analyse: bool = True
    ) -> tuple[torch.Tensor, list[torch.Tensor] | None, list[torch.Tensor] | None]:
        """Logits, applied masks per block (all-True for dense) and ground-truth masks (None for dense).

        With ``analyse=False`` (perturbed passes score logits only) nothing is recorded and both mask
        lists are None, so those passes cost a plain masked forward.
        """
        if isinstance(self.model, FTWTModel):
            self.model.configure(record=analyse)
        logits = self.model(images)
        if not analyse:
            return logits, None, None
        if self.target is None:
            n = images.shape[0]
            ones = [torch.ones(n, b.out_channels, dtype=torch.bool, device=images.device) for b in self.graph.blocks]
            return logits, ones, None
        records = self.model.records()
        masks = [rec.mask > 0 for rec in records]
        truth = truth_masks(records, self.target)
        return logits, masks, truth

    def head_logits(self) -> list[torch.Tensor] | None:
        """The heads' logits of the last analysed forward pass (None for a dense model)."""
        return [rec.logits for rec in self.model.records()] if self.target is not None else None

    def release(self) -> nn.Module:
        """Stop recording and hand back the model in eval mode on the CPU (for latency measurements)."""
        if isinstance(self.model, FTWTModel):
            self.model.configure(record=False)
        return self.model.cpu().eval()


# ---------------------------------------------------------------------------------------------------
# Reports


@dataclass
class BrierPoint:
    perturbation: str
    sigma: float
    brier: float
    top1: float


@dataclass
class ModelReport:
    label: str
    checkpoint: str | None
    kind: str
    r: float | None
    target: str | None
    head_softmax: bool | None
    head_pool: str | None
    head_norm: bool | None
    samples: int
    top1: float
    top5: float
    brier_clean: float
    dense_macs: int
    head_macs: int
    mean_macs: float
    flops_reduction_pct: float
    flops_reduction_with_heads_pct: float | None  # None for dense: it has no heads
    layers: list[LayerStats]
    estimate: dict | None  # estimated (before training) vs reached reduction, when the run recorded one
    brier: list[BrierPoint] = field(default_factory=list)
    latency: dict | None = None

    def to_dict(self) -> dict:
        doc = asdict(self)
        if doc["latency"] is None:
            del doc["latency"]
        return doc


def estimate_vs_reached(meta: dict, reached_pct: float, reached_with_heads_pct: float) -> dict | None:
    """The paper's Table 4 row, for runs trained with a FLOPs target: the target, the reduction the estimate
    promised before training, and the one measured here (with and without the heads' own MACs), plus what
    calibration aimed at when the checkpoint was calibrated."""
    est = meta.get("estimate")
    calibration = meta.get("calibration") or {}
    if not isinstance(est, dict) or est.get("estimated_reduction_pct") is None:
        if not calibration:
            return None
        est = {}
    estimated = est.get("estimated_reduction_pct")
    target = est.get("target", calibration.get("target_pct"))
    return {
        "target": target,
        "chosen_r": est.get("chosen_r"),
        "estimated_reduction_pct": estimated,
        "reached_reduction_pct": reached_pct,
        "reached_with_heads_pct": reached_with_heads_pct,
        "difference_pct": reached_with_heads_pct - target if target is not None else None,
        "calibrated": bool(calibration),
    }


def _report(model: EvaluatedModel, scores: Scores, masks: MaskStats) -> ModelReport:
    meta = model.loaded.meta
    ftwt = model.target is not None
    counter = model.counter
    reduction = float(counter.reduction_pct(masks.mean_macs))
    return ModelReport(
        label=model.label,
        checkpoint=model.loaded.path,
        kind=meta.get("kind", "dense"),
        r=meta.get("r") if ftwt else None,
        target=meta.get("target", "mass") if ftwt else None,
        head_softmax=HeadSpec.from_meta(meta).softmax if ftwt else None,
        head_pool=HeadSpec.from_meta(meta).pool if ftwt else None,
        head_norm=HeadSpec.from_meta(meta).norm if ftwt else None,
        samples=scores.samples,
        top1=scores.top1,
        top5=scores.top5,
        brier_clean=scores.brier,
        dense_macs=counter.dense_macs,
        head_macs=counter.head_macs if ftwt else 0,
        mean_macs=masks.mean_macs,
        flops_reduction_pct=reduction,
        flops_reduction_with_heads_pct=float(counter.reduction_pct(masks.mean_macs, with_heads=True)) if ftwt else None,
        layers=masks.layers(),
        estimate=estimate_vs_reached(meta, reduction, float(counter.reduction_pct(masks.mean_macs, with_heads=True)))
        if ftwt
        else None,
    )


# ---------------------------------------------------------------------------------------------------
# Passes


@dataclass
class Normalizer:
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return TF.normalize(images, list(self.mean), list(self.std))


def _pass(
    models: list[EvaluatedModel],
    loader: Iterable,
    perturbation: Perturbation,
    normalize: Normalizer,
    device: torch.device,
    seed: int,
    analyse: bool,
) -> tuple[list[ScoreAccumulator], list[MaskStats]]:
    scores = [ScoreAccumulator() for _ in models]
    masks = [MaskStats(m.counter, m.block_names) for m in models] if analyse else []
    total = len(loader) if hasattr(loader, "__len__") else None
    with torch.no_grad(), progress_bar(f"eval {perturbation.label}", total) as advance:
        for batch_index, (images, labels) in enumerate(loader):
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            inputs = normalize(perturbation.apply(images, seed, batch_index))
            for i, model in enumerate(models):
                logits, applied, truth = model.forward(inputs, analyse)
                scores[i].update(logits, labels)
                if analyse:
                    masks[i].update(applied, truth, model.head_logits())
            advance()
    return scores, masks


def evaluate(
    models: list[EvaluatedModel],
    loader: Iterable,
    normalize: Normalizer,
    device: torch.device,
    perturbations: Sequence[Perturbation] = (),
    seed: int = 0,
) -> list[ModelReport]:
    """A clean pass with mask analysis, then one pass per perturbation; one report per model."""
    clean_scores, clean_masks = _pass(models, loader, Perturbation("clean"), normalize, device, seed, analyse=True)
    reports = [_report(m, s.result(), a) for m, s, a in zip(models, clean_scores, clean_masks)]
    for perturbation in perturbations:
        if perturbation.is_identity:  # σ = 0 is the clean input exactly: reuse the clean pass
            results = [s.result() for s in clean_scores]
        else:
            results = [s.result() for s in _pass(models, loader, perturbation, normalize, device, seed, False)[0]]
        for report, result in zip(reports, results):
            report.brier.append(BrierPoint(perturbation.kind, perturbation.sigma, result.brier, result.top1))
    return reports


def first_images(loader: Iterable, count: int, normalize: Normalizer) -> torch.Tensor:
    """The first ``count`` clean test images, normalised, as one CPU tensor [N, 3, H, W]."""
    batches, have = [], 0
    for images, _ in loader:
        batches.append(images[: count - have])
        have += batches[-1].shape[0]
        if have >= count:
            break
    return normalize(torch.cat(batches))


def measure_latency(model: EvaluatedModel, images: torch.Tensor, threads: int, cache_mb: float) -> dict:
    """CPU latency of dense vs sparse-engine inference (the engine lives in ftwt_cli.latency, issue 5)."""
    from ftwt_cli.latency import latency_report

    return latency_report(model.release(), images, threads=threads, cache_mb=cache_mb)


def unique_labels(labels: list[str], paths: list[str | None]) -> list[str]:
    """Disambiguate equal labels with the checkpoint's folder and file name, then by position."""
    out: list[str] = []
    for label, path in zip(labels, paths):
        if labels.count(label) > 1 and path:
            label = f"{label} ({Path(path).parent.name}/{Path(path).name})"
        out.append(f"{label} #{len(out) + 1}" if label in out else label)
    return out
