"""Batch-1 CPU latency, dense eager PyTorch vs the sparse engine, on FTWT models at three FLOPs levels.

Models: torchvision resnet18, resnet34 and mobilenet_v2 at 224×224 and the CIFAR vgg16_bn and resnet56
at 32×32. Per model, side by side in one run, at 1 and 2 threads (``--threads``):

* dense eager: the BN-folded backbone without heads, the faster of default and channels-last format;
* the engine with every filter kept (the dense backbone through the engine, no fallback: its overhead);
* the engine on the FTWT model at three measured FLOPs reductions near the paper's 25 / 38 / 52 %.

Masks are real: a short dense run and a short FTWT run (``python -m ftwt_cli train``, decoupled, one
epoch on a few hundred cifar10-mini images, resized to 224 for the ImageNet models), cached under
``--checkpoint-dir``. That training is tiny (2 shared CPU cores: resnet18 trains at ~10 images/s), so
the three levels come from ONE trained FTWT run per model: each level adds a uniform shift, in units of
each layer's logit spread, to every trained head's bias (the per-layer calibration offset),
bisected on training images until the measured FLOPs reduction (heads included) is near the level.
The FLOPs reduction in each ratio is the one measured on the timed images, heads included.

``--json`` prints ``{model: {flops_reduction_pct, latency_reduction_pct, ratio, ..., levels: [...]}}``:
the top-level figures are the ≈ 52 % level at one thread; ``levels`` holds every level and thread count.

    nice -n 5 .venv/bin/python benchmarks/latency.py --quick --json
"""

from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
from pathlib import Path

import torch
from _common import CIFAR10_MINI  # noqa: E402 - benchmarks/ is on sys.path when run as a script

from ftwt_cli.console import console, emit_json
from ftwt_cli.core.flops import FlopsCounter
from ftwt_cli.core.gating import FTWTModel
from ftwt_cli.engine import build_engine, folded_dense
from ftwt_cli.engine.latency import latency_report
from ftwt_cli.io import loading
from ftwt_cli.io.config import resolve

ROOT = Path(__file__).resolve().parent.parent
DATA = f"imagefolder:{CIFAR10_MINI}"
MODELS = ("vgg16_bn", "resnet56", "resnet18", "resnet34", "mobilenet_v2")
LEVELS = (25.0, 38.0, 52.0)
TRAIN_TARGET = 52  # --target-flops of the one FTWT run per model
#: Training images per run (ImageNet-size models train ~10× slower on the CPU than CIFAR ones).
TRAIN_IMAGES = {"cifar": 512, "imagenet": 256}
#: The profile the training runs use: small batches (several steps even on 256 images), heads trained
#: the whole epoch, a small test pass (accuracy is not what this benchmark measures).
PROFILE = """description = "benchmarks/latency.py: tiny training runs whose heads give real masks"
batch_size = 32
test_samples = 64
workers = 0
ratios = "0.30:1.00:0.01"
freeze_heads_after = 1.0

[dense]
lr = 0.05
milestones = [100]

[dynamic]
lr = 0.01
milestones = [100]
head_lr = 0.1
mode = "decoupled"
"""


def family(model: str) -> str:
    return "cifar" if model in ("vgg16_bn", "resnet56") else "imagenet"


def train(model: str, out: Path, extra: list[str], profiles: Path) -> None:
    """Run ``ftwt train`` as a subprocess unless ``out`` already holds a checkpoint."""
    if (out / "best.pt").is_file():
        console.print(f"reusing {out / 'best.pt'}")
        return
    command = [sys.executable, "-m", "ftwt_cli", "train", "--profile", "latency-bench", "--model", model, "--data", DATA]
    command += ["--out", str(out), "--json", *extra]
    console.print("running " + " ".join(command))
    env = dict(os.environ, FTWT_PROFILES=str(profiles))
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, env=env)


