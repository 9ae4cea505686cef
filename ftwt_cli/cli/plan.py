"""``ftwt profiles``, ``ftwt estimate`` and ``ftwt search``: planning before training."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

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
    SamplesOpt,
    SeedOpt,
    TargetOpt,
    VerboseOpt,
    WorkersOpt,
    command,
    handle_errors,
    resolve_config,
)
from ftwt_cli.cli.names import DEFAULT_PROFILE
from ftwt_cli.console import console, emit_json, plain_table
from ftwt_cli.errors import BadInput


@command("profiles")
@handle_errors
def profiles_command(json_out: JsonOpt = False) -> None:
    """List the shipped profiles (--profile also takes the path of a TOML file of your own)."""
    from ftwt_cli.io.config import PROFILE_DIR, list_profiles

    rows = list_profiles()
    if json_out:
        emit_json([{"name": n, "description": d, "default": n == DEFAULT_PROFILE, "path": str(PROFILE_DIR / f"{n}.toml")} for n, d in rows])
        return
    table = plain_table("profile", "description", title="ftwt profiles", caption=f"files: {PROFILE_DIR}/NAME.toml")
    for name, description in rows:
        table.add_row(name + (" (default)" if name == DEFAULT_PROFILE else ""), description)
    console.print(table)


@command("estimate")
@handle_errors
def estimate_command(
    profile: ProfileOpt = DEFAULT_PROFILE,
    model: ModelOpt = None,
    data: DataOpt = None,
    checkpoint: CheckpointOpt = None,
    samples: SamplesOpt = None,
    image_size: ImageSizeOpt = None,
    batch_size: BatchOpt = None,
    device: DeviceOpt = None,
    seed: SeedOpt = None,
    data_root: DataRootOpt = None,
    download: DownloadOpt = None,
    workers: WorkersOpt = None,
    ratios: Annotated[
        Optional[str], typer.Option("--ratios", help="Comma list (0.9,0.95) or inclusive start:stop:step.")
    ] = None,
    target_flops: TargetOpt = None,
    csv: Annotated[Optional[str], typer.Option("--csv", help="Write the table as CSV.")] = None,
    plot: Annotated[Optional[str], typer.Option("--plot", help="Write r → estimated reduction as a PNG.")] = None,
    verbose: VerboseOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Expected FLOPs reduction of every r, from ONE pass of the trained dense model over training data."""
    from ftwt_cli.io.checkpoint import atomic_write_bytes, check_writable
    from ftwt_cli.io.config import check_target_flops
    from ftwt_cli.workflows.plan import plan_estimate

    if target_flops is not None:
        check_target_flops(target_flops)
    for path, option in ((csv, "--csv"), (plot, "--plot")):
        if path is not None:
            if Path(path).is_dir():
                raise BadInput(f"{option} {path} is a folder; give a file name")
            check_writable(path, option)
    cfg = resolve_config(
        profile, verbose, model=model, data=data, checkpoint=checkpoint, samples=samples, image_size=image_size, batch_size=batch_size,
        device=device, seed=seed, data_root=data_root, download=download, workers=workers,
    )  # fmt: skip
    planned = plan_estimate(cfg, ratios, target_flops)
    est, loaded, cfg = planned.result, planned.loaded, planned.config  # the checkpoint's setting where none was given
    chosen = est.nearest(target_flops) if target_flops is not None else None

    rows = est.rows()
    table = plain_table("r", "FLOPs ↓ %", "with heads %", "mean keep", title=f"{cfg.model}: estimate over {est.samples} images")
    for i, row in enumerate(rows):
        keep = sum(row["per_layer_keep"].values()) / max(len(row["per_layer_keep"]), 1)
        style = "bold green" if i == chosen else None
        table.add_row(
            f"{row['r']:.4g}",
            f"{row['flops_reduction_pct']:.2f}",
            f"{row['flops_reduction_with_heads_pct']:.2f}",
            f"{keep:.3f}",
            style=style,
        )
    console.print(table)
    console.print(f"dense MACs: {est.dense_macs / 1e6:.2f} M, heads: {est.head_macs / 1e6:.3f} M")
    if planned.search is not None:  # the r 'ftwt search' gives, by its bisection on this same pass
        found = planned.search
        console.print(
            f"target {target_flops:g}% → r = {found.chosen_r:.6f} (estimated {found.estimated_reduction_pct:.2f}%, as 'ftwt search' "
            f"bisects); nearest row of the table: r = {est.ratios[chosen]:.4g} ({est.reduction_pct(chosen):.2f}%)",
            soft_wrap=True,
        )
    elif chosen is not None:
        console.print(f"target {target_flops:g}% → r = {est.ratios[chosen]:.4g} (estimated {est.reduction_pct(chosen):.2f}%); {planned.unreachable}", soft_wrap=True)
    if csv:
        import pandas as pd

        frame = pd.DataFrame(
            [{k: v for k, v in row.items() if k != "per_layer_keep"} | {f"keep/{n}": k for n, k in row["per_layer_keep"].items()} for row in rows]
        )
        atomic_write_bytes(csv, lambda f: f.write(frame.to_csv(index=False).encode()))
    if plot:
        from ftwt_cli.io.plots import plot_estimate

        plot_estimate(est, plot, target_flops, est.ratios[chosen] if chosen is not None else None, title=cfg.model)
    if json_out:
        doc = {
            "model": cfg.model,
            "checkpoint": loaded.path,
            "samples": est.samples,
            "dense_macs": est.dense_macs,
            "head_macs": est.head_macs,
            "estimates": rows,
            "config": cfg.to_dict(),
        }
        if chosen is not None:
            doc["target"] = target_flops
            found = planned.search
            doc["chosen_r"] = found.chosen_r if found else est.ratios[chosen]
            doc["chosen_reduction_pct"] = found.estimated_reduction_pct if found else est.reduction_pct(chosen)
            doc["nearest_table_r"] = est.ratios[chosen]
        emit_json(doc)


