"""THE evaluation pass: one loop over batches that scores models and analyses their masks.

Training (every epoch, on the held-out and test splits), ``ftwt calibrate`` (before and after) and
``ftwt eval`` (clean and perturbed, several checkpoints on identical inputs) all call
:func:`evaluation_pass`. Per model it accumulates top-1, top-5 and the Brier score in one float64
tensor, and, when asked, the mask statistics (:class:`~ftwt_cli.core.masks.MaskStats`: the masks the
heads applied against the ground truth from each block's unmasked output, measured MACs, distinct
masks); a distributed run reduces both across processes with one all-reduce each.

A dense model is analysed as a model whose masks keep every channel: 0 % reduction, one mask per layer.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ftwt_cli.console import progress_bar
from ftwt_cli.core.flops import FlopsCounter
from ftwt_cli.core.gating import FTWTModel
from ftwt_cli.core.graph import ModelGraph, analyze
from ftwt_cli.core.masks import MaskStats
from ftwt_cli.core.targets import Target

#: Columns of a score accumulator: top-1 hits, top-5 hits, Brier sum, samples.
_TOP1, _TOP5, _BRIER, _SAMPLES = range(4)


def brier_scores(probabilities: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample multi-class Brier score Σ_k (p_k − y_k)², [N, K] × [N] → [N]."""
    onehot = F.one_hot(labels, probabilities.shape[1]).to(probabilities.dtype)
    return (probabilities - onehot).pow(2).sum(dim=1)


class Scores:
    """Top-1 / top-5 (percent, top-k with k = min(5, classes)) and mean Brier score of a pass."""

    def __init__(self, sums: torch.Tensor) -> None:
        top1, top5, brier, samples = sums.tolist()
        n = max(samples, 1)
        self.samples = int(samples)
        self.top1 = 100.0 * top1 / n
        self.top5 = 100.0 * top5 / n
        self.brier = brier / n