def checkpoint_for(model: str, directory: Path) -> Path:
    """The cached FTWT run for ``model`` (dense run first), trained if missing."""
    profiles = directory / "profiles"
    profiles.mkdir(parents=True, exist_ok=True)
    (profiles / "latency-bench.toml").write_text(PROFILE)
    n = TRAIN_IMAGES[family(model)]
    dense, ftwt = directory / f"{model}-dense-n{n}", directory / f"{model}-ftwt{TRAIN_TARGET}-n{n}"
    cap = ["--samples", str(n), "--epochs", "1"]
    train(model, dense, ["--dense", *cap], profiles)
    train(model, ftwt, ["--init", str(dense / "best.pt"), "--target-flops", str(TRAIN_TARGET), *cap], profiles)
    return ftwt / "best.pt"


def measured_reduction(model: FTWTModel, images: torch.Tensor) -> float:
    """FLOPs reduction (%, heads included) of the model's predicted masks on ``images``."""
    model.configure(mask_source="predicted", record=True)
    chunks = []
    with torch.no_grad():
        for chunk in images.split(16):
            model(chunk)
            chunks.append([r.mask for r in model.records()])
    masks = [torch.cat(parts) for parts in zip(*chunks)]
    model.configure(record=False)
    counter = FlopsCounter(model.graph)
    return float(counter.reduction_pct(counter.macs_from_masks(masks).mean().item(), with_heads=True))


def logit_spread(model: FTWTModel, images: torch.Tensor) -> list[torch.Tensor]:
    """Per block, the standard deviation of its head's logits on ``images`` (the unit of a level's shift)."""
    model.configure(mask_source="predicted", record=True)
    with torch.no_grad():
        model(images)
    spread = [r.logits.std().clamp_min(1e-3) for r in model.records()]
    model.configure(record=False)
    return spread


