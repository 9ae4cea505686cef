"""``ftwt eval``: dense, FTWT and static checkpoints side by side on identical inputs — accuracy, measured
FLOPs, mask analysis, the Brier score under blur and noise, and batch-1 latency against the engine.

One clean pass with mask analysis serves every model, then one pass per perturbation (each batch is
perturbed once on [0, 1] pixels, normalised, and fed to all models), all through the one evaluation
pass of :mod:`ftwt_cli.algorithms.evaluation`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ftwt_cli.algorithms.evaluation import Evaluand, Scores, evaluation_pass, first_images
from ftwt_cli.algorithms.perturb import Normalizer, Perturbation
from ftwt_cli.core.heads import HeadSpec
from ftwt_cli.core.masks import LayerStats, MaskStats
from ftwt_cli.engine.latency import latency_report
from ftwt_cli.errors import BadInput
from ftwt_cli.io import loading, setting
from ftwt_cli.io.config import Config, resolve_device
from ftwt_cli.io.data import make_loader


@dataclass
class EvaluatedModel:
    """A loaded checkpoint under evaluation: its label for tables, its record, the evaluand."""

    loaded: loading.LoadedModel
    label: str
    evaluand: Evaluand

    @classmethod
    def of(cls, loaded: loading.LoadedModel, label: str, device: torch.device) -> EvaluatedModel:
        """``loaded`` on ``device``, judged against its checkpoint's own target rule."""
        return cls(loaded, label, Evaluand(loaded.model.to(device), loaded.target(), tuple(loaded.meta["input_size"])))


@dataclass
class LatencyOptions:
    samples: int = 200
    threads: int = 1
    batch_size: int | None = None  # also batched throughput at this batch size (--batch-size with --latency)


def describe(meta: dict) -> str:
    """A short label for tables and legends: ``dense``, or ``ftwt r=0.9`` plus every choice that differs
    from the paper's defaults (target rule, joint mode, head options) and ``calibrated`` (Table 3 columns)."""
    distilled = [f"kd T={meta['distill']:g}"] if meta.get("distill") else []
    if meta.get("kind") == "static":
        return " ".join([f"static-{meta.get('method', '?')}", *distilled])
    if meta.get("kind") != "ftwt":
        return str(meta.get("kind", "dense"))
    parts = [f"ftwt r={meta.get('r'):.4g}" if meta.get("r") is not None else "ftwt"]
    if meta.get("signature"):
        parts = ["ftwt signature"]
    if meta.get("target", "mass") != "mass":
        parts.append(str(meta["target"]))
    if meta.get("mode", "decoupled") != "decoupled":
        parts.append(str(meta["mode"]))
    parts.append(HeadSpec.from_meta(meta).label)
    if meta.get("gate", "all") != "all":
        parts.append(f"{meta['gate']}-gates")
    if meta.get("codebook"):
        parts.append(f"codebook-{meta['codebook']}")
    parts += distilled
    if meta.get("bn_reestimate"):
        parts.append("bn-reestimated")
    if meta.get("calibration"):
        parts.append("calibrated")
    return " ".join(p for p in parts if p)


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
    head: str | None  # the head variant (ftwt_cli.core.heads.HEADS)
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
    counter = model.evaluand.counter
    ftwt = model.evaluand.gated
    reduction = float(counter.reduction_pct(masks.mean_macs))
    if meta.get("dense_macs"):  # a static checkpoint: reduction against the unpruned architecture
        reduction = 100.0 * (1.0 - masks.mean_macs / float(meta["dense_macs"]))
    with_heads = float(counter.reduction_pct(masks.mean_macs, with_heads=True))
    head = HeadSpec.from_meta(meta) if ftwt else None
    return ModelReport(
        label=model.label,
        checkpoint=model.loaded.path,
        kind=meta.get("kind", "dense"),
        r=meta.get("r") if ftwt else None,
        target=meta.get("target", "mass") if ftwt else None,
        head=head.variant if head else None,
        head_softmax=head.softmax if head else None,
        head_pool=head.pool if head else None,
        head_norm=head.norm if head else None,
        samples=scores.samples,
        top1=scores.top1,
        top5=scores.top5,
        brier_clean=scores.brier,
        dense_macs=int(meta.get("dense_macs") or counter.dense_macs),
        head_macs=counter.head_macs if ftwt else 0,
        mean_macs=masks.mean_macs,
        flops_reduction_pct=reduction,
        flops_reduction_with_heads_pct=with_heads if ftwt else None,
        layers=masks.layers(),
        estimate=estimate_vs_reached(meta, reduction, with_heads) if ftwt else None,
    )


