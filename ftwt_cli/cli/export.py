"""``ftwt export`` (a checkpoint as TorchScript, ONNX, a torch.export program or a static core) and ``ftwt
info`` (what a checkpoint or exported file says about itself)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.table import Table

from ftwt_cli.cli.app import BatchOpt, DataOpt, DataRootOpt, JsonOpt, ProfileOpt, WorkersOpt, command, handle_errors
from ftwt_cli.cli.names import DEFAULT_PROFILE, EXPORT_FORMATS
from ftwt_cli.console import console, emit_json, plain_table
from ftwt_cli.errors import BadInput


@command("export")
@handle_errors
def export_command(
    checkpoint: Annotated[str, typer.Argument(help="A dense, static or FTWT checkpoint (calibrated or not).")],
    fmt: Annotated[str, typer.Option("--format", help=f"{' | '.join(EXPORT_FORMATS)}.")] = "torchscript",
    out: Annotated[Optional[str], typer.Option("--out", help="The file to write.")] = None,
    static_core: Annotated[
        bool, typer.Option("--static-core", help="Export the static core: never-kept filters removed, always-kept ones ungated.")
    ] = False,
    min_keep_rate: Annotated[
        float, typer.Option("--min-keep-rate", help="With --static-core: also remove filters kept in fewer than this fraction of held-out images.")
    ] = 0.0,
    check_samples: Annotated[int, typer.Option("--check-samples", help="Test images the exported file is checked on.")] = 32,
    profile: ProfileOpt = DEFAULT_PROFILE,
    data: DataOpt = None,
    batch_size: BatchOpt = None,
    data_root: DataRootOpt = None,
    workers: WorkersOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Export a checkpoint (model, heads and calibrated offsets) checked against ftwt eval's model on test images."""
    if not out:
        raise BadInput("--out FILE is required (where to write the exported model)")
    from ftwt_cli.workflows.export import export_checkpoint

    record = export_checkpoint(
        profile, checkpoint, fmt, out, static_core=static_core, min_keep_rate=min_keep_rate,
        check_samples=check_samples, data=data, batch_size=batch_size, data_root=data_root, workers=workers,
    )  # fmt: skip
    check = record["check"]
    table = plain_table("", "", title=f"ftwt export → {record['path']}", show_header=False)
    table.add_row("format", record["format"])
    table.add_row("model", f"{record['model']} ({record['kind']}{', static core' if static_core else ''})")
    table.add_row("bytes", f"{record['bytes']:,}")
    table.add_row("computes", f"{record['computes']}: {record['executed_macs'] / 1e6:.3f} MMACs per image executed "
                  f"(dense {record['dense_macs'] / 1e6:.3f}); {record['computes_note']}")
    if check["passed"] is None:
        table.add_row("check", f"not run: {check['runtime']}")
    else:
        table.add_row("check", f"max |Δ logit| {check['max_abs_diff']:.3g} on {check['images']} test images ({check['runtime']}), tolerance {check['tolerance']:.3g}")
    console.print(table)
    if "static_core" in record:
        console.print(_core_table(record["static_core"]))
    if json_out:
        emit_json(record)


def _core_table(figures: dict) -> Table:
    table = plain_table("", "gated", "static core", title="static core against the gated model (test split)")
    gated, core = figures["gated"], figures["core"]
    table.add_row("top-1 %", f"{gated['top1']:.2f}", f"{core['top1']:.2f}")
    table.add_row("FLOPs ↓ % (masks, vs dense)", f"{gated['flops_reduction_pct']:.2f}", f"{core['flops_reduction_pct']:.2f}")
    table.add_row("MMACs (masks) + heads", f"{gated['mean_macs'] / 1e6:.3f} + {gated['head_macs'] / 1e6:.3f}", f"{core['mean_macs'] / 1e6:.3f} + {core['head_macs'] / 1e6:.3f}")
    table.add_row("MMACs executed (heads included)", f"{gated['executed_macs'] / 1e6:.3f}", f"{core['executed_macs'] / 1e6:.3f}")
    threads = figures["latency_threads"]
    table.add_row(f"batch-1 latency ms (median, {threads} thread{'s' if threads > 1 else ''}, interleaved)", f"{gated['latency_ms']:.3f}", f"{core['latency_ms']:.3f}")
    table.add_row("filters removed / always / gated", "", f"{figures['removed_filters']} / {figures['always_kept_filters']} / {figures['gated_filters']}")
    return table


@command("info")
@handle_errors
def info_command(
    file: Annotated[str, typer.Argument(help="An ftwt checkpoint, a plain state_dict, or a file from 'ftwt export'.")],
    json_out: JsonOpt = False,
) -> None:
    """What a checkpoint or exported file carries: architecture, input, normalisation, classes, heads, offsets, calibration."""
    from ftwt_cli.workflows.export import info

    doc = info(file)
    table = plain_table("", "", title=f"ftwt info {file}", show_header=False)
    for key in ("format", "kind", "model", "num_classes", "input_size", "data", "ftwt_version", "trained_with_ftwt", "tensors", "parameters", "epoch"):
        if doc.get(key) is not None:
            table.add_row(key, str(doc[key]))
    if doc.get("computes"):
        table.add_row("computes", f"{doc['computes']}: {doc['executed_macs'] / 1e6:.3f} MMACs per image executed; {doc.get('computes_note', '')}")
    if doc.get("normalization"):
        table.add_row("normalization", f"mean {doc['normalization']['mean']}, std {doc['normalization']['std']}")
    if doc.get("class_names"):
        names = doc["class_names"]
        table.add_row("class names", ", ".join(names[:8]) + (f", … ({len(names)})" if len(names) > 8 else ""))
    if doc.get("head"):
        table.add_row("head", ", ".join(f"{k}={v}" for k, v in doc["head"].items()) + f"; r={doc.get('r')}, target={doc.get('target')}")
    if doc.get("offsets") is not None:
        values = [v for block in doc["offsets"].values() for v in block]
        span = f"{min(values):.4g} … {max(values):.4g}" if values else "–"
        table.add_row("logit offsets", f"{len(doc['offsets'])} blocks, {span}")
    if doc.get("calibration"):
        c = doc["calibration"]
        table.add_row("calibration", f"target {c.get('target_pct')}% FLOPs ↓, reached {c.get('reached_pct', float('nan')):.2f}% on {c.get('images')} held-out images")
    if doc.get("static_core"):
        kept = doc["static_core"]["kept"]
        table.add_row("static core", f"{sum(map(len, kept))} filters kept, {sum(map(len, doc['static_core']['gated']))} gated")
    if doc.get("check"):
        table.add_row("export check", f"max |Δ logit| {doc['check'].get('max_abs_diff')} on {doc['check'].get('images')} images")
    if doc.get("note"):
        table.add_row("note", doc["note"])
    console.print(table)
    if json_out:
        emit_json(doc)
