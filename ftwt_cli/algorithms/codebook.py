"""Fitting a mask codebook: K prototype masks per gated layer that cover what the heads decide, sized so
the measured FLOPs reduction (heads included) equals a budget.

1. The heads (calibrated to the budget) decide binary masks on held-out training images.
2. Per layer, the masks are clustered into K groups in Hamming space (k-modes: k-means++ seeding,
   nearest prototype by Hamming distance, majority vote), so that similar images share a sub-network.
3. A prototype keeps the channels its members keep in at least a fraction τ of cases; one τ for all
   layers and prototypes is bisected until the measured reduction, with each image taking the prototype
   its head selects (:class:`~ftwt_cli.core.codebook.Codebook`), equals the budget.

Refitting a model that has a codebook keeps its groups (each image's group is the prototype it selects
now) and only re-sizes them: the small correction after fine-tuning, as recalibration is for offsets.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Iterable

import torch

from ftwt_cli.console import progress_bar
from ftwt_cli.core.flops import FlopsCounter
from ftwt_cli.core.gating import FTWTModel, binarize

#: Bisection over τ stops when the measured reduction is this close to the target (points).
TOLERANCE = 0.1
MAX_STEPS = 20
KMODES_ITERATIONS = 25


class CodebookError(ValueError):
    """The codebook cannot be fitted (K < 1, no images, an unreachable budget)."""


@dataclass
class CodebookFit:
    """What fitting chose and measured; stored in the checkpoint's meta as ``codebook``."""

    k: int  # prototypes asked for per layer
    sizes: list[int]  # prototypes per layer (fewer where a layer has fewer distinct masks)
    tau: float  # the share of its members that must keep a channel for the prototype to keep it
    target_pct: float
    reached_pct: float  # measured on the fitting images (heads included)
    raw_pct: float  # the same before this fit (the model's own masks or codebook)
    images: int
    steps: int
    converged: bool
    refit: bool  # re-sized an existing codebook (its groups kept)

    def to_meta(self) -> dict:
        return asdict(self)


def kmodes(masks: torch.Tensor, k: int, seed: int = 0, iterations: int = KMODES_ITERATIONS) -> torch.Tensor:
    """Cluster bool masks [N, C] into at most ``k`` groups in Hamming space; returns each row's group [N]."""
    x = masks.float()
    distinct = torch.unique(x, dim=0)
    k = min(k, distinct.shape[0])
    g = torch.Generator().manual_seed(seed)
    centers = distinct[torch.randint(distinct.shape[0], (1,), generator=g)]
    while centers.shape[0] < k:  # k-means++: the next center far from those chosen
        d = hamming(distinct, centers).min(dim=1).values.float() ** 2
        pick = torch.multinomial(d / d.sum(), 1, generator=g) if d.sum() > 0 else torch.randint(distinct.shape[0], (1,), generator=g)
        centers = torch.cat([centers, distinct[pick]])
    groups = hamming(x, centers).argmin(dim=1)
    for _ in range(iterations):
        updated = torch.stack([x[groups == j].mean(0) >= 0.5 if (groups == j).any() else centers[j] > 0 for j in range(k)]).float()
        new_groups = hamming(x, updated).argmin(dim=1)
        centers = updated
        if torch.equal(new_groups, groups):
            break
        groups = new_groups
    return groups


def hamming(x: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """[N, K] Hamming distances between 0/1 rows of ``x`` [N, C] and ``centers`` [K, C]."""
    return x @ (1 - centers).T + (1 - x) @ centers.T


def _decisions(model: FTWTModel, batches: list[torch.Tensor], device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (binary masks of the heads' own thresholds [N, C], the codebook group each image selects [N] or None)."""
    masks: list[list[torch.Tensor]] = [[] for _ in model.blocks]
    groups: list[list[torch.Tensor]] = [[] for _ in model.blocks]
    with torch.no_grad():
        for images in batches:
            model(images.to(device))
            for b, (rec, block) in enumerate(zip(model.records(), model.blocks)):
                masks[b].append(binarize(rec.logits).bool().cpu())
                if block.codebook is not None:
                    groups[b].append(block.codebook.select(rec.logits).cpu())
    return [(torch.cat(m), torch.cat(g) if g else None) for m, g in zip(masks, groups)]


def _measure(model: FTWTModel, batches: list[torch.Tensor], counter: FlopsCounter, device: torch.device) -> float:
    macs, n = 0.0, 0
    with torch.no_grad():
        for images in batches:
            model(images.to(device))
            macs += float(counter.macs_from_masks([rec.mask > 0 for rec in model.records()]).sum())
            n += images.shape[0]
    return float(counter.reduction_pct(macs / n, with_heads=True))


def fit_codebook(
    model: FTWTModel,
    images: Iterable,
    device: torch.device,
    k: int,
    target_pct: float,
    seed: int = 0,
    tolerance: float = TOLERANCE,
    show: Callable = progress_bar,
) -> CodebookFit:
    """Give every block of ``model`` a codebook of at most ``k`` prototypes fitted on ``images`` (batches,
    or (images, labels) pairs) so that the measured FLOPs reduction is ``target_pct``; a model that
    already has codebooks keeps their groups and is only re-sized. Leaves the model in eval mode."""
    if k < 1:
        raise CodebookError(f"--codebook K needs at least 1 prototype per layer, got {k}")
    batches = [b[0] if isinstance(b, (tuple, list)) else b for b in images]
    if not batches:
        raise CodebookError("fitting a codebook needs at least one image")
    refit = all(block.codebook is not None for block in model.blocks)
    model.eval().configure(mask_source="predicted", record=True)
    counter = FlopsCounter(model.graph)
    raw = _measure(model, batches, counter, device)
    decisions = _decisions(model, batches, device)
    frequencies = []  # per layer: [groups, C] share of each group's images keeping each channel
    for b, (masks, selected) in enumerate(decisions):
        groups = selected if refit else kmodes(masks, k, seed=seed + b)
        present = torch.unique(groups)
        frequencies.append(torch.stack([masks[groups == j].float().mean(0) for j in present]))

    def prototypes(tau: float) -> list[torch.Tensor]:
        out = []
        for freq in frequencies:
            keep = freq >= tau
            strongest = freq.argmax(dim=1)  # a prototype keeps at least its most shared channel
            keep[torch.arange(freq.shape[0]), strongest] = True
            out.append(keep)
        return out

    low, high = 0.0, 1.0  # τ bounds: reduction grows with τ
    reached, tau, steps, converged = float("nan"), 0.5, 0, False
    with show("codebook", MAX_STEPS) as advance:
        for steps in range(1, MAX_STEPS + 1):
            tau = (low + high) / 2
            model.set_codebooks(prototypes(tau))
            reached = _measure(model, batches, counter, device)
            advance(info=f"τ {tau:.4f} → {reached:.2f}%")
            if abs(reached - target_pct) <= tolerance:
                converged = True
                break
            if reached > target_pct:
                high = tau  # pruning too much: prototypes keep more
            else:
                low = tau
    return CodebookFit(
        k=k, sizes=model.codebook_sizes(), tau=tau, target_pct=target_pct, reached_pct=reached, raw_pct=raw,
        images=sum(b.shape[0] for b in batches), steps=steps, converged=converged, refit=refit,
    )  # fmt: skip
