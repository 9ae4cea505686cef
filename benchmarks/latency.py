"""CPU latency of the sparse engine against dense eager PyTorch and the static model a user would pick
instead, on FTWT models at three FLOPs levels, batch 1 (one and two threads) and batched.

Models: torchvision resnet18, resnet34 and mobilenet_v2 at 224×224 and the CIFAR vgg16_bn and resnet56
at 32×32. Per model and level, side by side in one run, interleaved image by image:

* dense eager: the BN-folded backbone without heads, the faster of default and channels-last format;
* static: the torch-pruning static-uniform model at the FLOPs reduction the FTWT model reaches on the
  timed images (its faster format too);
* the engine on the FTWT model (heads, pre-sliced sub-networks fitted on held-out training images).

Masks are real (see ``_latency_models.py``): heads trained by ``ftwt train`` (head-only warm-up on the
frozen backbone, then epochs until the head loss stops falling) and calibrated by ``ftwt calibrate`` to
each level; the same with ``--head-norm`` for the distinct-mask comparison. Cached under
``--checkpoint-dir`` and reused on the next run. Reported per level: latency reduction ÷ FLOPs reduction
against dense, engine ÷ static latency, medians and p90, the distinct masks per layer on the timed
images (default head and head-norm), prototype coverage, extra MACs and memory, the engine's largest
difference from the gated model; at the level nearest 50 %, batched throughput at ``--batch-sizes``.

``--json`` prints ``{model: {flops_reduction_pct, latency_reduction_pct, ratio, dense_ms, engine_ms,
static_ms, static_flops_reduction_pct, engine_over_static, ..., levels: [...], batched: {...}}, "goals":
{...}, "run": {wall_s, cli_wall_s, cli_cpu_s}}``: each model's top-level figures are its level nearest
52 % at the first thread count.

    python benchmarks/latency.py --quick --json > latency.json
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from _common import CIFAR10_MINI
from _latency_models import SPENT, TRAIN_TARGET, family, static_model, trained

from ftwt_cli.console import console, emit_json
from ftwt_cli.core.flops import FlopsCounter
from ftwt_cli.core.gating import FTWTModel
from ftwt_cli.engine import DEFAULT_MEMORY_MB
from ftwt_cli.engine.latency import dense_reference, latency_report, prepared_engine
from ftwt_cli.io import loading
from ftwt_cli.io.checkpoint import load_checkpoint
from ftwt_cli.io.config import resolve

ROOT = Path(__file__).resolve().parent.parent
DATA = f"imagefolder:{CIFAR10_MINI}"
MODELS = ("vgg16_bn", "resnet56", "resnet18", "resnet34", "mobilenet_v2")
LEVELS = (25.0, 38.0, 52.0)
#: Goals at the level nearest 52 %, first thread count: latency ↓ ÷ FLOPs ↓ at least this (0: never slower).
RATIO_GOALS = {"resnet34": 0.6, "resnet18": 0.5, "vgg16_bn": 0.5, "resnet56": 0.0, "mobilenet_v2": 0.0}
STATIC_GOAL = {"resnet34": 1.15}  # engine ÷ static latency at most
BATCH_GOAL = 1.3  # batch-8 throughput ÷ dense at the level nearest 50 %
#: A level whose calibrated model misses it by more than this on the timed images is skipped (reported).
LEVEL_SLACK = 5.0
TOP_KEYS = (
    "flops_reduction_pct", "latency_reduction_pct", "ratio", "dense_ms", "engine_ms", "dense_p90_ms", "engine_p90_ms",
    "static_ms", "static_p90_ms", "static_flops_reduction_pct", "engine_over_static", "dense_with_heads_ms", "heads_cost_pct",
    "threads", "fallback", "sparse_layers",
    "dense_channels_last", "engine_channels_last", "level", "max_abs_error", "max_rel_error", "mask_mismatches",
)  # fmt: skip


def masks_on(model: FTWTModel, images: torch.Tensor) -> list[torch.Tensor]:
    """Per block, the model's masks bool [N, C] on ``images``."""
    model.configure(mask_source="predicted", record=True)
    chunks = []
    with torch.no_grad():
        for chunk in images.split(16):
            model(chunk)
            chunks.append([r.mask.bool() for r in model.records()])
    model.configure(record=False)
    return [torch.cat(parts) for parts in zip(*chunks)]


