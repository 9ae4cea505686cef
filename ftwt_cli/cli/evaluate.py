"""``ftwt eval``: accuracy, measured FLOPs, mask analysis and Brier score under shift for checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import pandas as pd
import typer
from rich.table import Table

from ftwt_cli.algorithms.perturb import BLUR_SIGMAS, NOISE_SIGMAS, perturbation_grid
from ftwt_cli.cli.app import (
    BatchOpt,
    CheckpointOpt,
    DataOpt,
    DataRootOpt,
    DeviceOpt,
    DownloadOpt,
    ImageSizeOpt,
    JsonOpt,
    ModelOpt,
    ProfileOpt,
    SeedOpt,
    WorkersOpt,
    app,
    handle_errors,
    resolve_config,
)
from ftwt_cli.console import console, emit_json
from ftwt_cli.engine import DEFAULT_MEMORY_MB
from ftwt_cli.errors import BadInput
from ftwt_cli.io.checkpoint import atomic_write_bytes, check_writable
from ftwt_cli.io.config import DEFAULT_PROFILE
from ftwt_cli.io.plots import plot_brier, plot_clusters, plot_layer_budget, plot_layer_latency, plot_layer_pruning
from ftwt_cli.workflows.evaluate import LatencyOptions, ModelReport, evaluate_checkpoints, evaluation_config


def parse_sigmas(text: str, option: str) -> list[float]:
    """A comma list of σ ≥ 0, sorted and deduplicated (empty: skip that perturbation)."""
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise BadInput(f"{option} must be a comma list of numbers, got {text!r}") from None
    bad = [v for v in values if not v >= 0]  # also rejects NaN
    if bad:
        raise BadInput(f"{option}: σ must be >= 0, got {bad[0]:g}")
    return sorted(set(values))


def _check_output_dir(path: str | None, option: str) -> None:
    if path is not None and Path(path).exists() and not Path(path).is_dir():
        raise BadInput(f"{option} {path} exists and is not a folder")
    if path is not None:
        check_writable(path, option, folder=True)


@app.command("eval")
@handle_errors
def eval_command(
    profile: ProfileOpt = DEFAULT_PROFILE,
    model: ModelOpt = None,
    data: DataOpt = None,
    checkpoint: CheckpointOpt = None,
    compare: Annotated[
        list[str] | None,
        typer.Option("--compare", help="Another checkpoint to evaluate on the same inputs (repeatable)."),
    ] = None,
    samples: Annotated[int | None, typer.Option("--samples", help="Cap on test images (0: all).")] = None,
    image_size: ImageSizeOpt = None,
    batch_size: BatchOpt = None,
    device: DeviceOpt = None,
    seed: SeedOpt = None,
    data_root: DataRootOpt = None,
    download: DownloadOpt = None,
    workers: WorkersOpt = None,
    brier_noise: Annotated[
        bool, typer.Option("--brier-noise", help="Brier score and top-1 under Gaussian blur and noise (Table 3).")
    ] = False,
    blur_sigmas: Annotated[
        str | None, typer.Option("--blur-sigmas", help="Comma list of blur σ (pixels); implies --brier-noise.")
    ] = None,
    noise_sigmas: Annotated[
        str | None, typer.Option("--noise-sigmas", help="Comma list of noise σ on [0, 1] pixels; implies --brier-noise.")
    ] = None,
    csv: Annotated[str | None, typer.Option("--csv", help="Folder for one CSV per table.")] = None,
    plots: Annotated[str | None, typer.Option("--plots", help="Folder for the PNG figures.")] = None,
    latency: Annotated[bool, typer.Option("--latency", help="Also measure CPU latency, dense vs sparse engine.")] = False,
    latency_samples: Annotated[int, typer.Option("--latency-samples", help="Test images timed.")] = 200,
    threads: Annotated[int, typer.Option("--threads", help="CPU threads for the latency measurement.")] = 1,
    cache_mb: Annotated[float, typer.Option("--cache-mb", help="Sparse engine weight cache size (MiB).")] = 64.0,
    engine_memory_mb: Annotated[
        float, typer.Option("--engine-memory-mb", help="Cap on the engine's pre-sliced sub-networks (MiB).")
    ] = DEFAULT_MEMORY_MB,
    json_out: JsonOpt = False,
) -> None:
    """Evaluate a dense or FTWT checkpoint (and --compare others) on the test split."""
    blur = parse_sigmas(blur_sigmas, "--blur-sigmas") if blur_sigmas is not None else list(BLUR_SIGMAS)
    noise = parse_sigmas(noise_sigmas, "--noise-sigmas") if noise_sigmas is not None else list(NOISE_SIGMAS)
    sweep = brier_noise or blur_sigmas is not None or noise_sigmas is not None
    if latency and (latency_samples < 1 or threads < 1 or cache_mb < 0):
        raise BadInput("--latency-samples and --threads must be at least 1, --cache-mb at least 0")
    if not engine_memory_mb > 0:
        raise BadInput(f"--engine-memory-mb must be > 0 (MiB for the engine's pre-sliced sub-networks), got {engine_memory_mb:g}")
    _check_output_dir(csv, "--csv")
    _check_output_dir(plots, "--plots")
    cfg = resolve_config(
        profile,
        model=model,
        data=data,
        checkpoint=checkpoint,
        test_samples=samples,
        image_size=image_size,
        batch_size=batch_size,
        device=device,
        seed=seed,
        data_root=data_root,
        download=download,
        workers=workers,
    )
    perturbations = perturbation_grid(blur, noise) if sweep else []
    # With --latency, a --batch-size given on the command line also times batched throughput at that size.
    options = LatencyOptions(latency_samples, threads, cache_mb, engine_memory_mb, batch_size) if latency else None
    cfg = evaluation_config(cfg, compare or [])  # the checkpoint's data and input size unless given
    reports = evaluate_checkpoints(cfg, compare or [], perturbations, options)

    tables = _tables(reports)
    _print_tables(reports, tables)
    if csv:
        for name, frame in tables.items():
            atomic_write_bytes(Path(csv) / f"{name}.csv", lambda f, fr=frame: f.write(fr.to_csv(index=False).encode()))
    if plots:
        for kind in ("blur", "noise"):
            if any(p.perturbation == kind for p in reports[0].brier):
                plot_brier(reports, kind, Path(plots) / f"brier_{kind}.png", title=cfg.model)
        plot_layer_pruning(reports, Path(plots) / "layer_pruning.png", title=cfg.model)
        plot_clusters(reports, Path(plots) / "clusters.png", title=cfg.model)
        if any(layer.target_keep_ratio is not None for r in reports for layer in r.layers):
            plot_layer_budget(reports, Path(plots) / "layer_budget.png", title=cfg.model)
        if latency:
            plot_layer_latency(reports, Path(plots) / "layer_latency.png", title=cfg.model)
    if json_out:
        emit_json(
            {
                "model": cfg.model,
                "data": cfg.data,
                "seed": cfg.seed,
                "samples": reports[0].samples,
                "perturbations": {"blur": blur, "noise": noise} if sweep else {},
                "models": [r.to_dict() for r in reports],
                "config": cfg.to_dict(),
            }
        )


def _tables(reports: list[ModelReport]) -> dict[str, pd.DataFrame]:
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
        # Per conv: the engine's build-time measurement of its sparse paths against its dense conv.
        layer_rows = [{"model": r.label} | layer for r in reports if r.latency for layer in r.latency.get("layers", [])]
        if layer_rows:
            tables["latency_layers"] = pd.DataFrame(layer_rows)
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
    "cache_hit_rate": "cache hits",
    "sparse_layer_count": "sparse layers",
    "fallback": "dense fallback",
    "sparse_us": "sparse µs",
    "dense_us": "dense µs",
    "active_in": "active in",
}
#: The fields of ftwt_cli.engine.latency.latency_report shown in the terminal.
LATENCY_COLUMNS = (
    "dense_ms",
    "engine_ms",
    "latency_reduction_pct",
    "flops_reduction_pct",
    "ratio",
    "sparse_layer_count",
    "fallback",
    "cache_hit_rate",
)
#: The per-layer latency fields shown in the terminal.
LATENCY_LAYER_COLUMNS = ("name", "keep", "active_in", "sparse", "dense_us", "sparse_us")


def _print_tables(reports: list[ModelReport], tables: dict[str, pd.DataFrame]) -> None:
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
        table = Table("σ", *points, title=f"Brier (top-1 %), Gaussian {kind}")
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
    if "latency_layers" in tables:
        layers = tables["latency_layers"]
        for r in reports:
            rows = layers[layers["model"] == r.label]
            if not rows.empty:
                title = f"per-layer latency (build-time measurement, sparse = runs its sparse paths): {r.label}"
                console.print(_rich_table(title, rows[[c for c in LATENCY_LAYER_COLUMNS if c in rows.columns]]))


def _print_engine_details(report: ModelReport) -> None:
    """The engine's pre-sliced sub-networks and, with --batch-size, batched throughput."""
    latency = report.latency or {}
    fitted, use = latency.get("prototypes") or {}, latency.get("prototype_use")
    if use and fitted.get("prototypes"):
        console.print(
            f"engine prototypes ({report.label}): {fitted['prototypes']} over {fitted['layers']} layers, fitted on "
            f"{fitted['fitted_on']} held-out images; {use['memory_mb']:.1f} of {fitted['memory_cap_mb']:g} MiB; "
            f"coverage {100 * use['coverage']:.1f} % of gated conv calls, extra MACs {use['extra_mac_pct']:.2f} % of theirs",
            highlight=False,
        )
    for size, row in (latency.get("batched") or {}).items():
        console.print(
            f"batch {size} ({report.label}): dense {row['dense_images_per_s']:.1f} images/s, engine "
            f"{row['engine_images_per_s']:.1f} images/s, speedup {row['speedup']:.2f}×",
            highlight=False,
        )


def _rich_table(title: str, frame: pd.DataFrame) -> Table:
    headers = [HEADERS.get(c, c.replace("_pct", " %").replace("_", " ")) for c in frame.columns]
    table = Table(*headers, title=title)
    for row in frame.itertuples(index=False):
        table.add_row(*(_cell(v) for v in row))
    return table


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"
    return str(value)