def evaluate(
    models: Sequence[EvaluatedModel],
    loader,
    normalize: Normalizer,
    device: torch.device,
    perturbations: Sequence[Perturbation] = (),
    seed: int = 0,
) -> list[ModelReport]:
    """A clean pass with mask analysis, then one pass per perturbation; one report per model."""
    evaluands = [m.evaluand for m in models]

    def perturbed(perturbation: Perturbation):
        return lambda images, batch_index: normalize(perturbation.apply(images, seed, batch_index))

    clean = Perturbation("clean")
    results = evaluation_pass(evaluands, loader, device, inputs=perturbed(clean), label=f"eval {clean.label}")
    reports = [_report(m, scores, masks) for m, (scores, masks) in zip(models, results)]
    for perturbation in perturbations:
        if perturbation.is_identity:  # σ = 0 is the clean input exactly: reuse the clean pass
            scores = [s for s, _ in results]
        else:
            passed = evaluation_pass(
                evaluands, loader, device, inputs=perturbed(perturbation), analyse=False, label=f"eval {perturbation.label}"
            )  # fmt: skip
            scores = [s for s, _ in passed]
        for report, score in zip(reports, scores):
            report.brier.append(BrierPoint(perturbation.kind, perturbation.sigma, score.brier, score.top1))
    return reports


def evaluation_config(cfg: Config, compare: Sequence[str] = ()) -> Config:
    """``cfg`` with the setting (data, input size) ``cfg.checkpoint`` was trained on where the user gave
    none; compared checkpoints must come from the same data set."""
    if cfg.checkpoint is None:
        raise BadInput(f"--checkpoint is required: {loading.how_to_get_weights(cfg)}")
    setting.same_data(cfg, list(compare))  # first: a refusal is the only line
    return setting.follow(cfg, cfg.checkpoint)


def evaluate_checkpoints(
    cfg: Config, compare: Sequence[str] = (), perturbations: Sequence[Perturbation] = (), latency: LatencyOptions | None = None
) -> list[ModelReport]:
    """``cfg.checkpoint`` and every ``compare`` checkpoint on the test split (same-seed inputs), clean and
    under ``perturbations``; with ``latency``, each model's batch-1 latency against the sparse engine.
    ``cfg`` is the :func:`evaluation_config` (the checkpoint's setting)."""
    if cfg.checkpoint is None:
        raise BadInput(f"--checkpoint is required: {loading.how_to_get_weights(cfg)}")
    device = resolve_device(cfg.device)
    loaded = [loading.load_model(cfg, path) for path in [cfg.checkpoint, *compare]]
    labels = unique_labels([describe(m.meta) for m in loaded], [m.path for m in loaded])
    models = [EvaluatedModel.of(m, label, device) for m, label in zip(loaded, labels)]
    loader = make_loader(loading.dataset(cfg, "test", normalize=False), cfg.batch_size, workers=cfg.workers)
    normalize = Normalizer(*loading.normalization(cfg))
    reports = evaluate(models, loader, normalize, device, perturbations, seed=cfg.seed)
    if latency is not None:
        images = first_images(loader, latency.samples, normalize)
        for model, report in zip(models, reports):
            report.latency = latency_report(
                model.evaluand.release(), images, threads=latency.threads,
                batch_sizes=[latency.batch_size] if latency.batch_size else (),
            )  # fmt: skip
    return reports


def unique_labels(labels: list[str], paths: list[str | None]) -> list[str]:
    """Disambiguate equal labels with the checkpoint's folder and file name, then by position."""
    out: list[str] = []
    for label, path in zip(labels, paths):
        if labels.count(label) > 1 and path:
            label = f"{label} ({Path(path).parent.name}/{Path(path).name})"
        out.append(f"{label} #{len(out) + 1}" if label in out else label)
    return out
