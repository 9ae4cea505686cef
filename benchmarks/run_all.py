"""Run every benchmark and write one results table, ``benchmarks/results.md``.

Each benchmark runs as its own process (``--quick --json`` with ``--quick``), its JSON is kept under
``--out`` (default ``benchmarks/results/``), and every figure is put next to its goal: met or not.
``--from DIR`` rebuilds the table from JSON documents saved earlier (one per benchmark, named as below),
so a table can be assembled from runs taken one at a time on a loaded machine.

    python benchmarks/run_all.py --quick            # everything, about an hour on 2 CPU cores
    python benchmarks/run_all.py --from benchmarks/results
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

HERE = Path(__file__).resolve().parent

#: name → (script arguments after the script, summariser of its JSON into table rows)
Row = tuple[str, str, str, bool | None]  # figure, goal, measured, met (None: reported, no goal)


def _estimate(doc: dict) -> list[Row]:
    goal = doc["goal"]
    return [
        (f"`ftwt estimate` pass ÷ dense forward, {r['model']} (21 / 101 ratios)", f"≤ {goal}",
         f"{r['ratio_21']:.2f} / {r['ratio_101']:.2f}", r["ratio_21"] <= goal and r["ratio_101"] <= goal)
        for r in doc["results"]
    ]


def _search(doc: dict) -> list[Row]:
    return [(
        f"`ftwt search --target-flops {doc['target']:g}`: data passes for {len(doc['steps'])} bisection steps",
        "1 pass", "1 pass" if not doc["cascade"] else f"{len(doc['steps'])} passes", not doc["cascade"],
    ), (
        "search: estimate of the chosen r vs the target", f"± {doc['tolerance']:g} points",
        f"{doc['estimated_reduction_pct']:.2f} % (r = {doc['chosen_r']:.4f})", bool(doc["converged"]),
    )]


def _train(doc: dict) -> list[Row]:
    goal = doc["goal"]
    return [(f"FTWT training step ÷ dense step, {r['model']}", f"≤ {goal}", f"{r['ratio']:.2f}", r["ratio"] <= goal) for r in doc["results"]]


#: latency.py's goal keys: model name + one of these suffixes (longest first: "_ratio" ends the others).
_LATENCY_GOAL_KINDS = ("_engine_over_static_prepacked", "_exported_over_engine", "_ratio_prepacked", "_batch8_speedup", "_ratio")


def _latency(doc: dict) -> list[Row]:
    """latency.py states its goals in its own document (``goals``), so the two cannot drift: one row each."""
    rows: list[Row] = []
    for key, goal in (doc.get("goals") or {}).items():
        kind = next((k for k in _LATENCY_GOAL_KINDS if key.endswith(k)), None)
        if goal is None or kind is None:  # that model was not run
            continue
        model = key.removesuffix(kind)
        r = doc.get(model, {})
        where = f"{model}, batch 1, {r.get('threads', 1)} thread(s), K = {r.get('codebook_k')}, at {r.get('flops_reduction_pct', float('nan')):.1f} % FLOPs ↓"
        if kind == "_ratio":
            figure = f"latency ↓ ÷ FLOPs ↓ vs dense eager, {where}"
            measured, target = f"{goal['measured']:.2f} ({r['dense_ms']:.2f} → {r['engine_ms']:.2f} ms)", f"≥ {goal['goal']:g}"
        elif kind == "_ratio_prepacked":
            figure = f"latency ↓ ÷ FLOPs ↓ vs dense pre-packed, {where}"
            measured, target = f"{goal['measured']:.2f} ({r['dense_prepacked_ms']:.2f} → {r['engine_ms']:.2f} ms)", f"≥ {goal['goal']:g}"
        elif kind == "_engine_over_static_prepacked":
            figure = f"engine ÷ static pre-packed latency, {model}, batch 1, static at {r['static_flops_reduction_pct']:.1f} % FLOPs ↓"
            measured, target = f"{goal['measured']:.2f} ({r['engine_ms']:.2f} vs {r['static_prepacked_ms']:.2f} ms)", f"≤ {goal['goal']:g}"
        elif kind == "_exported_over_engine":
            figure = f"exported routing program ÷ engine latency, {model}, batch 1"
            measured, target = f"{goal['measured']:.2f} ({r['exported_ms']:.2f} vs {r['engine_ms']:.2f} ms)", f"≤ {goal['goal']:g}"
        else:
            figure, measured, target = f"batch-8 throughput ÷ dense eager, {model}", f"{goal['measured']:.2f}×", f"≥ {goal['goal']:g}"
        rows.append((figure, target, measured, bool(goal["met"])))
    return rows


def _budget(doc: dict) -> list[Row]:
    rows: list[Row] = []
    for r in doc["targets"]:
        p, head = r["target_pct"], r["variant"]
        rows += [
            (f"budget {p:g} % ({head} head): reached, raw heads", "within 2 points", f"{r['reached_raw_pct']:.1f} %", r["goals"]["raw_within_2"]),
            (f"budget {p:g} % ({head} head): reached, calibrated", "within 1 point", f"{r['reached_calibrated_pct']:.1f} %", r["goals"]["calibrated_within_1"]),
            (f"budget {p:g} % ({head} head): top-1 as trained → calibrated", "cost ≤ 1 point",
             f"{r['top1_trained']:.1f} → {r['top1_calibrated']:.1f} %", r["goals"]["calibration_top1_cost_le_1"]),
        ]
    return rows


def _compare(doc: dict) -> list[Row]:
    rows = {r["method"]: r for r in doc["rows"]}
    seeds = len(doc.get("seeds", [0]))
    # The protocol, so that the quick and full tables read apart: dense epochs / fine-tuning epochs.
    protocol = f"(dense {doc['dense_epochs']}, {doc['epochs']} epochs) " if "dense_epochs" in doc and "epochs" in doc else ""
    out: list[Row] = [
        (f"{protocol}{m}: top-1 at {r['flops_reduction_pct']:.1f} % FLOPs ↓" + (f" (mean of {seeds} seeds)" if seeds > 1 else ""),
         "reported", f"{r['top1']:.1f} %" + (f" ± {r['top1_std']:.1f}" if r.get("top1_std") else ""), None)
        for m, r in rows.items()
    ]
    paired = doc.get("paired") or {}
    if "ftwt" in rows and "static-uniform" in rows:
        gap = rows["ftwt"]["top1"] - rows["static-uniform"]["top1"]
        out.append((f"{protocol}default FTWT − static uniform, top-1 at equal FLOPs", "≥ −1 point", f"{gap:+.1f} points", gap >= -1.0))
    variants = {m: p for m, p in paired.items() if p and m.startswith("ftwt")}
    if variants:
        best, pair = max(variants.items(), key=lambda kv: kv[1]["mean"])
        ci = pair.get("ci95")
        measured = f"{best}: {pair['mean']:+.1f} points" + (f" [{ci[0]:+.1f}, {ci[1]:+.1f}]" if ci else " (one seed, no interval)")
        met = pair["mean"] >= 2.0 and ci is not None and ci[0] > 0
        out.append((f"{protocol}best FTWT variant − static uniform (paired, 95 % interval)", "≥ +2 points, interval > 0", measured, met))
    return out


BENCHMARKS: dict[str, tuple[list[str], Callable[[dict], list[Row]]]] = {
    "estimate_overhead": (["estimate_overhead.py"], _estimate),
    "search": (["-m", "ftwt_cli", "search", "--model", "resnet20", "--data", "imagefolder:{data}", "--target-flops", "50"], _search),
    "train_overhead": (["train_overhead.py"], _train),
    "latency": (["latency.py"], _latency),
    "budget": (["budget.py"], _budget),
    "compare": (["compare.py"], _compare),
    "compare_full": (["compare.py", "--full"], _compare),  # about 1.5 h alone; not with --quick
}


def run(name: str, quick: bool, out: Path, data: str) -> dict:
    args, _ = BENCHMARKS[name]
    command = [sys.executable, *[a.format(data=data) for a in args], "--json"]
    if args[0].endswith(".py"):
        command[1] = str(HERE / args[0])
        command += ["--quick"] if quick and "--full" not in args else []
    print(f"== {name}: {' '.join(command[1:])}", file=sys.stderr, flush=True)
    started = time.time()
    done = subprocess.run(command, cwd=HERE.parent, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(HERE)})
    if done.returncode != 0:
        raise SystemExit(f"{name} failed with exit code {done.returncode}")
    doc = json.loads(done.stdout)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(doc, indent=2) + "\n")
    print(f"   {name}: {time.time() - started:.0f} s", file=sys.stderr, flush=True)
    return doc


def table(docs: dict[str, dict], note: str) -> str:
    lines = [
        "# Benchmark results",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
        f"{datetime.date.today().isoformat()}. {note}",
        "",
        "| benchmark | figure | goal | measured | met |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, doc in docs.items():
        for figure, goal, measured, met in BENCHMARKS[name][1](doc):
            mark = "–" if met is None else ("yes" if met else "**no**")
            lines.append(f"| {name} | {figure} | {goal} | {measured} | {mark} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="every benchmark with --quick")
    parser.add_argument("--json", action="store_true", help="print every benchmark's document as one JSON document")
    parser.add_argument(
        "--only", default=None,
        help="comma list of benchmarks to run (default: all but compare_full, which takes hours; with --from, every saved one)",
    )  # fmt: skip
    parser.add_argument("--from", dest="source", default=None, help="build the table from saved JSON documents instead")
    parser.add_argument("--out", default=str(HERE / "results"), help="where each benchmark's JSON is kept")
    parser.add_argument("--table", default=str(HERE / "results.md"))
    parser.add_argument("--data", default=None, help="cifar10-mini root (default: beside the repository)")
    parser.add_argument("--note", default="", help="a sentence for the table's header (load, how the runs were taken)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(HERE))
    from _common import CIFAR10_MINI

    default = list(BENCHMARKS) if args.source else [n for n in BENCHMARKS if n != "compare_full"]
    names = [n.strip() for n in args.only.split(",") if n.strip()] if args.only else default
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        print(f"error: unknown benchmark {unknown[0]!r} (known: {', '.join(BENCHMARKS)})", file=sys.stderr)
        return 2
    docs: dict[str, dict] = {}
    for name in names:
        if args.source:
            path = Path(args.source) / f"{name}.json"
            if path.is_file():
                docs[name] = json.loads(path.read_text())
        else:
            docs[name] = run(name, args.quick, Path(args.out), args.data or CIFAR10_MINI)
    text = table(docs, args.note or ("All runs with --quick." if args.quick else ""))
    tmp = Path(args.table).with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(args.table)
    print(text, file=sys.stderr)
    if args.json:
        print(json.dumps(docs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
