"""Batch-1 CPU latency of the sparse engine against the dense backbone (the paper's Table 5).

Dense reference: the same weights without heads or masks, with every BN folded into its conv
(:func:`~ftwt_cli.engine.reference.folded_dense`), run as a plain ``nn.Module`` in the faster of the default and the
channels-last memory format (timed on the calibration images). Dense, engine and any other model given
(``others``: e.g. a static model at the same FLOPs) run alternately on each image (their order rotating
every image) so that all share the machine's drift; medians and 90th percentiles are reported. With
``batch_sizes`` the engine's grouped batches are timed against dense at those sizes too
(:mod:`~ftwt_cli.engine.throughput`).
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from ftwt_cli.console import progress_bar
from ftwt_cli.core.flops import FlopsCounter
from ftwt_cli.core.gating import FTWTModel
from ftwt_cli.engine.choice import decide
from ftwt_cli.engine.program import DEFAULT_MEMORY_MB, SparseEngine, build_engine
from ftwt_cli.engine.reference import dense_fallback
from ftwt_cli.engine.throughput import batched_throughput

#: Calibration images for the engine's per-layer and whole-engine choice (taken from the layout images;
#: each timed round sees images of its own, 2 per round at the default 3 rounds + warm-up).
CALIBRATION_IMAGES = 8


def _timed(fn, x: torch.Tensor) -> float:
    start = time.perf_counter_ns()
    fn(x)
    return (time.perf_counter_ns() - start) / 1e6


def dense_reference(
    model: nn.Module, input_size: tuple[int, int], images: torch.Tensor, rounds: int = 3, masked: bool = False
) -> tuple[nn.Module, dict]:
    """The BN-folded dense backbone (no heads, no masks) in its faster memory format on ``images``;
    with ``masked`` (an FTWT model), the same convs with the heads applying their masks: the engine's
    whole-model fallback, which costs dense plus the heads."""
    candidates = {fmt: dense_fallback(model, input_size, channels_last=fmt, masked=masked) for fmt in (False, True)}
    times: dict[bool, list[float]] = {False: [], True: []}
    with torch.inference_mode():
        for round_ in range(rounds + 1):
            for fmt in (False, True) if round_ % 2 == 0 else (True, False):
                ms = [_timed(candidates[fmt], image[None]) for image in images]
                if round_:
                    times[fmt].append(statistics.median(ms))
    best = {fmt: min(v) for fmt, v in times.items()}
    channels_last = best[True] < best[False]
    return candidates[channels_last], {"dense_channels_last": channels_last, "dense_default_ms": best[False], "dense_channels_last_ms": best[True]}


def prepared_engine(
    model: nn.Module,
    input_size: tuple[int, int],
    layout_images: torch.Tensor,
    cache_mb: float = 64.0,
    calibrate: bool = True,
    memory_mb: float = DEFAULT_MEMORY_MB,
    prototypes: dict | None = None,
) -> SparseEngine:
    """An engine with its pre-sliced sub-networks fitted on ``layout_images`` (all but the first
    ``CALIBRATION_IMAGES`` when there are twice as many; or ``prototypes`` sliced on them) and its static cores; its format, per-layer and whole-engine choices are left to
    :func:`latency_report` (they depend on the thread count). ``engine.fitted`` / ``engine.layout``
    say what was fitted."""
    engine = build_engine(model, input_size, cache_mb=cache_mb, calibrate=calibrate, layers="sparse", fallback=False, memory_mb=memory_mb, channels_last=False)
    engine.fitted = {}
    # The first CALIBRATION_IMAGES make the timed choices: fitted on the others, so that the choices see
    # masks the prototypes were not fitted on, as the timed images are.
    fit_on = layout_images[CALIBRATION_IMAGES:] if len(layout_images) >= 2 * CALIBRATION_IMAGES else layout_images
    if isinstance(model, FTWTModel) and prototypes is not None:
        engine.load_prototypes(prototypes, fit_on if len(fit_on) else None)
        engine.fitted = engine.prototype_report()
    elif isinstance(model, FTWTModel) and len(fit_on):
        engine.fitted = engine.fit_prototypes(fit_on)
    engine.layout = engine.fit_layout(layout_images) if len(layout_images) else {}
    return engine


def latency_report(
    model: nn.Module,
    images: torch.Tensor,
    threads: int = 1,
    cache_mb: float = 64.0,
    warmup: int = 20,
    calibrate: bool = True,
    layout_images: torch.Tensor | None = None,
    layers="auto",
    fallback="auto",
    memory_mb: float = DEFAULT_MEMORY_MB,
    prototypes: dict | None = None,
    others: dict[str, nn.Module] | None = None,
    batch_sizes=(),
    channels_last="auto",
    engine: SparseEngine | None = None,
    profile_images: int = 0,
) -> dict:
    """Median batch-1 latency of dense vs engine over ``images`` [N, 3, H, W], with FLOPs measured on them.

    ``model`` is an eval-mode FTWTModel (or a dense backbone: the identity case) on CPU. The weight cache
    and the path counters are reset after the warm-up, so hit rates and prototype coverage count only
    the measured pass. ``calibrate`` times the engine's conv strategies on this machine at build time.
    ``layout_images`` (e.g. held-out training images) fit the engine's pre-sliced sub-networks within
    ``memory_mb`` (or, with ``prototypes``, plain-list prototype sets such as a checkpoint's, slice
    them) and its static cores (:meth:`SparseEngine.fit_layout`), and, the first few of them, choose
    the engine's memory format, per layer between sparse paths and the dense conv, and for the whole
    engine between the engine and the dense model (``layers``/``fallback``/``channels_last`` as in
    ``build_engine``: "auto" measures); without them the warm-up images are used (``layout_images``
    says which). ``engine`` (from :func:`prepared_engine`) skips the build and fitting; its choices are
    made again at ``threads``. ``flops_reduction_pct`` (the one in ``ratio``) charges the heads' MACs.
    ``others`` (name → module) are timed beside dense and engine (``{name}_ms``, ``{name}_p90_ms``,
    ``engine_over_{name}``); ``batch_sizes`` adds ``batched`` (see :func:`batched_throughput`); ``profile_images`` > 0 adds
    ``op_profile`` (see :func:`op_profile`) of every timed model on that many images. For an
    FTWT model the engine's outputs and masks on the timed images are compared with the gated model's
    (``max_abs_error``, ``max_rel_error`` relative to the largest output, ``mask_mismatches``).
    """
    if images.dim() != 4 or images.shape[0] == 0:
        raise ValueError(f"images must be a non-empty [N, 3, H, W] tensor, got shape {tuple(images.shape)}")
    images = images.detach().cpu()
    size = tuple(images.shape[2:])
    others = dict(others or {})
    gated = isinstance(model, FTWTModel)
    if layout_images is None:
        layout_source = f"the {warmup} warm-up images (cycled from the timed set)" if warmup else "none"
        layout_images = images[torch.arange(warmup) % len(images)] if warmup else images[:0]
    else:
        layout_source = f"{len(layout_images)} separate images"
    layout_images = layout_images.detach().cpu()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        if engine is None:
            engine = prepared_engine(model, size, layout_images, cache_mb, calibrate, memory_mb, prototypes)
        engine.fallback = None
        calibration = (layout_images if len(layout_images) else images)[:CALIBRATION_IMAGES]
        measured = decide(engine, calibration, layers, fallback, channels_last)  # calibration images at hand: "auto" measures
        dense, dense_info = dense_reference(model, size, calibration, rounds=2 if warmup else 1)
        timed = {"dense": dense, "engine": engine, **others}
        ms: dict[str, list[float]] = {name: [] for name in timed}
        masks: list[list[torch.Tensor]] = [[] for _ in range(engine.num_blocks)]
        outputs = []
        with torch.inference_mode():
            for i in range(warmup):
                x = images[i % len(images)][None]
                for fn in timed.values():
                    fn(x)
            engine.cache.clear()
            for step in engine.steps:
                step.counts = dict.fromkeys(step.counts, 0)
                step.extra_macs = 0
            names = list(timed)
            with progress_bar("latency (batch 1)", len(images)) as advance:
                for i, image in enumerate(images):
                    x = image[None]
                    shift = i % len(names)  # rotate the order so that no model always runs first
                    for name in names[shift:] + names[:shift]:
                        start = time.perf_counter_ns()
                        out = timed[name](x)
                        ms[name].append((time.perf_counter_ns() - start) / 1e6)
                        if name == "engine":
                            outputs.append(out)
                    for block, mask in enumerate(engine.block_masks()):
                        masks[block].append(mask)
                    advance(info=f"dense {statistics.median(ms['dense']):.2f} ms, engine {statistics.median(ms['engine']):.2f} ms")
        counts = engine.strategy_counts()
        use = engine.prototype_report() if gated else {}
        batched = batched_throughput(engine, images, batch_sizes) if batch_sizes else None
        profiled = op_profile(timed, images[:profile_images]) if profile_images > 0 else None
    finally:
        torch.set_num_threads(previous_threads)

    dense_median, engine_median = statistics.median(ms["dense"]), statistics.median(ms["engine"])
    latency_reduction = 100.0 * (1.0 - engine_median / dense_median)
    exactness: dict = {}
    if gated:
        counter = FlopsCounter(model.graph)
        macs = counter.macs_from_masks([torch.stack(m) for m in masks]).mean().item()
        flops_reduction = float(counter.reduction_pct(macs, with_heads=True))
        flops_no_heads = float(counter.reduction_pct(macs))
        exactness = against_gated(model, images, torch.cat(outputs), [torch.stack(m) for m in masks])
    else:
        flops_reduction = flops_no_heads = 0.0
    report = {
        "samples": len(images),
        "threads": threads,
        "warmup": warmup,
        "dense_ms": dense_median,
        "engine_ms": engine_median,
        "dense_p90_ms": _quantile(ms["dense"], 0.9),
        "engine_p90_ms": _quantile(ms["engine"], 0.9),
        "latency_reduction_pct": latency_reduction,
        "flops_reduction_pct": flops_reduction,
        "flops_reduction_no_heads_pct": flops_no_heads,
        "ratio": latency_reduction / flops_reduction if flops_reduction > 0 else float("nan"),
        "fallback": engine.fallback is not None,
        "engine_channels_last": engine.channels_last,
        "sparse_layers": engine.sparse_layers(),
        "sparse_layer_count": len(engine.sparse_layers()),
        "conv_layer_count": len(engine.convs),
        "layers": measured.get("layers", []),
        "calibration": {k: v for k, v in measured.items() if k != "layers"},
        **dense_info,
        "cache_mb": cache_mb,
        "cache_hit_rate": engine.cache.hit_rate,
        "calibrated": calibrate,
        "layout_images": layout_source,
        "core_mac_fraction": getattr(engine, "layout", {}).get("mean_core_mac_fraction", float("nan")),
        "strategy_counts": counts,
        "prototypes": _fit_summary(getattr(engine, "fitted", {}), engine.memory.budget / 2**20),
        "prototype_use": {k: use[k] for k in ("calls", "coverage", "uncovered", "over_cap", "built_at_run_time", "extra_mac_pct", "memory_mb")} if use else None,
        **exactness,
        "dense_reference": "backbone without heads, BN folded into convs, faster of default/channels-last",
    }
    for name in others:
        median = statistics.median(ms[name])
        report.update({f"{name}_ms": median, f"{name}_p90_ms": _quantile(ms[name], 0.9), f"engine_over_{name}": engine_median / median})
    if batched is not None:
        report["batched"] = batched
    if profiled is not None:
        report["op_profile"] = profiled
    return report


def op_profile(models: dict, images: torch.Tensor, top: int = 12) -> dict:
    """Where each model's batch-1 time goes: per model (name → callable on a [1, 3, H, W] input), the
    profiler's self CPU time per image in all and its ``top`` operators (ms and calls per image), each
    model profiled alone after one warm-up image. The profiler's overhead inflates small operators; the
    shares between models run the same way are what to read."""
    n = len(images)
    result = {}
    with torch.inference_mode():
        for name, fn in models.items():
            fn(images[:1])
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for image in images:
                    fn(image[None])
            events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
            events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
            result[name] = {
                "images": n,
                "ms_per_image": sum(e.self_cpu_time_total for e in events) / 1e3 / n,
                "ops": [{"op": e.key, "ms_per_image": e.self_cpu_time_total / 1e3 / n, "calls_per_image": e.count / n} for e in events[:top]],
            }
    return result


def against_gated(model: FTWTModel, images: torch.Tensor, outputs: torch.Tensor, masks: list[torch.Tensor]) -> dict:
    """The engine's ``outputs`` [N, ...] and block ``masks`` (bool [N, C] each) against the gated model's on
    ``images``: largest absolute difference, that relative to the largest output, (image, block) pairs
    whose masks differ (a logit within float rounding of 0 can flip)."""
    recording = [b.record for b in model.blocks]
    model.configure(record=True)
    worst = scale = 0.0
    mismatches = 0
    try:
        with torch.no_grad():
            for start in range(0, len(images), 16):
                chunk = slice(start, start + 16)
                expected = model(images[chunk])
                worst = max(worst, (outputs[chunk] - expected).abs().max().item())
                scale = max(scale, expected.abs().max().item())
                for record, mask in zip(model.records(), masks):
                    mismatches += int((record.mask[:, : mask.shape[1]].bool() != mask[chunk]).any(dim=1).sum())
    finally:
        for block, flag in zip(model.blocks, recording):
            block.record = flag
            if not flag:
                block.last = None
    return {"max_abs_error": worst, "max_rel_error": worst / scale if scale else 0.0, "mask_mismatches": mismatches}


def _fit_summary(fitted: dict, memory_mb: float) -> dict:
    """The prototypes as fitted before timing (plain figures; what the timed calls did is ``prototype_use``)."""
    keys = ("layers", "prototypes", "subconvs", "fitted_on", "source")
    summary = {k: fitted.get(k) for k in keys} if fitted else dict.fromkeys(keys)
    summary["memory_cap_mb"] = memory_mb
    summary["fitted_memory_mb"] = fitted.get("memory_mb") if fitted else None
    return summary


def kernel_floor(model: FTWTModel, images: torch.Tensor, threads: int = 1, reps: int = 3) -> dict:
    """What the engine could reach at best with PyTorch's conv kernels: per conv call, the conv on
    pre-sliced contiguous weights (a perfect cache, no bookkeeping) against the dense conv, alternated,
    best of ``reps``; and the heads alone. Sums over all (non-grouped) convs, mean per image, in ms.

    ``floor_ratio_no_heads`` = conv time reduction / conv MAC reduction: the engine's ratio cannot beat
    it; ``floor_ratio_with_heads`` charges the heads too.
    """
    images = images.detach().cpu()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    dense_us: list[float] = []
    sliced_us: list[float] = []
    head_us: list[float] = []
    macs: list[tuple[float, float]] = []  # (dense MACs, sparse MACs) per call

    def best(fn) -> float:
        times = []
        for _ in range(reps):
            start = time.perf_counter_ns()
            fn()
            times.append((time.perf_counter_ns() - start) / 1e3)
        return min(times)

    def probe(step, x, y) -> None:
        g = step.geometry
        if g.depthwise or g.groups != 1:
            return
        xd, xv = x.dense(), x.values
        rows = torch.from_numpy((y.idx[:, None] * g.in_per_group + x.idx[None, :]).ravel())
        w = g.rows.index_select(0, rows).view(y.idx.size, x.idx.size, *g.weight.shape[2:])
        b = g.bias.index_select(0, y.tidx)
        calls = [(dense_us, lambda: g.conv(xd, g.weight, g.bias))]
        calls.append((sliced_us, (lambda: g.conv(xv, w, b)) if y.idx.size and x.idx.size else (lambda: None)))
        for out, fn in calls if len(dense_us) % 2 else calls[::-1]:
            out.append(best(fn))
        head_us.append(best(lambda: step.output_mask(x)))
        full = g.weight[0].numel() * g.out_channels * g.out_hw[0] * g.out_hw[1]
        macs.append((full, full * y.idx.size * x.idx.size / (g.out_channels * g.in_per_group)))

    try:
        engine = build_engine(model, tuple(images.shape[2:]), cache_mb=0.0)
        for _, step in engine.convs:
            step.probe = probe
        with torch.inference_mode():
            for image in images:
                engine(image[None])
    finally:
        torch.set_num_threads(previous_threads)
    n = len(images)
    dense_ms, sliced_ms, heads_ms = sum(dense_us) / n / 1e3, sum(sliced_us) / n / 1e3, sum(head_us) / n / 1e3
    mac_reduction = 1.0 - sum(s for _, s in macs) / sum(d for d, _ in macs)
    return {
        "samples": n,
        "conv_dense_ms": dense_ms,
        "conv_sliced_ms": sliced_ms,
        "heads_ms": heads_ms,
        "conv_mac_reduction_pct": 100.0 * mac_reduction,
        "conv_time_reduction_pct": 100.0 * (1.0 - sliced_ms / dense_ms),
        "floor_ratio_no_heads": (1.0 - sliced_ms / dense_ms) / mac_reduction if mac_reduction > 0 else float("nan"),
        "floor_ratio_with_heads": (1.0 - (sliced_ms + heads_ms) / dense_ms) / mac_reduction if mac_reduction > 0 else float("nan"),
    }


def _quantile(values: list[float], q: float) -> float:
    return float(torch.tensor(values).quantile(q))
