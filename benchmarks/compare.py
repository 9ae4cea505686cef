"""Does FTWT win? Dense, FTWT and the static baselines side by side at one FLOPs budget (paper Tables 1 and 6).

Everything runs through the real CLI (``python -m ftwt_cli train/eval``, this tree's code), one
subprocess per run, on real CIFAR-10 images (cifar10-mini) with ResNet20:

1. ``dense``: trained once with the dense recipe and cached under ``--checkpoint-dir``;
2. from it, at ``--target-flops P`` and the same fine-tuning epochs each:
   ``ftwt`` (decoupled FTWT, r searched for P), ``static-uniform`` and ``static-taylor``
   (torch-pruning), ``signature-dynamic`` (the Taylor baseline's per-layer counts, routed per sample)
   and ``signature-static`` (the same counts, one fixed filter set);
3. one ``ftwt eval --compare`` over every run's ``best.pt`` (chosen on held-out training images, never
   on the test split; for FTWT the budget-calibrated model): top-1, FLOPs reduction measured against
   the dense model, Brier score clean, at blur σ and noise σ.

    python benchmarks/compare.py [--quick] [--json] [--model resnet20] [--target-flops 50]

``--json`` prints ``{"rows": [{"method", "flops_reduction_pct", "top1", ...}], ...}``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this tree's ftwt_cli, not an installed one

from _common import CIFAR10_MINI  # noqa: E402 - benchmarks/ is on sys.path when run as a script
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
METHODS = ("ftwt", "static-uniform", "static-taylor", "signature-dynamic", "signature-static")
#: The paper's claim this benchmark checks: FTWT top-1 at least this many points above static uniform.
GOAL_POINTS = 2.0

console = Console(stderr=True)


def method_args(method: str, target: float) -> list[str]:
    p = f"{target:g}"
    return {
        "ftwt": ["--target-flops", p],
        "static-uniform": ["--static", "uniform", "--target-flops", p],
        "static-taylor": ["--static", "taylor", "--target-flops", p],
        "signature-dynamic": ["--signature", "taylor", "--target-flops", p],
        "signature-static": ["--signature", "taylor", "--static-signature", "--target-flops", p],
    }[method]


def ftwt(*args: str) -> dict:
    """Run one ftwt command with this tree's code; its --json document (stderr streams through)."""
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run(
        [sys.executable, "-m", "ftwt_cli", *args, "--json"], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True
    )
    if done.returncode != 0:
        raise SystemExit(f"ftwt {' '.join(args[:3])} ... failed with exit code {done.returncode}")
    return json.loads(done.stdout)


