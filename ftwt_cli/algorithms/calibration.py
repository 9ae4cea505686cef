"""Budget calibration: per-layer decision thresholds that make a trained FTWT model hit a FLOPs target.

Heads trained for a short time keep more filters than their targets (the estimate said 50 %, the model
removes 38 %). Calibration moves each head's decision threshold by one scalar **per layer** (a logit
offset, added to every filter's logit of that layer) so that

* the *shape* of the budget follows the target: layer l keeps the fraction q_l(r') of its filters that
  the ground truth keeps at some ratio r' on the same images, and
* the *total* is the user's: r' is bisected until the measured FLOPs reduction (heads' own MACs
  included) on held-out training images equals the target.

A single offset per layer leaves the order of a layer's logits untouched: which filters an image keeps
is still the head's decision, only how many is set here. A head whose logits hardly vary between images
therefore stays nearly static after calibration, and the distinct-mask counts that ``ftwt eval`` reports
still show it: calibration fixes the count, not a broken head.

Because each layer's input depends on the masks upstream, the offsets of one r' are found by a few
fixed-point passes (offsets from quantiles of the logits, re-measure, repeat), warm-started from the
previous bisection step.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Iterable

import torch

from ftwt_cli.console import progress_bar
from ftwt_cli.core.flops import FlopsCounter, count_kept, ratio_levels
from ftwt_cli.core.gating import FTWTModel
from ftwt_cli.core.targets import keep_thresholds

#: Bisection over r' stops when the measured reduction is this close to the target (points).
TOLERANCE = 0.1
MAX_STEPS = 24
#: Fixed-point passes per bisection step (the first step gets two more).
PASSES = 2
#: Keep rates are matched within half a channel-decision per thousand; offsets then leave this margin.
MARGIN = 1e-4


class CalibrationError(ValueError):
    """The model cannot be calibrated (not an FTWT model, or the target is out of reach)."""


@dataclass
class Calibration:
    """What calibration chose and measured; stored in the checkpoint's meta as ``calibration``."""

    target_pct: float  # FLOPs reduction asked for (heads included)
    reached_pct: float  # measured on the calibration images after calibration (heads included)
    raw_pct: float  # the same before this calibration (the offsets the model had, usually none)
    ratio: float  # r' whose per-layer ground-truth keep rates the offsets match
    images: int
    offsets: list[float]  # per-layer logit offsets, graph order
    layer_keep_target: list[float]  # q_l(r'): ground-truth keep rate per layer at r'
    layer_keep_reached: list[float]  # the heads' keep rate per layer after calibration
    steps: int
    converged: bool

    def to_meta(self) -> dict:
        return asdict(self)


@dataclass
class _PassResult:
    logits: list[torch.Tensor]  # per layer, raw logits (offset removed) [N, C]
    thresholds: list[torch.Tensor]  # per layer, Algorithm 1 thresholds of the unmasked responses [N, C]
    reduction_pct: float  # measured, heads included
    keep: list[float]  # heads' keep rate per layer


@torch.no_grad()
def _measure(model: FTWTModel, batches: list[torch.Tensor], counter: FlopsCounter, device: torch.device) -> _PassResult:
    logits: list[list[torch.Tensor]] = [[] for _ in model.blocks]
    thresholds: list[list[torch.Tensor]] = [[] for _ in model.blocks]
    kept = torch.zeros(len(model.blocks), dtype=torch.float64)
    macs, n = 0.0, 0
    for images in batches:
        model(images.to(device))
        records = model.records()
        masks = [rec.mask > 0 for rec in records]
        macs += float(counter.macs_from_masks(masks).sum())
        n += images.shape[0]
        for b, (rec, block) in enumerate(zip(records, model.blocks)):
            logits[b].append((rec.logits - block.head.logit_offset).cpu())
            thresholds[b].append(keep_thresholds(rec.response).cpu())
            kept[b] += float(masks[b].float().mean(dim=1).sum())
    return _PassResult(
        logits=[torch.cat(x) for x in logits],
        thresholds=[torch.cat(x) for x in thresholds],
        reduction_pct=float(counter.reduction_pct(macs / n, with_heads=True)),
        keep=(kept / n).tolist(),
    )


def _target_keep(thresholds: list[torch.Tensor], ratio: float) -> list[float]:
    """q_l(r): the fraction of (image, filter) pairs the ground truth keeps at ratio r, per layer."""
    level = ratio_levels([ratio])
    return [float(count_kept(t, level).double().mean()) / t.shape[1] for t in thresholds]


