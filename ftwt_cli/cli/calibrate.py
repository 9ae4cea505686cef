"""``ftwt calibrate``: per-layer head thresholds that make an FTWT checkpoint hit a FLOPs budget."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from ftwt_cli.calibrate import calibrate_checkpoint
from ftwt_cli.cli import (
    BatchOpt,
    DataOpt,
    DataRootOpt,
    DeviceOpt,
    DownloadOpt,
    JsonOpt,
    ModelOpt,
    ProfileOpt,
    WorkersOpt,
    app,
    handle_errors,
    resolve_config,
)
from ftwt_cli.config import DEFAULT_PROFILE
from ftwt_cli.console import console, emit_json
from ftwt_cli.errors import BadInput


@app.command("calibrate")
@handle_errors
def calibrate_command(
    checkpoint: Annotated[str, typer.Argument(help="FTWT checkpoint (from 'ftwt train --r/--target-flops').")],
    target_flops: Annotated[
        float, typer.Option("--target-flops", help="Percent of dense FLOPs to REMOVE, heads' cost included, in (0, 100).")
    ],
    out: Annotated[
        Optional[str], typer.Option("--out", help="Where to write the calibrated checkpoint (default: NAME-calibrated.pt beside it).")
    ] = None,
    profile: ProfileOpt = DEFAULT_PROFILE,
    model: ModelOpt = None,
    data: DataOpt = None,
    batch_size: BatchOpt = None,
    device: DeviceOpt = None,
    data_root: DataRootOpt = None,
    download: DownloadOpt = None,
    workers: WorkersOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Choose per-layer head thresholds on held-out training images so the model removes --target-flops % of
    the FLOPs; report the test split before and after."""
    source = Path(checkpoint)
    if not source.is_file():
        raise BadInput(f"checkpoint {checkpoint} does not exist")
    destination = Path(out) if out else source.with_name(f"{source.stem}-calibrated{source.suffix}")
    if destination.exists() and destination.is_dir():
        raise BadInput(f"--out {destination} is a folder; give a file name")
    cfg = resolve_config(
        profile, model=model, data=data, batch_size=batch_size, device=device, data_root=data_root,
        download=download, workers=workers,
    )  # fmt: skip
    record = calibrate_checkpoint(cfg, str(source), target_flops, str(destination))
    table = Table("", "FLOPs ↓", "top-1", title=f"ftwt calibrate → {destination}")
    table.add_row(f"held-out images ({record['images']}), before → after", f"{record['raw_pct']:.2f}% → {record['reached_pct']:.2f}%", "")
    for what, key in (("test, raw heads", "raw"), ("test, as given", "trained"), ("test, calibrated", "calibrated")):
        table.add_row(what, f"{record[f'test_reduction_{key}_pct']:.2f}%", f"{record[f'test_top1_{key}']:.2f}%")
    console.print(table)
    console.print(
        f"target {record['target_pct']:g}% (heads included): per-layer keep rates of the ground truth at r' = {record['ratio']:.4f}"
    )
    if json_out:
        emit_json(record)