def finished(run_dir: Path, epochs: int) -> bool:
    """A run directory whose last.pt holds all ``epochs`` (last.pt is rewritten after every epoch)."""
    from ftwt_cli.io.checkpoint import load_checkpoint

    last = run_dir / "last.pt"
    return last.is_file() and load_checkpoint(last)["meta"].get("epoch") == epochs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="minutes: dense 10 epochs, 3 fine-tuning epochs each")
    parser.add_argument("--json", action="store_true", help="one JSON document on stdout")
    parser.add_argument(
        "--profile", default="quickstart", help="recipe fields the options below do not set (momentum, wd, head lr)"
    )
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--data", default=f"imagefolder:{CIFAR10_MINI}")
    parser.add_argument("--target-flops", type=float, default=50.0)
    parser.add_argument("--dense-epochs", type=int, help="default: 10 quick, 40 full")
    parser.add_argument("--epochs", type=int, help="fine-tuning epochs of every method (default: 3 quick, 15 full)")
    parser.add_argument(
        "--samples", type=int, default=0, help="cap on training images of the fine-tuning runs (0: all)"
    )
    parser.add_argument("--blur-sigma", type=float, default=0.9)
    parser.add_argument("--noise-sigma", type=float, default=0.11)
    parser.add_argument("--methods", default=",".join(METHODS), help="comma list, subset of " + ",".join(METHODS))
    parser.add_argument(
        "--checkpoint-dir", default=str(REPO / "runs" / "compare"), help="run directories; the dense one is reused"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    data_dir = args.data.partition(":")[2]
    if args.data.startswith("imagefolder:") and not Path(data_dir).is_dir():
        raise SystemExit(f"no images at {data_dir} (set FTWT_CIFAR10_MINI or pass --data)")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
    dense_epochs = args.dense_epochs or (10 if args.quick else 40)
    epochs = args.epochs or (3 if args.quick else 15)
    common = ["--profile", args.profile, "--model", args.model, "--data", args.data, "--seed", str(args.seed)]
    common += ["--workers", "0"]
    root = Path(args.checkpoint_dir) / f"{args.model}-d{dense_epochs}-s{args.seed}"
    started = time.perf_counter()

    dense_dir = root / "dense"
    dense_ckpt = dense_dir / "best.pt"
    if not finished(dense_dir, dense_epochs):
        if dense_dir.exists():
            raise SystemExit(f"{dense_dir} holds an unfinished run; remove it or finish it with 'ftwt train --resume'")
        console.print(f"[bold]dense[/bold]: {dense_epochs} epochs → {dense_dir}")
        milestones = f"{max(1, dense_epochs // 2)},{max(1, dense_epochs * 3 // 4)}"
        recipe = ["--epochs", str(dense_epochs), "--lr", "0.1", "--milestones", milestones]
        ftwt("train", *common, "--dense", *recipe, "--out", str(dense_dir))
    else:
        console.print(f"dense: reusing {dense_ckpt}")

    tag = f"p{args.target_flops:g}-e{epochs}" + (f"-n{args.samples}" if args.samples else "")
    checkpoints: dict[str, Path] = {}
    train_summaries: dict[str, dict] = {}
    for method in methods:
        run_dir = root / f"{method}-{tag}"
        if not finished(run_dir, epochs):
            if run_dir.exists():
                raise SystemExit(f"{run_dir} holds an unfinished run; remove it or finish it ('ftwt train --resume')")
            console.print(f"[bold]{method}[/bold]: {epochs} epochs → {run_dir}")
            train_summaries[method] = ftwt(
                "train", *common, *method_args(method, args.target_flops), "--init", str(dense_ckpt),
                "--epochs", str(epochs), "--milestones", str(max(1, epochs * 3 // 4)),
                *(["--samples", str(args.samples)] if args.samples else []), "--out", str(run_dir),
            )  # fmt: skip
        checkpoints[method] = run_dir / "best.pt"

    console.print("[bold]eval[/bold]: every model on the test split, clean and perturbed")
    compare = [a for m in methods for a in ("--compare", str(checkpoints[m]))]
    report = ftwt(
        "eval", *common, "--checkpoint", str(dense_ckpt), *compare,
        "--blur-sigmas", f"{args.blur_sigma:g}", "--noise-sigmas", f"{args.noise_sigma:g}",
    )  # fmt: skip
    rows = []
    for method, model in zip(["dense", *methods], report["models"]):
        brier = {(p["perturbation"], p["sigma"]): p for p in model.get("brier", [])}
        blur = brier.get(("blur", args.blur_sigma), {})
        noise = brier.get(("noise", args.noise_sigma), {})
        rows.append(
            {
                "method": method,
                "label": model["label"],
                "flops_reduction_pct": model["flops_reduction_pct"],
                "flops_reduction_with_heads_pct": model.get("flops_reduction_with_heads_pct"),
                "top1": model["top1"],
                "brier_clean": model["brier_clean"],
                f"brier_blur_{args.blur_sigma:g}": blur.get("brier"),
                f"top1_blur_{args.blur_sigma:g}": blur.get("top1"),
                f"brier_noise_{args.noise_sigma:g}": noise.get("brier"),
                f"top1_noise_{args.noise_sigma:g}": noise.get("top1"),
                "checkpoint": str(dense_ckpt if method == "dense" else checkpoints[method]),
            }
        )
    by_method = {r["method"]: r for r in rows}
    verdict = None
    if "ftwt" in by_method and "static-uniform" in by_method:
        gap = by_method["ftwt"]["top1"] - by_method["static-uniform"]["top1"]
        flops_gap = by_method["ftwt"]["flops_reduction_pct"] - by_method["static-uniform"]["flops_reduction_pct"]
        verdict = {
            "ftwt_minus_static_uniform_top1": gap,
            "ftwt_minus_static_uniform_flops_reduction": flops_gap,
            "goal_points": GOAL_POINTS,
            "holds": gap >= GOAL_POINTS,
        }

    title = f"{args.model} on {Path(data_dir).name or args.data}: dense {dense_epochs} epochs, methods {epochs} epochs"
    columns = ["FLOPs ↓ %", "top-1 %", "Brier clean"]
    columns += [f"Brier blur {args.blur_sigma:g}", f"Brier noise {args.noise_sigma:g}"]
    table = Table("method", *columns, title=f"{title}, target {args.target_flops:g}%")
    fmt = lambda v: "–" if v is None else f"{v:.4f}"  # noqa: E731
    for r in rows:
        table.add_row(
            r["method"], f"{r['flops_reduction_pct']:.2f}", f"{r['top1']:.2f}", fmt(r["brier_clean"]),
            fmt(r[f"brier_blur_{args.blur_sigma:g}"]), fmt(r[f"brier_noise_{args.noise_sigma:g}"]),
        )  # fmt: skip
    console.print(table)
    if verdict:
        console.print(
            f"FTWT − static uniform: {verdict['ftwt_minus_static_uniform_top1']:+.2f} points top-1 "
            f"(goal ≥ {GOAL_POINTS:g}: {'holds' if verdict['holds'] else 'not met'}), at "
            f"{verdict['ftwt_minus_static_uniform_flops_reduction']:+.2f} points FLOPs reduction"
        )
    if args.json:
        document = {
            "model": args.model,
            "data": args.data,
            "target_flops": args.target_flops,
            "dense_epochs": dense_epochs,
            "epochs": epochs,
            "samples": args.samples,
            "rows": rows,
            "verdict": verdict,
            "train": train_summaries,
            "wall_s": time.perf_counter() - started,
        }
        print(json.dumps(document, indent=2))


if __name__ == "__main__":
    main()