def _offsets_for(logits: list[torch.Tensor], keep: list[float]) -> list[float]:
    """Per layer, the offset b with mean(logit + b > 0) ≈ q: minus the (1 − q) quantile of the logits."""
    offsets = []
    for lg, q in zip(logits, keep):
        flat = lg.flatten().double()
        if q >= 1.0 - MARGIN:
            offsets.append(float(-flat.min()) + 1e-3)
        elif q <= MARGIN:
            offsets.append(float(-flat.max()) - 1e-3)
        else:
            # kthvalue: the k-th smallest; everything above it is kept (ties at the boundary are dropped).
            # The threshold sits halfway to the next larger logit, not on the k-th one: a logit exactly at
            # the threshold would be decided by rounding (torch, the engine's numpy, an ONNX runtime).
            k = max(1, min(flat.numel(), round((1.0 - q) * flat.numel())))
            boundary = flat.kthvalue(k).values
            above = flat[flat > boundary]
            offsets.append(float(-(boundary + above.min()) / 2) if above.numel() else float(-boundary) - 1e-3)
    return offsets


def _set_offsets(model: FTWTModel, offsets: list[float]) -> None:
    for block, offset in zip(model.blocks, offsets):
        block.head.logit_offset.fill_(offset)


def calibrate(
    model: FTWTModel,
    images: Iterable,
    device: torch.device,
    target_pct: float,
    tolerance: float = TOLERANCE,
    show: Callable = progress_bar,
) -> Calibration:
    """Set per-layer logit offsets on ``model`` so its measured FLOPs reduction (heads included) on
    ``images`` (batches of normalised images, or (images, labels) pairs) is ``target_pct``.

    Offsets are absolute (computed from the logits without any offset), so the result does not depend on
    offsets the model already has; those only set where the search starts and what ``raw_pct`` measures.
    The model is left in eval mode with the offsets in place; call :func:`clear` to undo them.
    """
    if not isinstance(model, FTWTModel):
        raise CalibrationError("only FTWT models have decision heads to calibrate (this is a dense model)")
    if not 0.0 < target_pct < 100.0:
        raise CalibrationError(f"--target-flops is a percent of FLOPs to remove and must be in (0, 100), got {target_pct:g}")
    batches = [b[0] if isinstance(b, (tuple, list)) else b for b in images]
    if not batches:
        raise CalibrationError("calibration needs at least one image")
    counter = FlopsCounter(model.graph)
    model.eval().configure(mask_source="predicted", record=True)
    raw = _measure(model, batches, counter, device)
    low, high = 0.0, 1.0  # r' bounds: reduction falls as r' grows
    state, ratio, steps, converged = raw, 1.0, 0, False
    with show("calibrate", MAX_STEPS) as advance:
        for steps in range(1, MAX_STEPS + 1):
            ratio = (low + high) / 2
            for _ in range(PASSES + (2 if steps == 1 else 0)):
                offsets = _offsets_for(state.logits, _target_keep(state.thresholds, ratio))
                _set_offsets(model, offsets)
                state = _measure(model, batches, counter, device)
            advance(info=f"r' {ratio:.4f} → {state.reduction_pct:.2f}%")
            if abs(state.reduction_pct - target_pct) <= tolerance:
                converged = True
                break
            if state.reduction_pct > target_pct:
                low = ratio  # pruning too much: keep more
            else:
                high = ratio
    return Calibration(
        target_pct=target_pct,
        reached_pct=state.reduction_pct,
        raw_pct=raw.reduction_pct,
        ratio=ratio,
        images=sum(b.shape[0] for b in batches),
        offsets=[float(b.head.logit_offset[0]) for b in model.blocks],
        layer_keep_target=_target_keep(state.thresholds, ratio),
        layer_keep_reached=state.keep,
        steps=steps,
        converged=converged,
    )


def clear(model: FTWTModel) -> None:
    """Remove calibration offsets: the raw heads decide again."""
    _set_offsets(model, [0.0] * len(model.blocks))


def is_calibrated(model: FTWTModel) -> bool:
    return any(bool(b.head.logit_offset.abs().max() > 0) for b in model.blocks)


def before_and_after(model: FTWTModel, test: Callable, run: Callable[[], Calibration]) -> tuple[dict, object, object]:
    """Calibrate with ``run()`` and measure ``test(label) -> (metrics, stats)`` three ways: the raw heads
    (offsets removed), the heads as given (their offsets, e.g. set when training froze them) and
    calibrated. Returns the record stored in checkpoints and run summaries, and the raw and calibrated
    per-layer statistics."""
    given_offsets = [head.logit_offset.clone() for head in model.heads()]
    clear(model)
    raw, raw_stats = test("test (raw heads)")
    for head, offset in zip(model.heads(), given_offsets):
        head.logit_offset.copy_(offset)
    given, _ = test("test (as trained)")
    result = run()
    tuned, tuned_stats = test("test (calibrated)")
    record = {
        **result.to_meta(),
        "test_top1_raw": raw.test_top1,
        "test_top1_trained": given.test_top1,
        "test_top1_calibrated": tuned.test_top1,
        "test_reduction_raw_pct": raw.flops_reduction_with_heads_pct,
        "test_reduction_trained_pct": given.flops_reduction_with_heads_pct,
        "test_reduction_calibrated_pct": tuned.flops_reduction_with_heads_pct,
    }
    return record, raw_stats, tuned_stats
