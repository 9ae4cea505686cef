"""``ftwt export --static-core``: the static core of a calibrated FTWT checkpoint, measured against it.

The heads' keep rates come from the training images the run held out (the seeded split its record
names, as ``ftwt calibrate`` reads them); the core is built by
:func:`~ftwt_cli.algorithms.static.core.build_core`. Both models are then scored on the test split in one
evaluation pass (top-1, measured FLOPs against the unpruned architecture) and timed at batch 1 on the CPU,
alternately, medians; the core is also checked against the gated model with its masks fixed as the core
fixes them (it must compute exactly that).
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

from ftwt_cli.algorithms.evaluation import Evaluand, evaluation_pass
from ftwt_cli.algorithms.static import build_core, forced_reference, keep_rates
from ftwt_cli.console import progress_bar
from ftwt_cli.errors import BadInput
from ftwt_cli.io import loading
from ftwt_cli.io.config import Config
from ftwt_cli.io.data import make_loader
from ftwt_cli.workflows.calibrate import HELD_OUT_FIELDS

#: Images timed at batch 1 (each model, each of 3 rounds after a warm-up round), on the thread count
#: ``ftwt eval --latency`` uses by default.
LATENCY_IMAGES = 20
LATENCY_THREADS = 1


def static_core_of(cfg: Config, loaded: loading.LoadedModel, min_keep_rate: float, images: torch.Tensor, show: Callable = progress_bar):
    """(core model, its checkpoint meta, figures: core against the gated model)."""
    meta = loaded.meta
    if loaded.kind != "ftwt" or meta.get("static_core"):
        raise BadInput(f"--static-core needs an FTWT checkpoint (this one is {'a static core' if meta.get('static_core') else meta.get('kind')})")
    if meta.get("signature") or any(meta.get("codebook_sizes") or []):
        raise BadInput("--static-core needs heads that decide by threshold; this checkpoint fixes counts (signature) or routes among prototypes")
    model = loaded.model.cpu().eval()
    held_cfg = cfg.override(**{k: meta[k] for k in HELD_OUT_FIELDS if k in meta})
    held = loading.training_splits(held_cfg, augment=False)[1] or loading.dataset(held_cfg, "train")
    loader = make_loader(held, cfg.batch_size, workers=cfg.workers)
    with show("keep rates (held-out images)", len(loader)) as advance:
        rates = keep_rates(model, _advancing(loader, advance))
    core, spec = build_core(model, rates, min_keep_rate)
    reference = forced_reference(model, spec)
    with torch.no_grad():
        exactness = float((core(images) - reference(images)).abs().max())
    target = loaded.target()
    test = make_loader(loading.dataset(cfg, "test"), cfg.batch_size, workers=cfg.workers)
    device = torch.device("cpu")
    (gated_scores, gated_masks), (core_scores, core_masks) = evaluation_pass(
        [Evaluand(model, target), Evaluand(core, target)], test, device, show=show, label="gated vs core (test)"
    )  # fmt: skip
    dense = model.graph.dense_macs
    gated_ms, core_ms = batch1_latency(model, core, images[:LATENCY_IMAGES], threads=LATENCY_THREADS)
    figures = {
        "min_keep_rate": min_keep_rate,
        "held_out_images": len(held),
        "filters": sum(r.numel() for r in rates),
        "removed_filters": sum(r.numel() for r in rates) - sum(len(k) for k in spec.kept),
        "always_kept_filters": sum(len(k) - len(g) for k, g in zip(spec.kept, spec.gated)),
        "gated_filters": sum(len(g) for g in spec.gated),
        "dense_macs": int(dense),
        "core_dense_macs": int(core.graph.dense_macs),
        # executed_macs: what each file computes per image (every filter it holds, then masks), heads included
        "gated": {"top1": gated_scores.top1, "mean_macs": gated_masks.mean_macs, "head_macs": _head_macs(model),
                  "executed_macs": int(dense + _head_macs(model)),
                  "flops_reduction_pct": 100.0 * (1 - gated_masks.mean_macs / dense), "latency_ms": gated_ms},
        "core": {"top1": core_scores.top1, "mean_macs": core_masks.mean_macs, "head_macs": _head_macs(core),
                 "executed_macs": int(core.graph.dense_macs + _head_macs(core)),
                 "flops_reduction_pct": 100.0 * (1 - core_masks.mean_macs / dense), "latency_ms": core_ms},
        "test_images": gated_scores.samples,
        "latency_threads": LATENCY_THREADS,
        "core_vs_fixed_masks_max_abs_diff": exactness,
    }  # fmt: skip
    core_meta = {**meta, "static_core": spec.to_meta(), "dense_macs": int(dense), "core_figures": figures}
    return core, core_meta, figures


def _advancing(loader, advance):
    for images, _ in loader:
        yield images
        advance()


def _head_macs(model) -> int:
    return int(sum(head.macs for head in model.heads()))


def batch1_latency(gated, core, images: torch.Tensor, rounds: int = 3, threads: int = LATENCY_THREADS) -> tuple[float, float]:
    """Median batch-1 CPU milliseconds of both models on ``threads`` threads, interleaved image by image
    (which runs first alternates), after a warm-up round."""
    times: dict[int, list[float]] = {0: [], 1: []}
    models = (gated, core)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            for round_ in range(rounds + 1):
                for i, image in enumerate(images):
                    for which in (0, 1) if (round_ + i) % 2 == 0 else (1, 0):
                        start = time.perf_counter_ns()
                        models[which](image[None])
                        if round_:  # round 0 warms up
                            times[which].append((time.perf_counter_ns() - start) / 1e6)
    finally:
        torch.set_num_threads(previous)
    return statistics.median(times[0]), statistics.median(times[1])
