"""CPU latency of the routing engine against dense and the static model a user would pick instead, both
eager and pre-packed, on FTWT models routed among K prototypes per layer (``--codebook``, default 4).

Models: torchvision resnet18, resnet34 and mobilenet_v2 at 224×224 and the CIFAR vgg16_bn and resnet56
at 32×32. Per model and level, side by side in one run, interleaved image by image (order rotating):

* dense eager: the BN-folded backbone without heads, the faster of default and channels-last format;
* dense pre-packed: the same backbone through the engine's build (oneDNN pre-packed convs, activations
  fused): the honest reference;
* static eager and static pre-packed: the torch-pruning static-uniform model at the FLOPs reduction the
  routed model reaches on the timed images;
* the routing engine on the routed model, heads included.

The masks are real (``_latency_models.py``): heads trained by ``ftwt train`` until their loss stops
falling, then ``ftwt calibrate --codebook K`` fits K prototypes per layer to their masks at each level.
Reported per level: medians and p90, latency cut ÷ FLOPs cut against dense eager (``ratio``) and dense
pre-packed (``ratio_prepacked``), engine ÷ static eager and pre-packed, sub-network memory, the
engine's largest difference from the gated model; at the level nearest 50 %, batched throughput.

``--json`` prints ``{model: {flops_reduction_pct, ratio, ratio_prepacked, dense_ms, dense_prepacked_ms,
engine_ms, static_ms, static_prepacked_ms, engine_over_static, engine_over_static_prepacked, codebook_k,
subnet_memory_mb, batched, levels: [...]}, "goals": {...}, "run": {...}}``: each model's top-level
figures are its level nearest 52 % at the first thread count.

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
from ftwt_cli.engine.latency import dense_reference, latency_report, prepacked
from ftwt_cli.engine.scripted import routing_program
from ftwt_cli.io import loading
from ftwt_cli.io.config import resolve

ROOT = Path(__file__).resolve().parent.parent
DATA = f"imagefolder:{CIFAR10_MINI}"
MODELS = ("vgg16_bn", "resnet56", "resnet18", "resnet34", "mobilenet_v2")
LEVELS = (52.0,)
#: Goals at the level nearest 52 %, first thread count (the issue's): latency cut ÷ FLOPs cut against
#: dense pre-packed at least (0: never slower than dense eager, checked on ``ratio``).
RATIO_PREPACKED_GOALS = {"resnet34": 0.6, "resnet18": 0.6, "vgg16_bn": 0.6}
RATIO_GOALS = {"resnet34": 0.85, "resnet18": 0.85, "resnet56": 0.0, "mobilenet_v2": 0.0}
STATIC_PREPACKED_GOAL = {"resnet34": 1.10, "resnet18": 1.10}  # engine ÷ static pre-packed at most
BATCH_GOAL = {"resnet34": 1.5}  # batch-8 throughput ÷ dense eager
EXPORT_GOAL = 1.25  # the exported routing program's latency ÷ the engine's, at most
#: A level the routed model misses by more than this on the timed images is skipped (reported). Routing
#: is fitted on held-out training images; on test images its reduction can shift by several points
#: (VGG16-BN: 52 → 44.5), and the static model is built at the reduction measured on the timed images.
LEVEL_SLACK = 10.0
TOP_KEYS = (
    "flops_reduction_pct", "latency_reduction_pct", "latency_reduction_prepacked_pct", "ratio", "ratio_prepacked",
    "dense_ms", "dense_prepacked_ms", "engine_ms", "dense_p90_ms", "engine_p90_ms", "static_ms", "static_prepacked_ms",
    "static_flops_reduction_pct", "engine_over_static", "engine_over_static_prepacked", "exported_ms", "exported_over_engine", "codebook_k", "subconvs",
    "subnet_memory_mb", "prepacked", "threads", "dense_channels_last", "level", "max_abs_error", "max_rel_error",
    "mask_mismatches",
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


def bench_model(name: str, args, directory: Path, levels: list[float], threads: list[int], samples: int) -> dict:
    load_before = os.getloadavg()
    runs = trained(name, directory, args.quick, levels, DATA, args.codebook)
    cfg = resolve(None, model=name, data=DATA)
    test = loading.dataset(cfg, "test")
    images = torch.stack([test[i][0] for i in range(min(samples, len(test)))])
    size = tuple(images.shape[2:])
    dense_state = loading.load_model(cfg, str(runs["dense"]), require="dense").model.state_dict()
    batched_level = min(runs["routed"], key=lambda lv: abs(lv - 50.0)) if runs["routed"] else None
    reports, skipped = [], {}
    for level, path in sorted(runs["routed"].items()):
        model = loading.load_model(cfg, str(path), require="ftwt").model.eval().configure(mask_source="predicted", record=False)
        masks = masks_on(model, images)
        reduction = reduction_of(model, masks)
        if abs(reduction - level) > LEVEL_SLACK:
            console.print(f"{name}: routed to {level:g} %, the timed images show {reduction:.1f} %: level skipped", markup=False)
            skipped[f"{level:g}"] = reduction
            continue
        static, static_reduction = static_model(name, dense_state, reduction, size, directory)
        static_eager, static_info = dense_reference(static, size, images[:8])
        # the routing program `ftwt export --format torchscript` writes, timed beside the engine
        others = {"static": static_eager, "static_prepacked": prepacked(static, size), "exported": routing_program(model)}
        for count in threads:
            sizes = args.batch_sizes if (level == batched_level and count == threads[0]) else ()
            report = latency_report(
                model, images, threads=count, warmup=4 if args.quick else 10, others=others, batch_sizes=sizes,
                profile_images=args.profile if count == threads[0] else 0,
            )  # fmt: skip
            report.update(
                exported_over_engine=report["exported_ms"] / report["engine_ms"],
                level=level, checkpoint=str(path), static_flops_reduction_pct=static_reduction,
                static_channels_last=static_info["dense_channels_last"], load_average=list(os.getloadavg()),
                distinct_masks=[int(torch.unique(m, dim=0).shape[0]) for m in masks],
            )  # fmt: skip
            reports.append(report)
            console.print(
                f"{name} {size[0]}×{size[1]} level {level:g} %, {count} thread(s), K = {report['codebook_k']}: FLOPs ↓ "
                f"{report['flops_reduction_pct']:.1f} % (static {static_reduction:.1f} %); ms: dense {report['dense_ms']:.2f}, "
                f"dense pre-packed {report['dense_prepacked_ms']:.2f}, static {report['static_ms']:.2f}, static pre-packed "
                f"{report['static_prepacked_ms']:.2f}, engine {report['engine_ms']:.2f} (p90 {report['engine_p90_ms']:.2f}), "
                f"exported {report['exported_ms']:.2f}; "
                f"ratio {report['ratio']:.2f} (pre-packed {report['ratio_prepacked']:.2f}); engine ÷ static "
                f"{report['engine_over_static']:.2f} (pre-packed {report['engine_over_static_prepacked']:.2f}); "
                f"{report['subconvs']} sub-convs, {report['subnet_memory_mb']:.0f} MiB; max relative error "
                f"{report['max_rel_error']:.1e}, {report['mask_mismatches']} mask(s) differ; load {os.getloadavg()[0]:.2f}",
                markup=False, highlight=False,
            )  # fmt: skip
            for batch, row in (report.get("batched") or {}).items():
                console.print(
                    f"  batch {batch}: dense {row['dense_images_per_s']:.1f} images/s, dense pre-packed "
                    f"{row['dense_prepacked_images_per_s']:.1f}, engine {row['engine_images_per_s']:.1f}; speedup "
                    f"{row['speedup']:.2f}× (pre-packed {row['speedup_prepacked']:.2f}×)",
                    markup=False, highlight=False,
                )  # fmt: skip
    if not reports:
        return {"levels": [], "skipped_levels": skipped, "training": runs["training"]}
    top = min((r for r in reports if r["threads"] == threads[0]), key=lambda r: abs(r["flops_reduction_pct"] - 52.0))
    return {
        **{k: top.get(k) for k in TOP_KEYS},
        "input_size": list(size),
        "checkpoint": top["checkpoint"],
        "distinct_masks": top["distinct_masks"],
        "training": runs["training"],
        "recipe": runs["recipe"],
        "batched": next((r["batched"] for r in reports if r.get("batched")), {}),
        "levels": reports,
        "skipped_levels": skipped,
        "load_average": {"before": list(load_before), "after": list(os.getloadavg())},
    }


def goals(results: dict) -> dict:
    """Each goal of the issue against the measured figures (None where the model was not run)."""
    out = {}

    def check(key, measured, goal, at_least: bool):
        out[key] = None if measured is None else {"goal": goal, "measured": measured, "met": measured >= goal if at_least else measured <= goal}

    for model, goal in RATIO_PREPACKED_GOALS.items():
        check(f"{model}_ratio_prepacked", (results.get(model) or {}).get("ratio_prepacked"), goal, True)
    for model, goal in RATIO_GOALS.items():
        check(f"{model}_ratio", (results.get(model) or {}).get("ratio"), goal, True)
    for model, goal in STATIC_PREPACKED_GOAL.items():
        check(f"{model}_engine_over_static_prepacked", (results.get(model) or {}).get("engine_over_static_prepacked"), goal, False)
    for model, r in results.items():
        if isinstance(r, dict) and r.get("exported_over_engine") is not None:
            check(f"{model}_exported_over_engine", r["exported_over_engine"], EXPORT_GOAL, False)
    for model, goal in BATCH_GOAL.items():
        row = ((results.get(model) or {}).get("batched") or {}).get("8")
        check(f"{model}_batch8_speedup", row["speedup"] if row else None, goal, True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shorter training (cached apart), 100 timed images, one thread")
    parser.add_argument("--json", action="store_true", help="one JSON document on stdout")
    parser.add_argument("--checkpoint-dir", default=str(ROOT / ".bench-cache" / "latency"), help="where training runs are cached")
    parser.add_argument("--models", default=",".join(MODELS), help="comma list of models")
    parser.add_argument("--levels", default=",".join(f"{level:g}" for level in LEVELS), help="comma list of FLOPs levels (%%)")
    parser.add_argument("--codebook", type=int, default=4, metavar="K", help="prototypes per layer the models route among")
    parser.add_argument("--samples", type=int, default=None, help="timed test images per level (default 200, quick 100)")
    parser.add_argument("--threads", default=None, help="comma list of thread counts (default 1,2; quick 1)")
    parser.add_argument("--batch-sizes", default="8,32", help="batched throughput at these batch sizes ('' for none)")
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="add each level's operator profile on N timed images (first thread count)")
    parser.add_argument("--train-only", action="store_true", help="train (or reuse) the checkpoints and stop")
    args = parser.parse_args()
    samples = args.samples or (100 if args.quick else 200)
    threads = [int(t) for t in (args.threads or ("1" if args.quick else "1,2")).split(",")]
    levels = [float(level) for level in args.levels.split(",")]
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    models = args.models.split(",")
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    if samples < 1 or min(threads) < 1 or args.codebook < 1 or any(b < 1 for b in args.batch_sizes):
        parser.error("--samples, --threads, --codebook and --batch-sizes must be at least 1")
    if any(not 0 < level < 100 for level in levels):
        parser.error("--levels are percents of FLOPs removed, each in (0, 100)")
    directory = Path(args.checkpoint_dir)
    console.print(f"load average before: {os.getloadavg()}; FTWT runs trained at --target-flops {TRAIN_TARGET}, routed with K = {args.codebook}", highlight=False)
    start = time.time()
    ordered = sorted(models, key=lambda m: family(m) != "cifar")
    if args.train_only:
        for name in ordered:
            trained(name, directory, args.quick, levels, DATA, args.codebook)
        return
    results = {name: bench_model(name, args, directory, levels, threads, samples) for name in ordered}
    summary = goals(results)
    for key, goal in summary.items():
        if goal is not None:
            console.print(f"goal {key}: {goal['measured']:.2f} (goal {goal['goal']:g}) {'met' if goal['met'] else 'NOT met'}", highlight=False)
    wall = time.time() - start
    console.print(
        f"load average after: {os.getloadavg()}; {wall:.0f} s in all, of which the CLI runs (training, routing) "
        f"{SPENT['wall_s']:.0f} s wall, {SPENT['cpu_s']:.0f} s CPU",
        highlight=False,
    )
    if args.json:
        emit_json({**results, "goals": summary, "run": {"wall_s": wall, "cli_wall_s": SPENT["wall_s"], "cli_cpu_s": SPENT["cpu_s"]}})


if __name__ == "__main__":
    main()
