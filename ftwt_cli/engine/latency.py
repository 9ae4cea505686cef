"""Batch-1 CPU latency of the routing engine against dense, eager and pre-packed (the paper's Table 5).

Dense eager: the BN-folded backbone without heads or masks as a plain ``nn.Module``, in the faster of
the default and the channels-last format. Dense pre-packed: the same backbone through the engine's
own build (one pre-packed conv per layer, activations fused): the honest reference, since the
engine's speed comes partly from pre-packing. Every model (and ``others``, e.g. a static model eager
and pre-packed) runs on each image in turn, the order rotating every image, so all share the
machine's drift; medians and 90th percentiles are reported, ratios against both references.

A free-mask model (no codebook) runs exactly as its dense convs with the heads' masks multiplied in:
its report carries ``note``, the one line saying it cannot be faster and the command that fixes it.
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
from ftwt_cli.engine.program import RoutingEngine, build_engine
from ftwt_cli.engine.reference import dense_fallback, folded_dense
from ftwt_cli.engine.throughput import batched_throughput

FREE_MASKS = (
    "free per-image masks cannot be faster than dense here (the weights would move on every call); "
    "route the model among K prototype sub-networks: ftwt calibrate CHECKPOINT --codebook 4 --target-flops P"
)


def _timed(fn, x: torch.Tensor) -> float:
    start = time.perf_counter_ns()
    fn(x)
    return (time.perf_counter_ns() - start) / 1e6


def dense_reference(
    model: nn.Module, input_size: tuple[int, int], images: torch.Tensor, rounds: int = 3, masked: bool = False
) -> tuple[nn.Module, dict]:
    """The BN-folded dense backbone (no heads, no masks) in its faster memory format on ``images``;
    with ``masked`` (an FTWT model), the same convs with the heads applying their masks."""
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


def prepacked(model: nn.Module, input_size: tuple[int, int], pack: bool | None = True) -> RoutingEngine:
    """The plain backbone of ``model`` (an FTWT model's heads dropped), BN folded, each conv pre-packed."""
    return build_engine(folded_dense(model, input_size), input_size, pack=pack)


def engine_summary(engine: RoutingEngine) -> dict:
    """What the engine runs: routed or masked, K, sub-convs and their memory, the kernel."""
    ks = [len(s.plan.out_sets) for s in engine.blocks if s.plan.mode == "routed"]
    return {
        "engine": "routed" if engine.routed else ("masked" if engine.blocks else "dense"),
        "codebook_k": max(ks) if ks else None,
        "subconvs": engine.subconv_count(),
        "subnet_memory_mb": engine.subnet_memory_mb(),
        "prepacked": engine.channels_last,  # oneDNN's packed kernels (else F.conv2d)
    }


def latency_report(
    model: nn.Module,
    images: torch.Tensor,
    threads: int = 1,
    warmup: int = 20,
    others: dict[str, nn.Module] | None = None,
    batch_sizes=(),
    profile_images: int = 0,
    pack: bool | None = None,
) -> dict:
    """Median batch-1 latency of dense eager, dense pre-packed and the engine over ``images`` [N, 3, H, W],
    with FLOPs measured on them. ``model``: an eval-mode FTWTModel (or a dense backbone: the identity
    case) on CPU. ``others`` (name → module) are timed beside them (``{name}_ms``, ``engine_over_{name}``);
    ``batch_sizes`` adds ``batched`` (:func:`batched_throughput`); ``profile_images`` > 0 adds
    ``op_profile``. ``flops_reduction_pct`` (the one in ``ratio``) charges the heads' MACs. For an FTWT
    model the engine's outputs and masks are compared with the gated model's (``max_rel_error``,
    ``mask_mismatches``)."""
    if images.dim() != 4 or images.shape[0] == 0:
        raise ValueError(f"images must be a non-empty [N, 3, H, W] tensor, got shape {tuple(images.shape)}")
    images = images.detach().cpu()
    size = tuple(images.shape[2:])
    gated = isinstance(model, FTWTModel)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        engine = build_engine(model, size, pack=pack)
        dense, dense_info = dense_reference(model, size, images[:8], rounds=2 if warmup else 1)
        timed = {"dense": dense, "dense_prepacked": prepacked(model, size), "engine": engine, **(others or {})}
        ms: dict[str, list[float]] = {name: [] for name in timed}
        masks: list[list[torch.Tensor]] = [[] for _ in engine.blocks]
        outputs = []
        names = list(timed)
        with torch.inference_mode():
            for i in range(warmup):
                for fn in timed.values():
                    fn(images[i % len(images)][None])
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
        batched = batched_throughput({"dense": dense, "dense_prepacked": timed["dense_prepacked"], "engine": engine}, images, batch_sizes) if batch_sizes else None
        profiled = op_profile(timed, images[:profile_images]) if profile_images > 0 else None
    finally:
        torch.set_num_threads(previous_threads)

    median = {name: statistics.median(v) for name, v in ms.items()}
    exactness: dict = {}
    if gated:
        counter = FlopsCounter(model.graph)
        stacked = [torch.stack(m) for m in masks]
        macs = counter.macs_from_masks(stacked).mean().item()
        flops_reduction = float(counter.reduction_pct(macs, with_heads=True))
        flops_no_heads = float(counter.reduction_pct(macs))
        exactness = against_gated(model, images, torch.cat(outputs), stacked)
    else:
        flops_reduction = flops_no_heads = 0.0

    def cut(reference: str) -> float:
        return 100.0 * (1.0 - median["engine"] / median[reference])

    report = {
        "samples": len(images),
        "threads": threads,
        "warmup": warmup,
        **{f"{name}_ms": median[name] for name in ("dense", "dense_prepacked", "engine")},
        **{f"{name}_p90_ms": _quantile(ms[name], 0.9) for name in ("dense", "dense_prepacked", "engine")},
        "latency_reduction_pct": cut("dense"),
        "latency_reduction_prepacked_pct": cut("dense_prepacked"),
        "flops_reduction_pct": flops_reduction,
        "flops_reduction_no_heads_pct": flops_no_heads,
        "ratio": cut("dense") / flops_reduction if flops_reduction > 0 else float("nan"),
        "ratio_prepacked": cut("dense_prepacked") / flops_reduction if flops_reduction > 0 else float("nan"),
        **engine_summary(engine),
        **dense_info,
        **exactness,
        "dense_reference": "backbone without heads, BN folded: eager (faster of default/channels-last) and pre-packed (oneDNN, activations fused)",
    }
    if gated and not engine.routed:
        report["note"] = FREE_MASKS
    for name in others or {}:
        report.update({f"{name}_ms": median[name], f"{name}_p90_ms": _quantile(ms[name], 0.9), f"engine_over_{name}": median["engine"] / median[name]})
    if batched is not None:
        report["batched"] = batched
    if profiled is not None:
        report["op_profile"] = profiled
    return report


def op_profile(models: dict, images: torch.Tensor, top: int = 12) -> dict:
    """Where each model's batch-1 time goes: per model (name → callable on a [1, 3, H, W] input), the
    profiler's self CPU time per image and its ``top`` operators (ms and calls per image), each model
    profiled alone after one warm-up image. The profiler's overhead inflates small operators; the
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
    whose masks differ (a near-tie of two prototypes can flip under float rounding)."""
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
                    mismatches += int((record.mask.bool() != mask[chunk]).any(dim=1).sum())
    finally:
        for block, flag in zip(model.blocks, recording):
            block.record = flag
            if not flag:
                block.last = None
    return {"max_abs_error": worst, "max_rel_error": worst / scale if scale else 0.0, "mask_mismatches": mismatches}


def _quantile(values: list[float], q: float) -> float:
    return float(torch.tensor(values).quantile(q))
