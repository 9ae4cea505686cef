"""``ftwt eval``: accuracy, measured FLOPs, mask analysis and Brier score under shift for checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

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
    VerboseOpt,
    WorkersOpt,
    command,
    handle_errors,
    resolve_config,
)
from ftwt_cli.cli.names import DEFAULT_PROFILE
from ftwt_cli.console import emit_json
from ftwt_cli.errors import BadInput


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
        from ftwt_cli.io.checkpoint import check_writable

        check_writable(path, option, folder=True)


@command("eval")
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
    latency: Annotated[
        bool, typer.Option("--latency", help="Also measure batch-1 CPU latency: dense eager, dense pre-packed and the routing engine.")
    ] = False,
    latency_samples: Annotated[int, typer.Option("--latency-samples", help="Test images timed.")] = 200,
    threads: Annotated[int, typer.Option("--threads", help="CPU threads for the latency measurement.")] = 1,
    verbose: VerboseOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Evaluate a dense or FTWT checkpoint (and --compare others) on the test split."""
    # pandas (the tables) and matplotlib (--plots) load once there is something to show.
    from ftwt_cli.algorithms.perturb import BLUR_SIGMAS, NOISE_SIGMAS, perturbation_grid
    from ftwt_cli.workflows.evaluate import LatencyOptions, evaluate_checkpoints, evaluation_config

    blur = parse_sigmas(blur_sigmas, "--blur-sigmas") if blur_sigmas is not None else list(BLUR_SIGMAS)
    noise = parse_sigmas(noise_sigmas, "--noise-sigmas") if noise_sigmas is not None else list(NOISE_SIGMAS)
    sweep = brier_noise or blur_sigmas is not None or noise_sigmas is not None
    if latency and (latency_samples < 1 or threads < 1):
        raise BadInput("--latency-samples and --threads must be at least 1")
    _check_output_dir(csv, "--csv")
    _check_output_dir(plots, "--plots")
    cfg = resolve_config(
        profile,
        verbose,
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
    options = LatencyOptions(latency_samples, threads, batch_size) if latency else None
    cfg = evaluation_config(cfg, compare or [])  # the checkpoint's data and input size unless given
    reports = evaluate_checkpoints(cfg, compare or [], perturbations, options)

    from ftwt_cli.cli.eval_tables import print_tables, tables_of

    tables = tables_of(reports)
    print_tables(reports, tables)
    if csv:
        from ftwt_cli.io.checkpoint import atomic_write_bytes

        for name, frame in tables.items():
            atomic_write_bytes(Path(csv) / f"{name}.csv", lambda f, fr=frame: f.write(fr.to_csv(index=False).encode()))
    if plots:
        from ftwt_cli.io.plots import plot_brier, plot_clusters, plot_layer_budget, plot_layer_pruning

        for kind in ("blur", "noise"):
            if any(p.perturbation == kind for p in reports[0].brier):
                plot_brier(reports, kind, Path(plots) / f"brier_{kind}.png", title=cfg.model)
        plot_layer_pruning(reports, Path(plots) / "layer_pruning.png", title=cfg.model)
        plot_clusters(reports, Path(plots) / "clusters.png", title=cfg.model)
        if any(layer.target_keep_ratio is not None for r in reports for layer in r.layers):
            plot_layer_budget(reports, Path(plots) / "layer_budget.png", title=cfg.model)
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
