"""Batch-1 CPU latency of the sparse engine vs the dense backbone for FTWT models at ~50 % FLOPs reduction.

For vgg16_bn and resnet56: a short dense run on cifar10-mini, then a short FTWT run at --target-flops 50,
both through the CLI (``python -m ftwt_cli train``) and cached under ``--checkpoint-dir``; then
``latency.latency_report`` with and without the weight cache. Prints FLOPs reduction, latency
reduction and their ratio (goal: ≥ 0.75); ``--json`` prints one document
``{model: {flops_reduction_pct, latency_reduction_pct, ratio, ...}}`` on stdout.

    .venv/bin/python benchmarks/latency.py --quick --json
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch

from ftwt_cli import runtime
from ftwt_cli.config import resolve
from ftwt_cli.console import console, emit_json
from ftwt_cli.latency import kernel_floor, latency_report

from _common import CIFAR10_MINI  # noqa: E402 - benchmarks/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parent.parent
DATA = f"imagefolder:{CIFAR10_MINI}"
MODELS = ("vgg16_bn", "resnet56")


def train(model: str, out: Path, extra: list[str]) -> None:
    """Run ``ftwt train`` as a subprocess unless ``out`` already holds a checkpoint."""
    if (out / "best.pt").is_file():
        console.print(f"reusing {out / 'best.pt'}")
        return
    command = [sys.executable, "-m", "ftwt_cli", "train", "--model", model, "--data", DATA, "--out", str(out), "--json", *extra]
    console.print("running " + " ".join(command))
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)


def checkpoint_for(model: str, directory: Path, epochs: int, samples: int) -> Path:
    dense, ftwt = directory / f"{model}-dense", directory / f"{model}-ftwt50"
    cap = ["--samples", str(samples)] if samples else []
    train(model, dense, ["--dense", "--epochs", str(epochs), *cap])
    train(model, ftwt, ["--init", str(dense / "best.pt"), "--target-flops", "50", "--epochs", str(epochs), *cap])
    return ftwt / "best.pt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer epochs, training images and timed samples")
    parser.add_argument("--json", action="store_true", help="one JSON document on stdout")
    parser.add_argument("--checkpoint-dir", default=str(ROOT / ".bench-cache" / "latency"), help="where runs are cached")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--samples", type=int, default=None, help="timed test images (default 200, quick 60)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache-mb", type=float, default=64.0)
    parser.add_argument("--layout-images", type=int, default=200, help="training images that fit the engine's static cores (0: none)")
    parser.add_argument("--no-calibrate", action="store_true", help="use the fixed MAC cost model instead of timing this machine")
    parser.add_argument("--floor", type=int, default=30, help="images for the kernel-floor measurement (0: skip)")
    args = parser.parse_args()
    samples = args.samples or (60 if args.quick else 200)
    epochs, train_samples = (1, 512) if args.quick else (5, 0)

    results = {}
    for name in args.models.split(","):
        path = checkpoint_for(name, Path(args.checkpoint_dir) / ("quick" if args.quick else "full"), epochs, train_samples)
        cfg = resolve(None, model=name, data=DATA)
        model = runtime.load_model(cfg, str(path), require="ftwt").model.eval()
        model.configure(mask_source="predicted", record=False)
        test = runtime.dataset(cfg, "test")
        images = torch.stack([test[i][0] for i in range(min(samples, len(test)))])
        train_set = runtime.dataset(cfg, "train")
        layout = torch.stack([train_set[i][0] for i in range(min(args.layout_images, len(train_set)))]) if args.layout_images else None
        options = dict(threads=args.threads, calibrate=not args.no_calibrate, layout_images=layout)
        report = latency_report(model, images, cache_mb=args.cache_mb, **options)
        no_cache = latency_report(model, images, cache_mb=0.0, **options)
        report["no_cache"] = {k: no_cache[k] for k in ("dense_ms", "engine_ms", "latency_reduction_pct", "ratio")}
        if args.floor:
            report["kernel_floor"] = kernel_floor(model, images[: args.floor], threads=args.threads)
        report["checkpoint"] = str(path)
        results[name] = report
        console.print(
            f"[bold]{name}[/bold]: FLOPs reduction {report['flops_reduction_pct']:.1f} %, latency reduction {report['latency_reduction_pct']:.1f} % "
            f"(dense {report['dense_ms']:.2f} ms, engine {report['engine_ms']:.2f} ms), ratio {report['ratio']:.2f}, "
            f"cache hit rate {report['cache_hit_rate']:.2f}; without cache {no_cache['latency_reduction_pct']:.1f} % "
            f"(ratio {no_cache['ratio']:.2f})"
            + (
                f"; kernel floor ratio {report['kernel_floor']['floor_ratio_no_heads']:.2f} without heads, "
                f"{report['kernel_floor']['floor_ratio_with_heads']:.2f} with heads"
                if args.floor
                else ""
            )
        )
    if args.json:
        emit_json(results)


if __name__ == "__main__":
    main()