def shifted(model: FTWTModel, spread: list[torch.Tensor], shift: float) -> FTWTModel:
    """A copy whose every head's bias moves by ``shift`` × that head's logit spread (all logits alike)."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for head, unit in zip(out.heads(), spread):
            head.proj.bias.add_(shift * unit)
    return out.eval().configure(mask_source="predicted", record=False)


def at_levels(model: FTWTModel, images: torch.Tensor, levels, steps: int) -> dict[float, tuple[FTWTModel, float, float]]:
    """Per level, the shifted model whose masks on ``images`` remove about ``level`` % of the FLOPs:
    bisection on the shift (more shift keeps more), evaluations shared between levels."""
    spread = logit_spread(model, images)
    evaluated: dict[float, tuple[FTWTModel, float]] = {}

    def at(shift: float) -> tuple[FTWTModel, float]:
        if shift not in evaluated:
            candidate = shifted(model, spread, shift)
            evaluated[shift] = (candidate, measured_reduction(candidate, images))
        return evaluated[shift]

    found = {}
    for level in levels:
        low, high = -3.0, 3.0
        for _ in range(steps):
            mid = (low + high) / 2
            if at(mid)[1] > level:
                low = mid
            else:
                high = mid
        shift = min((s for s in evaluated), key=lambda s: abs(evaluated[s][1] - level))
        found[level] = (evaluated[shift][0], shift, evaluated[shift][1])
    return found


def check_exact(model: FTWTModel, images: torch.Tensor) -> dict:
    """The engine (every layer sparse) against the gated model, image by image: the largest output
    difference, absolute and relative to the output's scale, and how many block masks differ (a head
    logit within float rounding of 0 can flip; its |logit| is reported)."""
    engine = build_engine(model, cache_mb=0.0)
    model.configure(record=True)
    worst, scale, mismatches, tie = 0.0, 0.0, 0, float("inf")
    with torch.no_grad():
        for image in images:
            got, expected = engine(image[None]), model(image[None])
            worst, scale = max(worst, (got - expected).abs().max().item()), max(scale, expected.abs().max().item())
            for engine_mask, record in zip(engine.block_masks(), model.records()):
                differ = engine_mask != record.mask[0].bool()
                if differ.any():
                    mismatches += 1
                    tie = min(tie, record.logits[0][differ].abs().max().item())
    model.configure(record=False)
    return {
        "max_abs_error": worst,
        "max_rel_error": worst / scale if scale else 0.0,
        "mask_mismatches": mismatches,
        "mismatch_max_abs_logit": tie if mismatches else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer timed and calibration images (same input sizes, same training)")
    parser.add_argument("--json", action="store_true", help="one JSON document on stdout")
    parser.add_argument("--checkpoint-dir", default=str(ROOT / ".bench-cache" / "latency"), help="where training runs are cached")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--samples", type=int, default=None, help="timed test images (default 100, quick 12)")
    parser.add_argument("--threads", default="1,2", help="comma list of thread counts")
    parser.add_argument("--cache-mb", type=float, default=64.0)
    parser.add_argument("--levels", default=",".join(f"{level:g}" for level in LEVELS), help="comma list of FLOPs levels (%%)")
    parser.add_argument("--no-calibrate", action="store_true", help="skip timing the per-call cost model (the per-layer choice is still measured)")
    parser.add_argument("--train-only", action="store_true", help="train (or reuse) the checkpoints and stop")
    args = parser.parse_args()
    samples = args.samples or (12 if args.quick else 100)
    layout_count, bisect_images, bisect_steps = (8, 8, 5) if args.quick else (64, 32, 8)
    threads = [int(t) for t in args.threads.split(",")]
    levels_wanted = [float(level) for level in args.levels.split(",")]
    models = args.models.split(",")
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")

    directory = Path(args.checkpoint_dir)
    paths = {name: checkpoint_for(name, directory) for name in models}
    if args.train_only:
        return
    results = {}
    for name in models:
        cfg = resolve(None, model=name, data=DATA)
        model = loading.load_model(cfg, str(paths[name]), require="ftwt").model.eval()
        test, train_set = loading.dataset(cfg, "test"), loading.dataset(cfg, "train")
        images = torch.stack([test[i][0] for i in range(min(samples, len(test)))])
        layout = torch.stack([train_set[i][0] for i in range(min(layout_count, len(train_set)))])
        size = tuple(images.shape[2:])
        dense = folded_dense(model, size)  # the same weights without heads: every filter kept
        levels = []
        for level, (leveled, shift, calibrated) in at_levels(model, layout[:bisect_images], levels_wanted, bisect_steps).items():
            exactness = check_exact(leveled, images[:4])
            error = exactness["max_abs_error"]
            for count in threads:
                report = latency_report(
                    leveled, images, threads=count, cache_mb=args.cache_mb, warmup=4 if args.quick else 10,
                    layout_images=layout, calibrate=not args.no_calibrate,
                )
                report.update(level=level, logit_shift=shift, calibration_reduction_pct=calibrated, **exactness)
                levels.append(report)
                console.print(
                    f"[bold]{name}[/bold] {size[0]}×{size[1]} level {level:g} %, {count} thread(s): FLOPs ↓ {report['flops_reduction_pct']:.1f} %, "
                    f"latency ↓ {report['latency_reduction_pct']:.1f} % (dense {report['dense_ms']:.2f} ms, engine {report['engine_ms']:.2f} ms), "
                    f"ratio {report['ratio']:.2f}; sparse layers {report['sparse_layer_count']}/{report['conv_layer_count']}"
                    f"{', whole-engine fallback' if report['fallback'] else ''}; max |engine − gated| {error:.1e} "
                    f"(relative {exactness['max_rel_error']:.1e}, {exactness['mask_mismatches']} mask(s) differ)"
                )
        kept = {}
        for count in threads:
            every = latency_report(
                dense, images, threads=count, cache_mb=args.cache_mb, warmup=4 if args.quick else 10,
                fallback=False, calibrate=not args.no_calibrate,
            )
            kept[str(count)] = {k: every[k] for k in ("dense_ms", "engine_ms", "latency_reduction_pct", "dense_channels_last")}
            console.print(f"[bold]{name}[/bold] every filter kept, {count} thread(s): dense {every['dense_ms']:.2f} ms, engine {every['engine_ms']:.2f} ms")
        top = min((r for r in levels if r["threads"] == threads[0]), key=lambda r: abs(r["flops_reduction_pct"] - 52.0))
        results[name] = {
            **{k: top[k] for k in ("flops_reduction_pct", "latency_reduction_pct", "ratio", "dense_ms", "engine_ms", "threads", "fallback", "sparse_layers", "dense_channels_last", "level", "max_abs_error", "max_rel_error", "mask_mismatches")},
            "input_size": list(size),
            "checkpoint": str(paths[name]),
            "every_filter_kept": kept,
            "levels": levels,
        }
    if args.json:
        emit_json(results)


if __name__ == "__main__":
    main()
