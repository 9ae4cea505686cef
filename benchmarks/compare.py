"""Does FTWT win? Dense, FTWT, its variants and the static baselines side by side at one FLOPs budget.

Everything runs through the real CLI (``python -m ftwt_cli train/eval``, this tree's code), one
subprocess per run, on real CIFAR-10 images (cifar10-mini) with ResNet20:

1. ``dense``: trained once with the dense recipe and cached under ``--checkpoint-dir``;
2. from it, at ``--target-flops P`` and the same fine-tuning epochs each, every method of ``--methods``
   (see ``METHODS``: ``ftwt``, static baselines, signatures, and FTWT variants such as ``ftwt-kd`` or
   ``ftwt-codebook-4``), once per seed of ``--seeds``;
3. per seed, one ``ftwt eval --compare`` over every run's ``best.pt`` (chosen on held-out training
   images, never on the test split): top-1, FLOPs reduction measured against the dense model, Brier score
   clean, at blur σ and noise σ.

Protocols: ``--quick`` (dense 10 epochs, 3 fine-tuning epochs) and ``--full`` (dense 40 epochs, 15
fine-tuning epochs, seeds 0,1,2 for ``ftwt`` and ``static-uniform`` unless ``--methods`` says more).
With several seeds each row holds seed means (``top1_seeds``: each seed's top-1) and ``paired`` holds,
per method, its top-1 minus static uniform's seed by seed, the mean and a 95 % t interval.

    python benchmarks/compare.py [--quick | --full] [--json] [--methods ftwt,static-uniform,ftwt-kd] [--seeds 0,1,2]

``--json`` prints ``{"rows": [{"method", "flops_reduction_pct", "top1", ...}], "paired": {...}, ...}``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this tree's ftwt_cli, not an installed one

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from _common import CIFAR10_MINI  # noqa: E402 - benchmarks/ is on sys.path when run as a script

REPO = Path(__file__).resolve().parents[1]
#: The methods measured when --methods is not given (each a row of the paper's Tables 1 and 6).
DEFAULT_METHODS = ("ftwt", "static-uniform", "static-taylor", "signature-dynamic", "signature-static")
#: The paper's claim this benchmark checks: FTWT top-1 at least this many points above static uniform.
GOAL_POINTS = 2.0
BASELINE = "static-uniform"
#: 97.5 % quantiles of Student's t for 1..9 degrees of freedom (95 % two-sided intervals).
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262)

console = Console(stderr=True)


def method_args(method: str, target: float) -> list[str]:
    """The ``ftwt train`` options of a method; FTWT variants are ``ftwt-<variant>``."""
    p = ["--target-flops", f"{target:g}"]
    fixed = {
        "ftwt": p,
        "static-uniform": ["--static", "uniform", *p],
        "static-taylor": ["--static", "taylor", *p],
        "signature-dynamic": ["--signature", "taylor", *p],
        "signature-static": ["--signature", "taylor", "--static-signature", *p],
        "static-uniform-kd": ["--static", "uniform", *p, "--distill", "4"],
        # one difference from `ftwt` each (where the points go)
        "ftwt-internal": [*p, "--gate", "internal"],
        "ftwt-early": [*p, "--head-warmup", "1", "--freeze-heads-after", "0"],  # heads trained first, then fixed
        "ftwt-joint": [*p, "--mode", "joint"],
        "ftwt-avgpool": [*p, "--head-pool", "avg"],
        "ftwt-nosoftmax": [*p, "--no-head-softmax"],
        "ftwt-norm": [*p, "--head-norm"],
        "ftwt-bn": [*p, "--bn-reestimate"],
        "ftwt-kd": [*p, "--distill", "4"],
    }
    if method in fixed:
        return fixed[method]
    prefix, _, rest = method.partition("-codebook-")
    if rest.isdigit() and prefix.startswith("ftwt"):  # ftwt-codebook-K, ftwt-early-codebook-K, ...
        return [*method_args(prefix, target), "--codebook", rest]
    if method.startswith("ftwt-") and "+" in method:  # combinations: ftwt-early+kd
        parts = method[len("ftwt-"):].split("+")
        return [a for i, part in enumerate(parts) for a in (method_args(f"ftwt-{part}", target)[2 * (i > 0):])]
    raise SystemExit(f"unknown method {method!r}; known: {', '.join(fixed)}, ftwt-codebook-K, ftwt-A+B")


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


def paired(rows_by_seed: dict[int, dict[str, dict]], method: str) -> dict | None:
    """``method``'s top-1 minus static uniform's, seed by seed: mean, spread and a 95 % t interval."""
    diffs = [rows[method]["top1"] - rows[BASELINE]["top1"] for rows in rows_by_seed.values() if method in rows and BASELINE in rows]
    if not diffs:
        return None
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return {"vs": BASELINE, "diffs": diffs, "mean": mean, "ci95": None}
    half = T975[min(len(diffs) - 1, len(T975)) - 1] * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return {"vs": BASELINE, "diffs": diffs, "mean": mean, "std": statistics.stdev(diffs), "ci95": [mean - half, mean + half]}


def plot_codebook(rows: list[dict], path: Path, title: str) -> None:
    """Top-1 against K for each family of ``<prefix>-codebook-K`` rows, the prefix itself (K → ∞) and the
    static rows as horizontal lines. Written atomically (temporary file, then rename)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_method = {r["method"]: r for r in rows}
    families: dict[str, list[tuple[int, float]]] = {}
    for method, row in by_method.items():
        prefix, _, k = method.partition("-codebook-")
        if k.isdigit():
            families.setdefault(prefix, []).append((int(k), row["top1"]))
    if not families:
        raise SystemExit("--plot needs codebook rows (methods named ftwt-codebook-K)")
    fig, ax = plt.subplots(figsize=(6, 4))
    for prefix, points in sorted(families.items()):
        ks, top1 = zip(*sorted(points))
        line = ax.plot(ks, top1, marker="o", label=f"{prefix}, codebook K")[0]
        if prefix in by_method:
            ax.axhline(by_method[prefix]["top1"], ls=":", color=line.get_color(), label=f"{prefix} (K → ∞)")
    for method in ("static-uniform", "signature-static"):
        if method in by_method:
            ax.axhline(by_method[method]["top1"], ls="--", lw=1, color="grey" if method == BASELINE else "black", label=method)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("prototype masks per layer (K)")
    ax.set_ylabel("test top-1 %")
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    protocol = parser.add_mutually_exclusive_group()
    protocol.add_argument("--quick", action="store_true", help="minutes: dense 10 epochs, 3 fine-tuning epochs each")
    protocol.add_argument("--full", action="store_true", help="dense 40 epochs, 15 fine-tuning epochs, seeds 0,1,2")
    parser.add_argument("--json", action="store_true", help="one JSON document on stdout")
    parser.add_argument("--profile", default="quickstart", help="recipe fields the options below do not set (momentum, wd, head lr)")
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--data", default=f"imagefolder:{CIFAR10_MINI}")
    parser.add_argument("--target-flops", type=float, default=50.0)
    parser.add_argument("--dense-epochs", type=int, help="default: 10 quick, 40 full")
    parser.add_argument("--epochs", type=int, help="fine-tuning epochs of every method (default: 3 quick, 15 full)")
    parser.add_argument("--samples", type=int, default=0, help="cap on training images of the fine-tuning runs (0: all)")
    parser.add_argument("--blur-sigma", type=float, default=0.9)
    parser.add_argument("--noise-sigma", type=float, default=0.11)
    parser.add_argument("--methods", help=f"comma list (default: {','.join(DEFAULT_METHODS)}; --full: ftwt,{BASELINE})")
    parser.add_argument("--seeds", help="comma list of fine-tuning seeds (default: 0; --full: 0,1,2)")
    parser.add_argument("--checkpoint-dir", default=str(REPO / "runs" / "compare"), help="run directories; the dense one is reused")
    parser.add_argument("--seed", type=int, default=0, help="seed of the dense model")
    parser.add_argument("--plot", type=Path, help="PNG of top-1 against the codebook size K (needs ftwt[-variant]-codebook-K rows)")
    args = parser.parse_args()

    data_dir = args.data.partition(":")[2]
    if args.data.startswith("imagefolder:") and not Path(data_dir).is_dir():
        raise SystemExit(f"no images at {data_dir} (set FTWT_CIFAR10_MINI or pass --data)")
    methods = [m.strip() for m in (args.methods or ",".join(("ftwt", BASELINE) if args.full else DEFAULT_METHODS)).split(",") if m.strip()]
    for method in methods:
        method_args(method, args.target_flops)  # unknown names stop here, before anything trains
    seeds = [int(s) for s in (args.seeds or ("0,1,2" if args.full else "0")).split(",")]
    dense_epochs = args.dense_epochs or (40 if args.full else 10)
    epochs = args.epochs or (15 if args.full else 3)
    base = ["--profile", args.profile, "--model", args.model, "--data", args.data, "--workers", "0"]
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
        ftwt("train", *base, "--seed", str(args.seed), "--dense", *recipe, "--out", str(dense_dir))
    else:
        console.print(f"dense: reusing {dense_ckpt}")

    tag = f"p{args.target_flops:g}-e{epochs}" + (f"-n{args.samples}" if args.samples else "")
    train_summaries: dict[str, dict] = {}
    rows_by_seed: dict[int, dict[str, dict]] = {}
    for seed in seeds:
        checkpoints: dict[str, Path] = {}
        for method in methods:
            run_dir = root / f"{method}-{tag}" if seed == args.seed else root / f"{method}-{tag}-seed{seed}"
            if not finished(run_dir, epochs):
                if run_dir.exists():
                    raise SystemExit(f"{run_dir} holds an unfinished run; remove it or finish it ('ftwt train --resume')")
                console.print(f"[bold]{method}[/bold] (seed {seed}): {epochs} epochs → {run_dir}")
                train_summaries[f"{method}@{seed}"] = ftwt(
                    "train", *base, "--seed", str(seed), *method_args(method, args.target_flops), "--init", str(dense_ckpt),
                    "--epochs", str(epochs), "--milestones", str(max(1, epochs * 3 // 4)),
                    *(["--samples", str(args.samples)] if args.samples else []), "--out", str(run_dir),
                )  # fmt: skip
            checkpoints[method] = run_dir / "best.pt"
        console.print(f"[bold]eval[/bold] (seed {seed}): every model on the test split, clean and perturbed")
        compare = [a for m in methods for a in ("--compare", str(checkpoints[m]))]
        report = ftwt(
            "eval", *base, "--seed", str(args.seed), "--checkpoint", str(dense_ckpt), *compare,
            "--blur-sigmas", f"{args.blur_sigma:g}", "--noise-sigmas", f"{args.noise_sigma:g}",
        )  # fmt: skip
        rows_by_seed[seed] = {}
        for method, model in zip(["dense", *methods], report["models"]):
            brier = {(p["perturbation"], p["sigma"]): p for p in model.get("brier", [])}
            blur = brier.get(("blur", args.blur_sigma), {})
            noise = brier.get(("noise", args.noise_sigma), {})
            rows_by_seed[seed][method] = {
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
                "distinct_masks": [layer["clusters"] for layer in model["layers"]],
                "checkpoint": str(dense_ckpt if method == "dense" else checkpoints[method]),
            }

    rows = []
    for method in ["dense", *methods]:
        per_seed = [rows_by_seed[s][method] for s in seeds]
        row = dict(per_seed[0])
        for key, value in per_seed[0].items():
            if isinstance(value, float) and all(isinstance(r[key], float) for r in per_seed):
                row[key] = statistics.fmean(r[key] for r in per_seed)
        row["top1_seeds"] = [r["top1"] for r in per_seed]
        row["top1_std"] = statistics.stdev(row["top1_seeds"]) if len(per_seed) > 1 else None
        row["seeds"] = seeds
        rows.append(row)
    comparisons = {m: paired(rows_by_seed, m) for m in methods if m != BASELINE}
    by_method = {r["method"]: r for r in rows}
    verdict = None
    if "ftwt" in by_method and BASELINE in by_method:
        gap = by_method["ftwt"]["top1"] - by_method[BASELINE]["top1"]
        flops_gap = by_method["ftwt"]["flops_reduction_pct"] - by_method[BASELINE]["flops_reduction_pct"]
        verdict = {
            "ftwt_minus_static_uniform_top1": gap,
            "ftwt_minus_static_uniform_flops_reduction": flops_gap,
            "goal_points": GOAL_POINTS,
            "holds": gap >= GOAL_POINTS,
        }

    title = f"{args.model} on {Path(data_dir).name or args.data}: dense {dense_epochs} epochs, methods {epochs} epochs"
    columns = ["FLOPs ↓ %", "top-1 %", "± (seeds)", f"Δ vs {BASELINE} [95 %]", "Brier clean", f"Brier blur {args.blur_sigma:g}"]
    table = Table("method", *columns, title=f"{title}, target {args.target_flops:g}%, seeds {','.join(map(str, seeds))}")
    fmt = lambda v: "–" if v is None else f"{v:.4f}"  # noqa: E731
    for r in rows:
        pair = comparisons.get(r["method"])
        delta = "–" if not pair else f"{pair['mean']:+.2f}" + (f" [{pair['ci95'][0]:+.2f}, {pair['ci95'][1]:+.2f}]" if pair["ci95"] else "")
        table.add_row(
            r["method"], f"{r['flops_reduction_pct']:.2f}", f"{r['top1']:.2f}", "–" if r["top1_std"] is None else f"{r['top1_std']:.2f}",
            delta, fmt(r["brier_clean"]), fmt(r[f"brier_blur_{args.blur_sigma:g}"]),
        )  # fmt: skip
    console.print(table)
    if verdict:
        console.print(
            f"FTWT − static uniform: {verdict['ftwt_minus_static_uniform_top1']:+.2f} points top-1 "
            f"(goal ≥ {GOAL_POINTS:g}: {'holds' if verdict['holds'] else 'not met'}), at "
            f"{verdict['ftwt_minus_static_uniform_flops_reduction']:+.2f} points FLOPs reduction"
        )
    if args.plot:
        plot_codebook(rows, args.plot, f"{title}, {args.target_flops:g} % fewer FLOPs")
    if args.json:
        document = {
            "model": args.model,
            "data": args.data,
            "target_flops": args.target_flops,
            "dense_epochs": dense_epochs,
            "epochs": epochs,
            "samples": args.samples,
            "seeds": seeds,
            "rows": rows,
            "paired": comparisons,
            "per_seed": {str(s): list(r.values()) for s, r in rows_by_seed.items()},
            "verdict": verdict,
            "train": train_summaries,
            "wall_s": time.perf_counter() - started,
            "load_average": os.getloadavg(),
        }
        print(json.dumps(document, indent=2))


if __name__ == "__main__":
    main()