def reduction_of(model: FTWTModel, masks: list[torch.Tensor]) -> float:
    counter = FlopsCounter(model.graph)
    return float(counter.reduction_pct(counter.macs_from_masks([m.float() for m in masks]).mean().item(), with_heads=True))


def distinct(masks: list[torch.Tensor]) -> list[int]:
    return [int(torch.unique(m, dim=0).shape[0]) for m in masks]


def held_out(cfg, checkpoint: Path, count: int) -> torch.Tensor:
    """The training images the FTWT run held out (calibration and the engine's prototypes are fitted on them)."""
    meta = load_checkpoint(checkpoint)["meta"]
    held_cfg = cfg.override(**{k: meta[k] for k in ("samples", "train_samples", "val_fraction", "seed") if k in meta})
    held = loading.training_splits(held_cfg, augment=False)[1]
    return torch.stack([held[i][0] for i in range(min(count, len(held)))])


def load_ftwt(cfg, path: Path) -> FTWTModel:
    return loading.load_model(cfg, str(path), require="ftwt").model.eval().configure(mask_source="predicted", record=False)


def bench_model(name: str, args, directory: Path, levels: list[float], threads: list[int], samples: int) -> dict:
    load_before = os.getloadavg()
    runs = trained(name, directory, args.quick, levels, DATA, levels if not args.quick else [max(levels)])
    cfg = resolve(None, model=name, data=DATA)
    test = loading.dataset(cfg, "test")
    images = torch.stack([test[i][0] for i in range(min(samples, len(test)))])
    size = tuple(images.shape[2:])
    dense_loaded = loading.load_model(cfg, str(runs["dense"]), require="dense").model.eval()
    dense_state = dense_loaded.state_dict()
    any_level = next(iter(runs["default"].values()))
    layout = held_out(cfg, any_level, args.layout_images)
    batched_level = min(runs["default"], key=lambda lv: abs(lv - 50.0))
    reports, skipped = [], {}
    for level, path in sorted(runs["default"].items()):
        model = load_ftwt(cfg, path)
        masks = masks_on(model, images)
        reduction = reduction_of(model, masks)
        if abs(reduction - level) > LEVEL_SLACK:  # calibration could not reach it (the target rule's limit)
            console.print(f"[yellow]{name}: calibrated to {level:g} %, the timed images show {reduction:.1f} %: level skipped[/yellow]", markup=True)
            skipped[f"{level:g}"] = reduction
            continue
        masks_norm = masks_on(load_ftwt(cfg, runs["head_norm"][level]), images) if level in runs["head_norm"] else None
        phase = time.time()
        static, static_reduction = static_model(name, dense_state, reduction, size, directory)
        static_run, static_info = dense_reference(static, size, layout[:8])
        heads_run, _ = dense_reference(model, size, layout[:8], masked=True)  # dense plus the heads: what the heads alone cost
        console.print(f"{name} level {level:g} %: static model at {static_reduction:.1f} % ({time.time() - phase:.0f} s)", highlight=False)
        phase = time.time()
        engine = prepared_engine(model, size, layout, cache_mb=args.cache_mb, calibrate=not args.no_calibrate, memory_mb=args.engine_memory_mb)
        console.print(f"{name} level {level:g} %: engine fitted ({time.time() - phase:.0f} s): {engine.fitted}", highlight=False)
        top_level = level == min(runs["default"], key=lambda lv: abs(lv - 52.0))
        for count in threads if (top_level or not args.quick) else threads[:1]:  # --quick: more threads at ≈ 52 % only
            sizes = args.batch_sizes if (level == batched_level and count == threads[0]) else ()
            report = latency_report(
                model, images, threads=count, cache_mb=args.cache_mb, warmup=4 if args.quick else 10, layout_images=layout,
                others={"static": static_run, "dense_with_heads": heads_run}, batch_sizes=sizes, engine=engine,
                profile_images=args.profile if count == threads[0] else 0,
            )  # fmt: skip
            report["heads_cost_pct"] = 100.0 * (report["dense_with_heads_ms"] / report["dense_ms"] - 1.0)
            report.update(
                level=level, checkpoint=str(path), static_flops_reduction_pct=static_reduction,
                static_channels_last=static_info["dense_channels_last"],
                distinct_masks={"default": distinct(masks), "head_norm": distinct(masks_norm) if masks_norm is not None else None},
                head_norm_flops_reduction_pct=reduction_of(model, masks_norm) if masks_norm is not None else None,
            )  # fmt: skip
            reports.append(report)
            use = report["prototype_use"] or {}
            console.print(
                f"[bold]{name}[/bold] {size[0]}×{size[1]} level {level:g} %, {count} thread(s): FLOPs ↓ {report['flops_reduction_pct']:.1f} % "
                f"(static {static_reduction:.1f} %); dense {report['dense_ms']:.2f} ms, static {report['static_ms']:.2f} ms, "
                f"engine {report['engine_ms']:.2f} ms (p90 {report['engine_p90_ms']:.2f}); ratio {report['ratio']:.2f}, "
                f"engine ÷ static {report['engine_over_static']:.2f}; dense with the heads {report['dense_with_heads_ms']:.2f} ms "
                f"(heads {report['heads_cost_pct']:+.1f} %); {report['sparse_layer_count']}/{report['conv_layer_count']} layers sparse"
                f"{', whole-engine fallback' if report['fallback'] else ''}, {'channels-last' if report['engine_channels_last'] else 'default format'}; "
                f"prototype coverage {100 * use.get('coverage', float('nan')):.1f} %, extra MACs {use.get('extra_mac_pct', float('nan')):.2f} %, "
                f"{use.get('memory_mb', 0.0):.0f} MiB; max relative error {report['max_rel_error']:.1e}, {report['mask_mismatches']} mask(s) differ; "
                f"load {os.getloadavg()[0]:.2f}",
                highlight=False,
                markup=True,
            )
            for batch, row in (report.get("batched") or {}).items():
                console.print(f"  batch {batch}: dense {row['dense_images_per_s']:.1f} images/s, engine {row['engine_images_per_s']:.1f}, speedup {row['speedup']:.2f}×", highlight=False)
        del engine
    kept = {}
    for count in threads:
        every = latency_report(dense_loaded, images[: min(len(images), 50)], threads=count, cache_mb=args.cache_mb, warmup=4, fallback=False, calibrate=False, layout_images=layout[:8])
        kept[str(count)] = {k: every[k] for k in ("dense_ms", "engine_ms", "latency_reduction_pct", "dense_channels_last", "engine_channels_last")}
        console.print(f"[bold]{name}[/bold] every filter kept, {count} thread(s): dense {every['dense_ms']:.2f} ms, engine {every['engine_ms']:.2f} ms", highlight=False, markup=True)
    if not reports:
        return {"levels": [], "skipped_levels": skipped, "training": runs["training"], "every_filter_kept": kept}
    top = min((r for r in reports if r["threads"] == threads[0]), key=lambda r: abs(r["flops_reduction_pct"] - 52.0))
    batched = next((r["batched"] for r in reports if r.get("batched")), {})
    return {
        **{k: top.get(k) for k in TOP_KEYS},
        "input_size": list(size),
        "checkpoint": top["checkpoint"],
        "distinct_masks": top["distinct_masks"],
        "prototypes": top["prototypes"],
        "prototype_use": top["prototype_use"],
        "training": runs["training"],
        "recipe": runs["recipe"],
        "every_filter_kept": kept,
        "batched": batched,
        "levels": reports,
        "skipped_levels": skipped,
        "load_average": {"before": list(load_before), "after": list(os.getloadavg())},
    }


