"""``ftwt calibrate``: per-layer head thresholds that make an FTWT checkpoint hit a FLOPs budget."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ftwt_cli.cli.app import (
    BatchOpt,
    DataOpt,
    DataRootOpt,
    DeviceOpt,
    DownloadOpt,
    ImageSizeOpt,
    JsonOpt,
    ModelOpt,
    ProfileOpt,
    VerboseOpt,
    WorkersOpt,
    command,
    handle_errors,
    resolve_config,
)
from ftwt_cli.cli.names import DEFAULT_PROFILE
from ftwt_cli.console import console, emit_json, plain_table


@command("calibrate")
@handle_errors
def calibrate_command(
    checkpoint: Annotated[str, typer.Argument(help="FTWT checkpoint (from 'ftwt train --ratio/--target-flops').")],
    target_flops: Annotated[
        float, typer.Option("--target-flops", help="Percent of dense FLOPs to REMOVE, heads' cost included, in (0, 100).")
    ],
    out: Annotated[
        Optional[str], typer.Option("--out", help="Where to write the calibrated checkpoint (default: NAME-calibrated.pt beside it).")
    ] = None,
    codebook: Annotated[
        Optional[int],
        typer.Option("--codebook", help="Route each image among K prototype masks per layer, fitted to the heads' masks (what makes the model fast)."),
    ] = None,
    profile: ProfileOpt = DEFAULT_PROFILE,
    model: ModelOpt = None,
    data: DataOpt = None,
    image_size: ImageSizeOpt = None,
    batch_size: BatchOpt = None,
    device: DeviceOpt = None,
    data_root: DataRootOpt = None,
    download: DownloadOpt = None,
    workers: WorkersOpt = None,
    verbose: VerboseOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Per-layer head thresholds so an FTWT checkpoint removes --target-flops % of the FLOPs.

    The thresholds are chosen on held-out training images; the test split is reported before and after."""
    from ftwt_cli.workflows.calibrate import calibrate_checkpoint
    from ftwt_cli.workflows.train.records import calibration_figures

    cfg = resolve_config(
        profile, verbose, model=model, data=data, image_size=image_size, batch_size=batch_size, device=device, data_root=data_root,
        download=download, workers=workers,
    )  # fmt: skip
    record = calibrate_checkpoint(cfg, checkpoint, target_flops, out, codebook=codebook)
    destination = record["path"]
    table = plain_table("", "FLOPs ↓", "top-1", title=f"ftwt calibrate → {destination}")
    table.add_row(f"held-out images ({record['images']}), before → after", f"{record['raw_pct']:.2f}% → {record['reached_pct']:.2f}%", "")
    for label, flops, top1 in calibration_figures(record, given="as given"):
        table.add_row(f"test, {label}", f"{flops:.2f}%", f"{top1:.2f}%")
    console.print(table)
    how = (
        f"prototypes keep the channels ≥ {record['tau']:.4f} of their images keep" if "tau" in record
        else f"per-layer keep rates of the ground truth at r' = {record['ratio']:.4f}"
    )  # fmt: skip
    console.print(f"target {record['target_pct']:g}% (heads included): {how}")
    if json_out:
        emit_json(record)