class ScoreAccumulator:
    """Streaming sums behind :class:`Scores`, kept on the logits' device (no host sync per batch)."""

    def __init__(self) -> None:
        self.sums = torch.zeros(4, dtype=torch.float64)

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        if self.sums.device != logits.device:
            self.sums = self.sums.to(logits.device)
        k = min(5, logits.shape[1])
        hits = logits.topk(k, dim=1).indices == labels[:, None]
        self.sums[_TOP1] += hits[:, 0].sum()
        self.sums[_TOP5] += hits.any(dim=1).sum()
        self.sums[_BRIER] += brier_scores(logits.float().softmax(dim=1), labels).sum()
        self.sums[_SAMPLES] += labels.shape[0]

    def result(self, all_sum: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Scores:
        return Scores(all_sum(self.sums) if all_sum is not None else self.sums)


class Evaluand:
    """A model under evaluation, in eval mode: it returns logits and, when analysed, the masks it applied,
    the ground-truth masks (``target``, None for a dense model) and the heads' logits."""

    def __init__(
        self, model: nn.Module, target: Target | Sequence[Target] | None = None, input_size: tuple[int, int] | None = None
    ) -> None:
        self.model = model.eval()
        self.gated = isinstance(model, FTWTModel)
        if self.gated and target is None:
            raise ValueError("an FTWT model needs the target rule its masks are judged against")
        self.target = target if self.gated else None
        self.input_size = input_size
        if self.gated:
            model.configure(mask_source="predicted", target=self.target)

    @functools.cached_property
    def graph(self) -> ModelGraph:
        """The model's blocks and layers (a dense model is traced on first use: only analysed passes need it)."""
        if self.gated:
            return self.model.graph
        if self.input_size is None:
            raise ValueError("analysing a dense model needs input_size=(H, W) for its FLOPs")
        return analyze(self.model, tuple(self.input_size))

    @functools.cached_property
    def counter(self) -> FlopsCounter:
        return FlopsCounter(self.graph)

    @property
    def block_names(self) -> list[str]:
        return [b.conv for b in self.graph.blocks]

    @torch.no_grad()
    def forward(self, images: torch.Tensor, analyse: bool = True):
        """(logits, applied masks, ground-truth masks, head logits); without ``analyse`` only the logits
        (the other three None), so a perturbed pass costs a plain masked forward."""
        if self.gated:
            self.model.configure(record=analyse)
        logits = self.model(images)
        if not analyse:
            return logits, None, None, None
        if not self.gated:
            n = images.shape[0]
            ones = [torch.ones(n, b.out_channels, dtype=torch.bool, device=images.device) for b in self.graph.blocks]
            return logits, ones, None, None
        records = self.model.records()
        truth = [t.mask(rec.response) for rec, t in zip(records, self.model.targets())]
        return logits, [rec.mask > 0 for rec in records], truth, [rec.logits for rec in records]

    def release(self) -> nn.Module:
        """Stop recording and hand back the model in eval mode on the CPU (for latency measurements)."""
        if self.gated:
            self.model.configure(record=False)
        return self.model.cpu().eval()


def evaluation_pass(
    evaluands: Sequence[Evaluand],
    loader: Iterable,
    device: torch.device,
    *,
    inputs: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
    analyse: bool = True,
    track_masks: bool = True,
    all_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
    show: Callable = progress_bar,
    label: str = "eval",
) -> list[tuple[Scores, MaskStats | None]]:
    """Score every evaluand on the same inputs; per evaluand (scores, mask statistics or None).

    ``inputs(images, batch_index)`` turns a loaded batch into model inputs (e.g. perturb [0, 1] pixels,
    then normalise; default: the batch as loaded). ``analyse`` accumulates mask statistics;
    ``track_masks`` also the distinct masks and core filters (a set per layer, not reducible across
    processes). ``all_sum`` reduces the sums across processes (each rank passes over its own shard).
    """
    scores = [ScoreAccumulator() for _ in evaluands]
    stats = [MaskStats(e.counter, e.block_names, track_masks=track_masks) if analyse else None for e in evaluands]
    total = len(loader) if hasattr(loader, "__len__") else None
    with torch.no_grad(), show(label, total) as advance:
        for batch_index, (images, labels) in enumerate(loader):
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            batch = inputs(images, batch_index) if inputs is not None else images
            for evaluand, score, stat in zip(evaluands, scores, stats):
                logits, applied, truth, head_logits = evaluand.forward(batch, analyse)
                score.update(logits, labels)
                if stat is not None:
                    stat.update(applied, truth, head_logits)
            advance()
    results = []
    for score, stat in zip(scores, stats):
        if stat is not None and all_sum is not None:
            stat.reduce(all_sum)
        results.append((score.result(all_sum), stat))
    return results


def first_images(loader: Iterable, count: int, prepare: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """The first ``count`` images of ``loader`` (``prepare``d, e.g. normalised) as one CPU tensor [N, 3, H, W]."""
    batches, have = [], 0
    for images, _ in loader:
        batches.append(images[: count - have])
        have += batches[-1].shape[0]
        if have >= count:
            break
    images = torch.cat(batches)
    return prepare(images) if prepare is not None else images


@dataclass
class TestMetrics:
    """One split's figures as training and calibration records keep them (``test_top1`` is the split's)."""

    test_top1: float
    head_acc: float | None = None  # percent of channel decisions equal to the ground truth
    flops_reduction_pct: float | None = None
    flops_reduction_with_heads_pct: float | None = None


def summarise(scores: Scores, stats: MaskStats | None) -> TestMetrics:
    metrics = TestMetrics(test_top1=scores.top1)
    if stats is not None:
        layers = stats.layers()
        decisions = sum(layer.channels for layer in layers)
        metrics.head_acc = 100.0 * sum(layer.head_accuracy * layer.channels for layer in layers) / decisions
        metrics.flops_reduction_pct = stats.reduction_pct()
        metrics.flops_reduction_with_heads_pct = stats.reduction_pct(with_heads=True)
    return metrics


def validate(
    model: nn.Module,
    loader: Iterable,
    device: torch.device,
    target: Target | Sequence[Target] | None = None,
    all_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
    show: Callable = progress_bar,
    label: str = "test",
) -> tuple[TestMetrics, MaskStats | None]:
    """Top-1 of one model on one split; for an FTWT model also its mask statistics (against ``target``)
    and measured FLOPs. The evaluation pass with one evaluand, as training and calibration use it;
    under torchrun each rank passes over its own shard and ``all_sum`` reduces (distinct masks are then
    not tracked: a set per layer does not reduce)."""
    gated = isinstance(model, FTWTModel)
    evaluand = Evaluand(model, target if gated else None)
    if gated:
        model.configure(record=True)
    ((scores, stats),) = evaluation_pass(
        [evaluand], loader, device, analyse=gated, track_masks=all_sum is None, all_sum=all_sum, show=show, label=label
    )
    return summarise(scores, stats), stats
