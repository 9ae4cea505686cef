"""``ftwt train``: dense baselines and FTWT dynamic training (decoupled or joint), resumable, torchrun-ready."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from ftwt_cli import runtime
from ftwt_cli import train as training
from ftwt_cli.checkpoint import check_writable
from ftwt_cli.cli import (
    BatchOpt,
    DataOpt,
    DataRootOpt,
    DeviceOpt,
    DownloadOpt,
    JsonOpt,
    ModelOpt,
    SamplesOpt,
    SeedOpt,
    WorkersOpt,
    app,
    handle_errors,
    resolve_config,
)
from ftwt_cli.cli.plan import TargetOpt
from ftwt_cli.config import DEFAULT_PROFILE
from ftwt_cli.console import console, emit_json
from ftwt_cli.errors import BadInput


def _given(**options) -> list[str]:
    return ["--" + name.replace("_", "-") for name, value in options.items() if value not in (None, False)]


@app.command("train")
@handle_errors
def train_command(
    dense: Annotated[bool, typer.Option("--dense", help="Train the plain backbone (the baseline FTWT starts from).")] = False,
    init: Annotated[
        Optional[str], typer.Option("--init", "--checkpoint", help="Dense weights to start FTWT from: an ftwt checkpoint, a plain state_dict, or 'torchvision' "
            "(pretrained; also the profile's pretrained = true). Default: the profile's.")
    ] = None,
    r: Annotated[Optional[float], typer.Option("--r", "--ratio", help="Mass ratio of the targets, in (0, 1] (--ratio under torchrun, whose own parser claims --r).")] = None,
    target_flops: TargetOpt = None,
    mode: Annotated[Optional[str], typer.Option("--mode", help="decoupled | joint")] = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs", help="Epochs (with --resume: train up to this many).")] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help="Backbone learning rate.")] = None,
    milestones: Annotated[Optional[str], typer.Option("--milestones", help="Epochs where lr drops ×gamma: 80,120.")] = None,
    head_lr: Annotated[Optional[float], typer.Option("--head-lr", help="Decision heads' learning rate.")] = None,
    freeze_heads_after: Annotated[
        Optional[float], typer.Option("--freeze-heads-after", help="Fraction of epochs after which heads stop (1: never).")
    ] = None,
    head_init: Annotated[
        Optional[str], typer.Option("--head-init", help="random | ones (warm heads up to keep every channel first)")
    ] = None,
    head_softmax: Annotated[
        Optional[bool], typer.Option("--head-softmax/--no-head-softmax", help="Softmax over the pooled head input.")
    ] = None,
    head_pool: Annotated[
        Optional[str], typer.Option("--head-pool", help="max | avg: global pooling of the head input (paper text: max).")
    ] = None,
    head_norm: Annotated[
        Optional[bool],
        typer.Option("--head-norm/--no-head-norm", help="Standardise the pooled head input per channel (folded at inference)."),
    ] = None,
    head_warmup: Annotated[
        Optional[int],
        typer.Option("--head-warmup", help="Epochs of head-only training on the frozen backbone before masks apply (default 0)."),
    ] = None,
    calibrate: Annotated[
        Optional[bool],
        typer.Option(
            "--calibrate/--no-calibrate",
            help="With --target-flops: set per-layer head thresholds on held-out training images so best.pt hits the budget.",
        ),
    ] = None,
    val_fraction: Annotated[
        Optional[float],
        typer.Option("--val-fraction", help="Training images held out (seeded) to choose best.pt and calibrate (default 0.1)."),
    ] = None,
    out: Annotated[Optional[str], typer.Option("--out", help="Run directory (default runs/<profile>-<mode>...).")] = None,
    resume: Annotated[Optional[str], typer.Option("--resume", help="Continue this run directory.")] = None,
    profile: Annotated[Optional[str], typer.Option("--profile", help="Profile name (see 'ftwt profiles').")] = None,
    model: ModelOpt = None,
    data: DataOpt = None,
    samples: SamplesOpt = None,
    batch_size: BatchOpt = None,
    device: DeviceOpt = None,
    seed: SeedOpt = None,
    data_root: DataRootOpt = None,
    download: DownloadOpt = None,
    workers: WorkersOpt = None,
    sync_bn: Annotated[
        Optional[bool], typer.Option("--sync-bn/--no-sync-bn", help="SyncBatchNorm across torchrun processes (CUDA).")
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Train a dense baseline (--dense) or an FTWT model from one (--init, --r or --target-flops)."""
    is_main = os.environ.get("RANK", "0") == "0"
    if resume:
        fixed = _given(
            dense=dense, init=init, r=r, target_flops=target_flops, mode=mode, lr=lr, milestones=milestones,
            head_lr=head_lr, freeze_heads_after=freeze_heads_after, head_init=head_init, head_softmax=head_softmax,
            head_pool=head_pool, head_norm=head_norm, calibrate=calibrate, val_fraction=val_fraction, head_warmup=head_warmup, out=out, profile=profile, model=model, data=data, samples=samples, batch_size=batch_size, seed=seed,
        )  # fmt: skip
        if fixed:
            raise BadInput(f"--resume continues a run as it was configured; drop {', '.join(fixed)}")
        spec = training.read_spec(Path(resume))
        spec.config = spec.config.override(device=device, workers=workers, data_root=data_root, download=download, sync_bn=sync_bn)
        check_writable(resume, "--resume")
        if epochs is not None:
            spec.config = spec.config.override(**{"dense_epochs" if spec.dense else "epochs": epochs})
    else:
        if r is not None and target_flops is not None:
            raise BadInput("give either --r or --target-flops, not both")
        if dense and (clash := _given(init=init, r=r, target_flops=target_flops, mode=mode)):
            raise BadInput(f"--dense trains the plain backbone; {', '.join(clash)} apply to FTWT training")
        prefix = "dense_" if dense else ""
        cfg = resolve_config(
            profile or DEFAULT_PROFILE,
            show=is_main,
            model=model, data=data, samples=samples, train_samples=samples, batch_size=batch_size, device=device, seed=seed,
            sync_bn=sync_bn, pretrained=False if dense else None,
            data_root=data_root, download=download, workers=workers, r=r, mode=mode, head_lr=head_lr,
            freeze_heads_after=freeze_heads_after, head_init=head_init, head_softmax=head_softmax,
            head_pool=head_pool, head_norm=head_norm, calibrate=calibrate, val_fraction=val_fraction,
            head_warmup=head_warmup,
            **{
                f"{prefix}epochs": epochs,
                f"{prefix}lr": lr,
                f"{prefix}milestones": training.parse_milestones(milestones) if milestones is not None else None,
            },
        )  # fmt: skip
        spec = training.RunSpec(cfg, dense, init=None if dense else runtime.initial_weights(cfg, init), target_flops=target_flops)
        check_writable(out or "runs", "--out")
    try:
        summary = training.train(spec, out=out, resume=resume)
    except training.NonFiniteLoss as exc:
        console.print(f"[red]error:[/red] {exc}; stopped, the last good checkpoint is kept", highlight=False)
        raise typer.Exit(1) from None
    if not is_main:
        return
    table = Table("", "", title=f"ftwt train ({summary.mode})", show_header=False)
    table.add_row("run directory", summary.run_dir)
    table.add_row("epochs", str(summary.epochs))
    if summary.r is not None:
        table.add_row("r", f"{summary.r:.4g}")
    table.add_row(f"best {summary.selected_on} top-1", f"{summary.best_top1:.2f}%")
    table.add_row("final test top-1", f"{summary.test_top1:.2f}%")
    if summary.flops_reduction_pct is not None:
        table.add_row("FLOPs reduction (measured)", f"{summary.flops_reduction_pct:.2f}%")
        table.add_row("  with heads", f"{summary.flops_reduction_with_heads_pct:.2f}%")
    if summary.estimate is not None:
        table.add_row("FLOPs reduction (estimated)", f"{summary.estimate['estimated_reduction_pct']:.2f}%")
    if summary.calibration is not None:
        c = summary.calibration
        table.add_row("best.pt, raw heads (test)", f"{c['test_reduction_raw_pct']:.2f}% FLOPs ↓, top-1 {c['test_top1_raw']:.2f}%")
        table.add_row("best.pt, as trained (test)", f"{c['test_reduction_trained_pct']:.2f}% FLOPs ↓, top-1 {c['test_top1_trained']:.2f}%")
        table.add_row(
            f"best.pt, calibrated to {c['target_pct']:g}% (test)",
            f"{c['test_reduction_calibrated_pct']:.2f}% FLOPs ↓, top-1 {c['test_top1_calibrated']:.2f}%",
        )
    table.add_row("best.pt chosen on", "held-out training images (val)" if summary.selected_on == "val" else "test split")
    console.print(table)
    if json_out:
        emit_json(summary.to_dict())
