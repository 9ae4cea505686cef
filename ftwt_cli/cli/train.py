"""``ftwt train``: dense baselines and FTWT dynamic training (decoupled or joint), resumable, torchrun-ready."""

from __future__ import annotations

import os
from typing import Annotated, Optional

import typer

from ftwt_cli.cli import names
from ftwt_cli.cli.app import (
    BatchOpt,
    DataOpt,
    DataRootOpt,
    DeviceOpt,
    DownloadOpt,
    ImageSizeOpt,
    JsonOpt,
    ModelOpt,
    SamplesOpt,
    SeedOpt,
    TargetOpt,
    VerboseOpt,
    WorkersOpt,
    alias,
    command,
    handle_errors,
    resolve_config,
    spelled,
)
from ftwt_cli.console import console, emit_json, error_line, plain_table
from ftwt_cli.errors import BadInput

#: Options whose name is not their parameter's; filled per run with the spelling the user typed.
_SPELLING: dict[str, str] = {"init": "--checkpoint", "r": "--ratio"}


def _given(**options) -> list[str]:
    return [_SPELLING.get(name, "--" + name.replace("_", "-")) for name, value in options.items() if value not in (None, False)]


@command("train")
@handle_errors
def train_command(
    dense: Annotated[bool, typer.Option("--dense", help="Train the plain backbone (the baseline FTWT starts from).")] = False,
    checkpoint: Annotated[
        Optional[str], typer.Option("--checkpoint", help="Dense weights to start FTWT from: an ftwt checkpoint, a plain state_dict, or 'torchvision' "
            "(pretrained; also the profile's pretrained = true). Default: the profile's.")
    ] = None,
    ratio: Annotated[Optional[float], typer.Option("--ratio", help="Mass ratio r of the targets, in (0, 1].")] = None,
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
    head: Annotated[
        Optional[str], typer.Option("--head", help=f"Decision head variant: {' | '.join(names.HEADS)} (default: paper).")
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
    static: Annotated[
        Optional[str],
        typer.Option("--static", help=f"Static baseline instead of FTWT: {' | '.join(names.STATIC_METHODS)}; needs --target-flops."),
    ] = None,
    signature: Annotated[
        Optional[str],
        typer.Option("--signature", help="Predefined signature: JSON FILE of per-block kept filters, or taylor (with --target-flops)."),
    ] = None,
    static_signature: Annotated[
        bool, typer.Option("--static-signature", help="With --signature: prune the same counts statically (one filter set).")
    ] = False,
    gate: Annotated[
        Optional[str],
        typer.Option("--gate", help=f"Which conv→BN blocks get heads: {' | '.join(names.GATES)} (internal: not the convs before residual adds)."),
    ] = None,
    codebook: Annotated[
        Optional[int],
        typer.Option("--codebook", help="With --target-flops: route each image among K prototype masks per layer, fitted when the heads freeze."),
    ] = None,
    distill: Annotated[
        Optional[float],
        typer.Option("--distill", help="Distil from the dense init at this temperature (FTWT and static baselines; 0: off)."),
    ] = None,
    distill_weight: Annotated[
        Optional[float], typer.Option("--distill-weight", help="Share of the distillation term in the task loss (default 0.5).")
    ] = None,
    bn_reestimate: Annotated[
        Optional[bool],
        typer.Option("--bn-reestimate/--no-bn-reestimate", help="With --target-flops: re-estimate BN statistics under best.pt's final masks."),
    ] = None,
    gt: Annotated[
        Optional[str],
        typer.Option("--gt", help="Ground truth of the heads: " + " | ".join(f"{n} ({h})" for n, h in names.TARGETS.items()) + "."),
    ] = None,
    out: Annotated[Optional[str], typer.Option("--out", help="Run directory (default runs/<profile>-<mode>...).")] = None,
    resume: Annotated[Optional[str], typer.Option("--resume", help="Continue this run directory.")] = None,
    profile: Annotated[Optional[str], typer.Option("--profile", help="Profile name (see 'ftwt profiles').")] = None,
    model: ModelOpt = None,
    data: DataOpt = None,
    samples: SamplesOpt = None,
    image_size: ImageSizeOpt = None,
    batch_size: BatchOpt = None,
    device: DeviceOpt = None,
    seed: SeedOpt = None,
    data_root: DataRootOpt = None,
    download: DownloadOpt = None,
    workers: WorkersOpt = None,
    sync_bn: Annotated[
        Optional[bool], typer.Option("--sync-bn/--no-sync-bn", help="SyncBatchNorm across torchrun processes (CUDA).")
    ] = None,
    verbose: VerboseOpt = False,
    json_out: JsonOpt = False,
    # Old spellings, hidden: --r (torchrun's own parser claims it) and --init.
    r_old: Annotated[Optional[float], alias("--r", "FLOAT")] = None,
    init_old: Annotated[Optional[str], alias("--init")] = None,
) -> None:
    """Train a dense baseline (--dense) or an FTWT model from one (--checkpoint, with --ratio or --target-flops)."""
    from ftwt_cli.workflows import train as training

    r, _SPELLING["r"] = spelled(ratio, r_old, "--ratio", "--r")
    init, _SPELLING["init"] = spelled(checkpoint, init_old, "--checkpoint", "--init")
    is_main = os.environ.get("RANK", "0") == "0"
    ftwt_options = dict(
        r=r, mode=mode, head_lr=head_lr, freeze_heads_after=freeze_heads_after, head_init=head_init, head=head,
        head_softmax=head_softmax, head_pool=head_pool, head_norm=head_norm, head_warmup=head_warmup, calibrate=calibrate,
        gate=gate, codebook=codebook, bn_reestimate=bn_reestimate,
    )  # fmt: skip
    distillation = dict(distill=distill, distill_weight=distill_weight)
    if codebook is not None and codebook < 1:
        raise BadInput(f"--codebook K needs at least 1 prototype per layer, got {codebook}")
    if distill is not None and not distill > 0:
        raise BadInput(f"--distill is a temperature and must be positive, got {distill:g}")
    try:
        if resume:
            fixed = _given(
                dense=dense, init=init, target_flops=target_flops, lr=lr, milestones=milestones, val_fraction=val_fraction,
                out=out, profile=profile, model=model, data=data, samples=samples, image_size=image_size, batch_size=batch_size, seed=seed,
                static=static, signature=signature, static_signature=static_signature, gt=gt, **ftwt_options,
                **distillation,
            )  # fmt: skip
            if fixed:
                raise BadInput(f"--resume continues a run as it was configured; drop {', '.join(fixed)}")
            summary = training.resume(
                resume, epochs, device=device, workers=workers, data_root=data_root, download=download, sync_bn=sync_bn
            )  # fmt: skip
        else:
            if r is not None and target_flops is not None:
                raise BadInput(f"give either {_SPELLING['r']} or --target-flops, not both")
            if dense and (clash := _given(init=init, r=r, target_flops=target_flops, mode=mode, static=static, signature=signature,
                                          codebook=codebook, distill=distill)):
                raise BadInput(f"--dense trains the plain backbone; {', '.join(clash)} apply to FTWT training")
            _check_baseline_options(static, signature, static_signature, gt, target_flops, **ftwt_options)
            prefix = "dense_" if dense else ""
            cfg = resolve_config(
                profile or names.DEFAULT_PROFILE,
                verbose,
                show=is_main,
                model=model, data=data, image_size=image_size, samples=samples, train_samples=samples, batch_size=batch_size, device=device,
                seed=seed, sync_bn=sync_bn, pretrained=False if dense else None, data_root=data_root, download=download,
                workers=workers, val_fraction=val_fraction, **ftwt_options, **distillation,
                target="topk" if (signature and not static_signature) else gt,
                **{
                    f"{prefix}epochs": epochs,
                    f"{prefix}lr": lr,
                    f"{prefix}milestones": training.parse_milestones(milestones) if milestones is not None else None,
                },
            )  # fmt: skip
            summary = training.start(
                cfg, out, dense=dense, init=init, target_flops=target_flops, static=static, signature=signature,
                static_signature=static_signature,
            )  # fmt: skip
    except training.NonFiniteLoss as exc:
        error_line(f"{exc}; stopped, the last good checkpoint is kept")
        raise typer.Exit(1) from None
    if not is_main:
        return
    from ftwt_cli.workflows.train.records import calibration_figures

    table = plain_table("", "", title=f"ftwt train ({summary.mode})", show_header=False)
    table.add_row("run directory", summary.run_dir)
    table.add_row("epochs", str(summary.epochs))
    if summary.r is not None:
        table.add_row("r", f"{summary.r:.4g}")
    table.add_row(f"best {summary.selected_on} top-1", f"{summary.best_top1:.2f}%")
    table.add_row("final test top-1", f"{summary.test_top1:.2f}%")
    if summary.best_test_top1 is not None:  # best.pt's, which the last epoch's need not be
        table.add_row(f"best.pt test top-1 (epoch {summary.best_epoch})", f"{summary.best_test_top1:.2f}%")
    if summary.flops_reduction_pct is not None:
        table.add_row("FLOPs reduction (measured)", f"{summary.flops_reduction_pct:.2f}%")
        if summary.flops_reduction_with_heads_pct is not None:
            table.add_row("  with heads", f"{summary.flops_reduction_with_heads_pct:.2f}%")
    if summary.estimate is not None:
        table.add_row("FLOPs reduction (estimated)", f"{summary.estimate['estimated_reduction_pct']:.2f}%")
    if summary.calibration is not None:
        c = summary.calibration
        for label, flops, top1 in calibration_figures(c):
            what = f"calibrated to {c['target_pct']:g}%" if label == "calibrated" else label
            table.add_row(f"best.pt, {what} (test)", f"{flops:.2f}% FLOPs ↓, top-1 {top1:.2f}%")
    table.add_row("best.pt chosen on", "held-out training images (val)" if summary.selected_on == "val" else "test split")
    console.print(table)
    if json_out:
        emit_json(summary.to_dict())


def _check_baseline_options(static, signature, static_signature, gt, target_flops, **ftwt_options) -> None:
    """One-line errors for option combinations of the static baselines, signatures and --gt."""
    from ftwt_cli.algorithms.static import STATIC_METHODS
    from ftwt_cli.core.targets import TARGETS

    if gt is not None and gt not in TARGETS:
        raise BadInput(f"--gt must be {TARGETS.alternatives()}, got {gt!r}")
    if static is not None and static not in STATIC_METHODS:
        raise BadInput(f"--static must be {STATIC_METHODS.alternatives()}, got {static!r}")
    if static and signature:
        raise BadInput("give --static (uniform/taylor) or --signature, not both (--static-signature prunes a signature statically)")
    if static_signature and not signature:
        raise BadInput("--static-signature prunes a predefined signature: add --signature FILE|taylor")
    if static or static_signature:
        what = f"--static {static}" if static else "--static-signature"
        if clash := _given(gt=gt, **ftwt_options):
            raise BadInput(f"{what} fine-tunes a pruned plain model; {', '.join(clash)} apply to FTWT training")
    elif signature:
        if clash := _given(gt=gt, r=ftwt_options["r"]):
            raise BadInput(f"--signature fixes per-layer counts with top-k targets; drop {', '.join(clash)}")
    elif gt == "topk" and target_flops is not None:
        raise BadInput("--target-flops searches the mass ratio r; with --gt topk give --ratio (the kept fraction)")
    if not (static or static_signature) and target_flops is None and (clash := _given(codebook=ftwt_options["codebook"], bn_reestimate=ftwt_options["bn_reestimate"])):
        raise BadInput(f"{', '.join(clash)} fit the delivered model to a FLOPs budget: add --target-flops P")
