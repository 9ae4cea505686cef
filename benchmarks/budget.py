"""Budget fidelity: does ``ftwt train --target-flops P`` deliver P % fewer FLOPs, measured?

On cifar10-mini (real CIFAR-10 images), with a dense ResNet20 (trained here, cached under
``--checkpoint-dir``, or ``--init FILE``), for every target P and every head variant:

1. ``ftwt search`` picks r for P (the estimate, from the dense model's ground truth);
2. ``ftwt train --target-flops P`` trains decoupled FTWT (the profile's recipe, ``--epochs``), then
   calibrates best.pt's heads on held-out training images;
3. the test split measures, heads' MACs included: the reduction of the raw heads and of the calibrated
   heads, top-1 of each, and per layer the distinct masks and the heads' precision / recall.

Goals: |P − reached| ≤ 2 points raw and ≤ 1 point calibrated; calibration costs ≤ 1
point of top-1. Every figure comes from the same run, on this machine.

    python benchmarks/budget.py --quick --json [--init dense.pt] [--targets 30,50] [--variants paper,norm]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

import pandas as pd
import torch
from _common import CIFAR10_MINI  # noqa: E402 - benchmarks/ is on sys.path when run as a script
from rich.console import Console
from rich.table import Table

from ftwt_cli.io.config import resolve
from ftwt_cli.workflows import train as training
from ftwt_cli.workflows.train.spec import LAYERS_FILE, METRICS_FILE

console = Console(stderr=True)
GOAL_RAW, GOAL_CALIBRATED, GOAL_TOP1_COST = 2.0, 1.0, 1.0

#: Head variants: config overrides of the FTWT run (the causes the budget investigation tested).
VARIANTS = {
    "paper": {},  # GMP → softmax → 1×1 conv, the paper's head
    "avg-pool": {"head_pool": "avg"},  # what the authors' public code does
    "no-softmax": {"head_softmax": False},
    "norm": {"head_norm": True},  # softmax, then per-channel standardisation (folded at inference)
    "paper+warmup": {"head_warmup": 1},  # heads trained one epoch on the frozen backbone before masking
    "norm+warmup": {"head_norm": True, "head_warmup": 1},
}


def dense_checkpoint(args, base: dict) -> tuple[str, float | None]:
    """The dense ResNet20 FTWT starts from: --init, a cached one, or one trained now (cached)."""
    if args.init:
        return args.init, None
    cache = Path(args.checkpoint_dir) / f"{args.model}-dense-{args.dense_epochs}ep"
    if not (cache / "best.pt").is_file():
        milestones = [max(1, args.dense_epochs // 2), max(1, 3 * args.dense_epochs // 4)]
        cfg = resolve("resnet56-cifar10", **base, dense_epochs=args.dense_epochs, dense_milestones=milestones)
        console.print(f"training the dense {args.model} ({args.dense_epochs} epochs) → {cache}")
        training.train(training.RunSpec(cfg, "dense"), out=str(cache))
    history = pd.read_csv(cache / METRICS_FILE)
    return str(cache / "best.pt"), float(history["test_top1"].iloc[-1])


def run_target(args, base: dict, init: str, target: float, variant: str, out: Path) -> dict:
    cfg = resolve("resnet56-cifar10", **base, **VARIANTS[variant], epochs=args.epochs, milestones=[max(1, args.epochs * 2 // 3)])
    summary = training.train(training.RunSpec(cfg, "ftwt", init=init, target_flops=target), out=str(out))
    calibration = summary.calibration or {}
    layers = pd.read_csv(out / LAYERS_FILE)
    last = layers[layers["epoch"] == layers["epoch"].max()]
    # best.pt (the epoch the held-out split chose) on the test split, before and after calibration
    raw, tuned = last[last["split"] == "best-raw"], last[last["split"] == "best-calibrated"]
    return {
        "target_pct": target,
        "variant": variant,
        "r": summary.r,
        "estimate_pct": summary.estimate["estimated_reduction_pct"],
        "reached_raw_pct": calibration.get("test_reduction_raw_pct"),
        "reached_trained_pct": calibration.get("test_reduction_trained_pct"),
        "reached_calibrated_pct": calibration.get("test_reduction_calibrated_pct"),
        "top1_raw": calibration.get("test_top1_raw"),
        "top1_trained": calibration.get("test_top1_trained"),
        "top1_calibrated": calibration.get("test_top1_calibrated"),
        "calibration_ratio": calibration.get("ratio"),
        "distinct_masks_raw": raw["clusters"].astype(int).tolist(),
        "distinct_masks_calibrated": tuned["clusters"].astype(int).tolist(),
        "precision_raw": raw["precision"].round(4).tolist(),
        "recall_raw": raw["recall"].round(4).tolist(),
        "keep_target": raw["target_keep_ratio"].round(4).tolist(),
        "keep_raw": raw["keep_ratio"].round(4).tolist(),
        "keep_calibrated": tuned["keep_ratio"].round(4).tolist(),
        "per_epoch_test_reduction_pct": [round(v, 2) for v in pd.read_csv(out / METRICS_FILE)["flops_reduction_with_heads_pct"]],
        "run_dir": str(out),
    }


def goals(row: dict) -> dict:
    raw, cal = row["reached_raw_pct"], row["reached_calibrated_pct"]
    return {
        "raw_within_2": raw is not None and abs(row["target_pct"] - raw) <= GOAL_RAW,
        "calibrated_within_1": cal is not None and abs(row["target_pct"] - cal) <= GOAL_CALIBRATED,
        # calibration's cost: best.pt as trained (calibrated at the freeze) vs after the final calibration
        "calibration_top1_cost_le_1": cal is not None and row["top1_trained"] - row["top1_calibrated"] <= GOAL_TOP1_COST,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shorter training (minutes per target on 2 CPU cores)")
    parser.add_argument("--json", action="store_true", help="one JSON document on stdout")
    parser.add_argument("--data", default=CIFAR10_MINI, help="cifar10-mini root (ImageFolder layout)")
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--init", default=None, help="dense checkpoint to start from (default: train one, cached)")
    parser.add_argument("--checkpoint-dir", default=".bench-cache", help="where the dense model is cached")
    parser.add_argument("--out", default=None, help="keep the FTWT run directories here (default: a temporary folder)")
    parser.add_argument("--targets", default="30,50")
    parser.add_argument("--variants", default="paper", help=f"comma list of {', '.join(VARIANTS)}")
    parser.add_argument("--epochs", type=int, default=None, help="FTWT epochs (default 12; quick 6)")
    parser.add_argument("--dense-epochs", type=int, default=None, help="dense epochs when training one (default 20; quick 12)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    args.epochs = args.epochs or (6 if args.quick else 12)
    args.dense_epochs = args.dense_epochs or (12 if args.quick else 20)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not Path(args.data, "train").is_dir():
        console.print(f"[red]error:[/red] unknown variant {unknown[0]!r}" if unknown else f"[red]error:[/red] no train/ under {args.data}")
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    base = {"model": args.model, "data": f"imagefolder:{args.data}", "workers": 0, "seed": 0}
    init, dense_top1 = dense_checkpoint(args, base)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(args.out or scratch)
        for variant in variants:
            for target in [float(t) for t in args.targets.split(",")]:
                out = root / f"{variant}-p{target:g}"
                row = run_target(args, base, init, target, variant, out)
                row["goals"] = goals(row)
                rows.append(row)
    table = Table("variant", "P", "estimate", "reached raw", "reached calibrated", "top-1 raw", "top-1 cal.", "distinct masks raw",
                  title=f"budget fidelity, {args.model} on cifar10-mini, {args.epochs} FTWT epochs (test split, heads included)")
    for row in rows:
        masks = row["distinct_masks_raw"]
        table.add_row(row["variant"], f"{row['target_pct']:g}%", f"{row['estimate_pct']:.1f}%", f"{row['reached_raw_pct']:.1f}%",
                      f"{row['reached_calibrated_pct']:.1f}%", f"{row['top1_raw']:.1f}%", f"{row['top1_calibrated']:.1f}%",
                      f"{min(masks)}–{max(masks)}")
    console.print(table)
    if args.json:
        doc = {
            "model": args.model,
            "dense_checkpoint": init,
            "dense_top1": dense_top1,
            "epochs": args.epochs,
            "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
            "goals": {"raw_points": GOAL_RAW, "calibrated_points": GOAL_CALIBRATED, "top1_cost_points": GOAL_TOP1_COST},
            "targets": rows,
        }
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
