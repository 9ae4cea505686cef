"""The tables of ``ftwt eval``: one DataFrame per CSV, and their rendering on stderr. Imported when
``ftwt eval`` runs (pandas is not needed for help)."""

from __future__ import annotations

import pandas as pd
from rich.table import Table

from ftwt_cli.console import console, plain_table
from ftwt_cli.workflows.evaluate import ModelReport


def tables_of(reports: list[ModelReport]) -> dict[str, pd.DataFrame]:
    """Every table of the report as a DataFrame, keyed by its CSV name."""
    tables = {
        "summary": pd.DataFrame(
            {
                "model": r.label,
                "top1_pct": r.top1,
                "top5_pct": r.top5,
                "brier": r.brier_clean,
                "flops_reduction_pct": r.flops_reduction_pct,
                "flops_reduction_with_heads_pct": r.flops_reduction_with_heads_pct,
                "mean_mmacs": r.mean_macs / 1e6,
                "dense_mmacs": r.dense_macs / 1e6,
            }
            for r in reports
        ),
        "layers": pd.DataFrame({"model": r.label} | vars(layer) for r in reports for layer in r.layers),
    }
    estimates = [{"model": r.label} | r.estimate for r in reports if r.estimate]
    if estimates:
        tables["estimate"] = pd.DataFrame(estimates)
    for kind in ("blur", "noise"):
        points = pd.DataFrame(
            {"model": r.label, "sigma": p.sigma, "brier": p.brier, "top1_pct": p.top1}
            for r in reports
            for p in r.brier
            if p.perturbation == kind
        )
        if not points.empty:
            wide = points.pivot(index="sigma", columns="model", values=["brier", "top1_pct"])
            wide = wide.reindex(columns=[r.label for r in reports], level=1)
            wide.columns = [f"{label} {metric}" for metric, label in wide.columns]
            tables[f"brier_{kind}"] = wide.reset_index()
    latencies = [{"model": r.label} | r.latency for r in reports if r.latency]
    if latencies:
        tables["latency"] = pd.DataFrame(latencies)
    return tables


#: Display names of CSV columns in the terminal tables.
HEADERS = {
    "top1_pct": "top-1 %",
    "top5_pct": "top-5 %",
    "brier": "Brier",
    "flops_reduction_pct": "FLOPs ↓ %",
    "flops_reduction_with_heads_pct": "with heads %",
    "mean_mmacs": "MMACs",
    "dense_mmacs": "dense MMACs",
    "name": "layer",
    "channels": "C",
    "keep_ratio": "keep",
    "head_accuracy": "head acc",
    "core_fraction": "core",
    "target": "target %",
    "chosen_r": "r",
    "estimated_reduction_pct": "estimated ↓ %",
    "reached_reduction_pct": "reached ↓ %",
    "reached_with_heads_pct": "with heads ↓ %",
    "difference_pct": "Δ vs target",
    "target_keep_ratio": "target keep",
    "head_bce": "BCE",
    "dense_ms": "dense ms",
    "engine_ms": "engine ms",
    "latency_reduction_pct": "latency ↓ %",
    "dense_prepacked_ms": "dense pre-packed ms",
    "latency_reduction_prepacked_pct": "latency ↓ vs pre-packed %",
    "ratio_prepacked": "ratio (pre-packed)",
    "codebook_k": "K",
    "subnet_memory_mb": "sub-networks MiB",
}
#: The fields of ftwt_cli.engine.latency.latency_report shown in the terminal.
LATENCY_COLUMNS = (
    "engine",
    "dense_ms",
    "dense_prepacked_ms",
    "engine_ms",
    "flops_reduction_pct",
    "ratio",
    "ratio_prepacked",
    "codebook_k",
    "subnet_memory_mb",
)


def print_tables(reports: list[ModelReport], tables: dict[str, pd.DataFrame]) -> None:
    console.print(_rich_table("summary (clean test set)", tables["summary"]))
    layers = tables["layers"]
    for r in reports:
        console.print(_rich_table(f"per layer: {r.label}", layers[layers["model"] == r.label].drop(columns="model")))
    if "estimate" in tables:
        console.print(_rich_table("estimated vs reached FLOPs reduction", tables["estimate"]))
    for kind in ("blur", "noise"):
        points = {r.label: {p.sigma: p for p in r.brier if p.perturbation == kind} for r in reports}
        sigmas = sorted({s for by_sigma in points.values() for s in by_sigma})
        if not sigmas:
            continue
        table = plain_table("σ", *points, title=f"Brier (top-1 %), Gaussian {kind}")
        for sigma in sigmas:
            cells = [f"{by_sigma[sigma].brier:.4f} ({by_sigma[sigma].top1:.1f})" for by_sigma in points.values()]
            table.add_row(f"{sigma:g}", *cells)
        console.print(table)
    if "latency" in tables:
        frame = tables["latency"]
        shown = [c for c in ("model", *LATENCY_COLUMNS) if c in frame.columns]  # the CSV keeps every field
        first = reports[0].latency
        title = f"CPU latency, batch 1, {first.get('samples')} images, {first.get('threads')} thread(s)"
        console.print(_rich_table(title, frame[shown]))
    for r in reports:
        _print_engine_details(r)


def _print_engine_details(report: ModelReport) -> None:
    """Free masks' one-line warning, the engine's exactness and, with --batch-size, batched throughput."""
    latency = report.latency or {}
    if latency.get("note"):
        console.print(f"{report.label}: {latency['note']}", style="yellow", highlight=False)
    if "max_rel_error" in latency:
        console.print(
            f"engine ({report.label}, {latency['engine']}): outputs within {latency['max_rel_error']:.1e} (relative) of the "
            f"gated model's, {latency['mask_mismatches']} mask(s) differ; {latency['subconvs']} sub-convs, "
            f"{latency['subnet_memory_mb']:.1f} MiB",
            highlight=False,
        )  # fmt: skip
    for size, row in (latency.get("batched") or {}).items():
        console.print(
            f"batch {size} ({report.label}): dense {row['dense_images_per_s']:.1f} images/s, dense pre-packed "
            f"{row['dense_prepacked_images_per_s']:.1f}, engine {row['engine_images_per_s']:.1f}; speedup "
            f"{row['speedup']:.2f}× (pre-packed {row['speedup_prepacked']:.2f}×)",
            highlight=False,
        )  # fmt: skip


def _rich_table(title: str, frame: pd.DataFrame) -> Table:
    headers = [HEADERS.get(c, c.replace("_pct", " %").replace("_", " ")) for c in frame.columns]
    table = plain_table(*headers, title=title)
    for row in frame.itertuples(index=False):
        table.add_row(*(_cell(v) for v in row))
    return table


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"
    return str(value)