def goals(results: dict) -> dict:
    """Each goal of the issue against the measured figures (None where the model was not run)."""
    out = {}
    for model, goal in RATIO_GOALS.items():
        r = results.get(model) or {}
        out[f"{model}_ratio"] = None if r.get("ratio") is None else {"goal": goal, "measured": r["ratio"], "met": r["ratio"] >= goal}
    for model, goal in STATIC_GOAL.items():
        r = results.get(model) or {}
        ratio = r.get("engine_over_static")
        out[f"{model}_engine_over_static"] = None if ratio is None else {"goal": goal, "measured": ratio, "met": ratio <= goal}
    for model, r in results.items():
        row = (r.get("batched") or {}).get("8")
        if row:
            out[f"{model}_batch8_speedup"] = {"goal": BATCH_GOAL, "measured": row["speedup"], "met": row["speedup"] >= BATCH_GOAL}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--quick", action="store_true",
        help="shorter training (cached apart), fewer held-out images, 100 timed images, further thread counts at ≈ 52 %% only",
    )  # fmt: skip
    parser.add_argument("--json", action="store_true", help="one JSON document on stdout")
    parser.add_argument("--checkpoint-dir", default=str(ROOT / ".bench-cache" / "latency"), help="where training runs are cached")
    parser.add_argument("--models", default=",".join(MODELS), help="comma list of models")
    parser.add_argument("--levels", default=",".join(f"{level:g}" for level in LEVELS), help="comma list of FLOPs levels (%%)")
    parser.add_argument("--samples", type=int, default=None, help="timed test images per level (default 200, quick 100)")
    parser.add_argument("--threads", default="1,2", help="comma list of thread counts")
    parser.add_argument("--batch-sizes", default="8,32", help="batched throughput at these batch sizes ('' for none)")
    parser.add_argument("--cache-mb", type=float, default=64.0)
    parser.add_argument("--engine-memory-mb", type=float, default=DEFAULT_MEMORY_MB, help="cap on the pre-sliced sub-networks (MiB)")
    parser.add_argument("--layout-images", type=int, default=None, help="held-out images the prototypes are fitted on (default 64, quick 48)")
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="add each level's operator profile on N timed images (first thread count)")
    parser.add_argument("--no-calibrate", action="store_true", help="skip timing the per-call cost model (the per-layer choice is still measured)")
    parser.add_argument("--train-only", action="store_true", help="train (or reuse) the checkpoints and stop")
    args = parser.parse_args()
    samples = args.samples or (100 if args.quick else 200)
    args.layout_images = args.layout_images or (48 if args.quick else 64)
    threads = [int(t) for t in args.threads.split(",")]
    levels = [float(level) for level in args.levels.split(",")]
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    models = args.models.split(",")
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    if samples < 1 or min(threads) < 1 or args.engine_memory_mb <= 0 or any(b < 1 for b in args.batch_sizes):
        parser.error("--samples, --threads and --batch-sizes must be at least 1, --engine-memory-mb above 0")
    if any(not 0 < level < 100 for level in levels):
        parser.error("--levels are percents of FLOPs removed, each in (0, 100)")
    directory = Path(args.checkpoint_dir)
    console.print(f"load average before: {os.getloadavg()}; FTWT runs trained at --target-flops {TRAIN_TARGET}", highlight=False)
    start = time.time()
    if args.train_only:
        for name in models:
            trained(name, directory, args.quick, levels, DATA, levels if not args.quick else [max(levels)])
        return
    results = {name: bench_model(name, args, directory, levels, threads, samples) for name in sorted(models, key=lambda m: family(m) != "cifar")}
    summary = goals(results)
    for key, goal in summary.items():
        if goal is not None:
            console.print(f"goal {key}: {goal['measured']:.2f} (goal {goal['goal']:g}) {'met' if goal['met'] else 'NOT met'}", highlight=False)
    wall = time.time() - start
    console.print(
        f"load average after: {os.getloadavg()}; {wall:.0f} s in all, of which the CLI runs (training, calibration) "
        f"{SPENT['wall_s']:.0f} s wall, {SPENT['cpu_s']:.0f} s CPU",
        highlight=False,
    )
    if args.json:
        emit_json({**results, "goals": summary, "run": {"wall_s": wall, "cli_wall_s": SPENT["wall_s"], "cli_cpu_s": SPENT["cpu_s"]}})


if __name__ == "__main__":
    main()