@command("search")
@handle_errors
def search_command(
    target_flops: TargetOpt = None,
    tolerance: Annotated[float, typer.Option("--tolerance", help="Accepted distance to the target, in points.")] = 0.25,
    cascade: Annotated[
        bool, typer.Option("--cascade", help="Apply masks layer by layer as in training (one pass per step).")
    ] = False,
    profile: ProfileOpt = DEFAULT_PROFILE,
    model: ModelOpt = None,
    data: DataOpt = None,
    checkpoint: CheckpointOpt = None,
    samples: SamplesOpt = None,
    image_size: ImageSizeOpt = None,
    batch_size: BatchOpt = None,
    device: DeviceOpt = None,
    seed: SeedOpt = None,
    data_root: DataRootOpt = None,
    download: DownloadOpt = None,
    workers: WorkersOpt = None,
    verbose: VerboseOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Bisect r until the estimated FLOPs reduction is within --tolerance of --target-flops."""
    from ftwt_cli.workflows.plan import plan_search

    cfg = resolve_config(
        profile, verbose, model=model, data=data, checkpoint=checkpoint, samples=samples, image_size=image_size, batch_size=batch_size,
        device=device, seed=seed, data_root=data_root, download=download, workers=workers,
    )  # fmt: skip
    result = plan_search(cfg, target_flops, tolerance, cascade).result
    table = plain_table("step", "r", "estimated FLOPs ↓ %", title=f"bisection towards {target_flops:g}%")
    for i, step in enumerate(result.steps, 1):
        table.add_row(str(i), f"{step['r']:.6f}", f"{step['reduction_pct']:.2f}")
    console.print(table)
    if result.converged:
        console.print(f"r = {result.chosen_r:.6f} → estimated {result.estimated_reduction_pct:.2f}% (target {target_flops:g}%)")
    else:
        console.print(
            f"no r within ±{tolerance:g} points: the estimate is too coarse (few samples?); closest r = "
            f"{result.chosen_r:.6f} → {result.estimated_reduction_pct:.2f}%",
            style="yellow",
        )
    if json_out:
        emit_json(
            {
                "target": result.target,
                "chosen_r": result.chosen_r,
                "estimated_reduction_pct": result.estimated_reduction_pct,
                "converged": result.converged,
                "tolerance": tolerance,
                "cascade": cascade,
                "reachable_pct": list(result.reachable),
                "steps": result.steps,
            }
        )
