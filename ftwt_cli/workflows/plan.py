"""``ftwt estimate`` and ``ftwt search``: planning before training, from one pass of the frozen dense model."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ftwt_cli.algorithms.estimate import (
    SEARCH_GRID,
    Estimate,
    SearchResult,
    UnreachableTarget,
    estimate,
    find_ratio,
    search_from_estimate,
)
from ftwt_cli.core.gating import FTWTModel
from ftwt_cli.errors import BadInput
from ftwt_cli.io import loading, setting
from ftwt_cli.io.config import Config, check_target_flops, parse_ratios, resolve_device
from ftwt_cli.io.data import make_loader

#: The accepted distance (points) of ``ftwt search``'s default, which ``ftwt estimate --target-flops`` uses.
SEARCH_TOLERANCE = 0.25


@dataclass
class Planned:
    """The dense model a plan was made from, and the plan."""

    loaded: loading.LoadedModel
    result: Estimate | SearchResult
    config: Config  # the configuration used: the checkpoint's data and input size where none was given
    search: SearchResult | None = None  # estimate with a budget: the r 'ftwt search' chooses, from the same pass
    unreachable: str | None = None  # estimate with a budget no r reaches: why


def _frozen_gated(cfg: Config):
    """The frozen dense model (gated, masks off), its device, the training data of the planning pass and
    the configuration used (the checkpoint's setting where the user gave none)."""
    cfg = setting.follow(cfg, cfg.checkpoint)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)  # without a checkpoint the initialised weights must not vary between runs
    loaded = loading.load_model(cfg, cfg.checkpoint, require="dense")
    gated: FTWTModel = loading.wrap(loaded.model, cfg).to(device)
    for p in gated.parameters():
        p.requires_grad_(False)
    loader = make_loader(loading.dataset(cfg, "train"), cfg.batch_size, workers=cfg.workers)
    return loaded, gated, loader, device, cfg


def plan_estimate(cfg: Config, ratios: str | None = None, target_flops: float | None = None, tolerance: float = SEARCH_TOLERANCE) -> Planned:
    """The expected FLOPs reduction of every r in ``ratios`` (default: the profile's); with
    ``target_flops``, also the r that ``ftwt search`` chooses (its bisection, at its default tolerance),
    taken from the same single pass, so that both commands give one r for one budget."""
    ratio_list = parse_ratios(ratios if ratios is not None else cfg.ratios)
    loaded, gated, loader, device, cfg = _frozen_gated(cfg)
    if target_flops is None:
        return Planned(loaded, estimate(gated, loader, ratio_list, device), cfg)
    full = estimate(gated, loader, sorted(set(ratio_list) | set(SEARCH_GRID)), device)
    planned = Planned(loaded, full.restricted(ratio_list), cfg)
    try:
        planned.search = search_from_estimate(full.restricted(SEARCH_GRID), target_flops, tolerance)
    except UnreachableTarget as exc:
        planned.unreachable = str(exc)
    return planned


def plan_search(cfg: Config, target_flops: float | None, tolerance: float, cascade: bool = False) -> Planned:
    """The r whose estimated reduction is within ``tolerance`` points of ``target_flops``."""
    if target_flops is None:
        raise BadInput("--target-flops is required (percent of dense FLOPs to remove, e.g. 50)")
    check_target_flops(target_flops)
    if tolerance <= 0:
        raise BadInput(f"--tolerance must be positive, got {tolerance:g}")
    loaded, gated, loader, device, cfg = _frozen_gated(cfg)
    try:
        return Planned(loaded, find_ratio(gated, loader, device, target_flops, tolerance, cascade), cfg)
    except UnreachableTarget as exc:
        raise BadInput(str(exc)) from None
