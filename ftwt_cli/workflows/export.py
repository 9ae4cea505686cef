"""``ftwt export`` and ``ftwt info``: ship a checkpoint as a file any runtime can load, checked against
the model ``ftwt eval`` builds, and read back what a checkpoint or exported file says about itself.

Export loads the checkpoint as ``ftwt eval`` does (a dense, static or FTWT model; an FTWT model with its
heads and calibrated offsets, masks predicted), traces it into the format (:mod:`ftwt_cli.io.artifact`),
runs the exported file on held-out test images and compares its logits with the model's: they must
agree within ``TOLERANCE`` (relative to the logits' scale when that exceeds 1), or nothing is written.
``--static-core`` exports the checkpoint's static core instead (:mod:`.static_core`); ``--format
checkpoint`` writes it (or the model) as an ftwt checkpoint.

Every file carries the description :func:`describe` builds: architecture spec, input size and
normalisation, class names, head spec, per-block logit offsets, calibration record, the ftwt version.
"""

from __future__ import annotations

import io
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ftwt_cli import __version__
from ftwt_cli.console import progress_bar
from ftwt_cli.core.flops import FlopsCounter
from ftwt_cli.core.gating import FTWTModel
from ftwt_cli.core.graph import analyze
from ftwt_cli.engine.scripted import NotRoutable, routing_program
from ftwt_cli.core.heads import HeadSpec
from ftwt_cli.errors import BadInput
from ftwt_cli.io import artifact, loading
from ftwt_cli.io import checkpoint as ckpt
from ftwt_cli.io import config as config_mod
from ftwt_cli.workflows.static_core import static_core_of

FORMATS = (*artifact.FORMATS, "checkpoint")
#: Largest |exported − model| logit difference accepted (times the logits' scale when above 1).
TOLERANCE = 1e-5


class ExportMismatch(RuntimeError):
    """The exported file does not compute what the model computes (nothing is written)."""


def checkpoint_config(profile: str, meta: dict, **overrides: Any) -> config_mod.Config:
    """The profile's configuration for ``meta``'s model, data and input size (options given win)."""
    base = {"model": meta.get("model"), "data": meta.get("data"), "image_size": (meta.get("input_size") or [0])[0]}
    return config_mod.resolve(profile, **{**base, **{k: v for k, v in overrides.items() if v is not None}})


def export_checkpoint(
    profile: str,
    checkpoint: str,
    fmt: str,
    out: str,
    *,
    static_core: bool = False,
    min_keep_rate: float = 0.0,
    check_samples: int = 32,
    show: Callable = progress_bar,
    **overrides: Any,
) -> dict:
    """Export ``checkpoint`` to ``out`` in ``fmt`` after checking it; returns the export record."""
    if fmt not in FORMATS:
        raise BadInput(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if not (0.0 <= min_keep_rate < 1.0):  # also rejects NaN
        raise BadInput(f"--min-keep-rate must be in [0, 1), got {min_keep_rate:g}")
    if check_samples < 1:
        raise BadInput(f"--check-samples must be at least 1, got {check_samples}")
    destination = Path(out)
    if destination.is_dir():
        raise BadInput(f"--out {destination} is a folder; give a file name")
    ckpt.check_writable(destination, "--out")
    meta = ckpt.load_checkpoint(checkpoint)["meta"]
    cfg = checkpoint_config(profile, meta, **overrides)
    loaded = loading.load_model(cfg, checkpoint)
    model = prepared(loaded.model)
    images = loading.first_test_images(cfg, check_samples)
    record: dict = {"checkpoint": str(checkpoint), "format": fmt, "path": str(destination), "kind": loaded.kind, "model": cfg.model}
    meta = loaded.meta
    if static_core:
        model, meta, record["static_core"] = static_core_of(cfg, loaded, min_keep_rate, images, show=show)
        model = prepared(model)
    # A model that routes is exported as its routing program where the format can hold one (TorchScript).
    program = None
    what = computes(model, meta, loading.input_size(cfg))
    if fmt == "torchscript" and isinstance(model, FTWTModel) and all(b.codebook is not None for b in model.blocks):
        try:
            program = routing_program(model)
            what.update(routed_computes(model, images))
        except NotRoutable as exc:  # e.g. a grouped conv: exported masked, and the report says why
            what["computes_note"] = f"{what['computes_note']} (no routing program: {exc})"
    record.update(what)
    description = {**describe(meta, model.state_dict(), fmt), **what}
    with torch.no_grad():
        expected = model(images)
    if not torch.isfinite(expected).all():
        broken = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
        where = f"; e.g. {broken[0]} holds NaN or inf" if broken else ""
        raise BadInput(f"{checkpoint} gives non-finite logits on the test images, so there is nothing to check an export against{where}")
    if fmt == "checkpoint":
        blob, check = _checkpoint_bytes(cfg, model, meta, images, expected)
    else:
        program = artifact.trace(program if program is not None else model, fmt, images[:2])
        run, runtime = artifact.runner(artifact.to_bytes(program, fmt, description), fmt)
        check = compare(run, images, expected, runtime)
        blob = artifact.to_bytes(program, fmt, {**description, "check": check})
    record["check"] = check
    if check["passed"] is False:
        raise ExportMismatch(
            f"the exported {fmt} file's logits differ from the model's by {check['max_abs_diff']:.3g} "
            f"(tolerance {check['tolerance']:.3g}); nothing written"
        )
    ckpt.atomic_write_bytes(destination, lambda f: f.write(blob))
    record["bytes"] = len(blob)
    return record


def computes(model: nn.Module, meta: dict, input_size) -> dict:
    """What the exported file computes per image: ``computes`` (masked, static core, static, dense), the
    MACs it executes (every filter it holds, heads included), the dense architecture's, and a note."""
    if isinstance(model, FTWTModel):
        heads = int(sum(h.macs for h in model.heads()))
        executed, dense = int(model.graph.dense_macs) + heads, int(meta.get("dense_macs") or model.graph.dense_macs)
        if meta.get("static_core"):
            what, note = "static core", "removed filters are gone; the gated ones are computed, then masked"
        else:
            what = "masked"
            note = (
                "every filter is computed, then masked: the FLOPs cut does not reach this file; for speed, route the "
                "model (ftwt calibrate --codebook K) and run it on the routing engine, or export --static-core"
            )  # fmt: skip
        return {"computes": what, "executed_macs": executed, "dense_macs": dense, "computes_note": note}
    executed = int(analyze(model, tuple(input_size)).dense_macs)
    kind = "static" if meta.get("kind") == "static" else "dense"
    return {"computes": kind, "executed_macs": executed, "dense_macs": int(meta.get("dense_macs") or executed), "computes_note": f"a plain {kind} network"}


def routed_computes(model: FTWTModel, images: torch.Tensor) -> dict:
    """What a routing program executes: the prototypes' MACs (mean over ``images``) plus the heads' scorers."""
    model.configure(record=True)
    with torch.no_grad():
        model(images)
    masks = [r.mask for r in model.records()]
    model.configure(record=False)
    scorers = sum(b.codebook.size * b.conv.in_channels for b in model.blocks)
    executed = float(FlopsCounter(model.graph).macs_from_masks(masks).float().mean()) + scorers
    note = "each image computes only the prototype sub-convs its heads choose (K per layer, weights pre-sliced)"
    return {"computes": "routed", "executed_macs": int(executed), "computes_note": note}


def prepared(model: nn.Module) -> nn.Module:
    """``model`` as ``ftwt eval`` runs it: eval mode; an FTWT model predicts its masks, records nothing."""
    model = model.cpu().eval()
    if isinstance(model, FTWTModel):
        model.configure(mask_source="predicted", record=False)
    return model


def compare(run: Callable | None, images: torch.Tensor, expected: torch.Tensor, runtime: str) -> dict:
    """How far the exported file's logits are from the model's on ``images`` (``passed`` None: not run)."""
    scale = float(expected.abs().max())
    tolerance = TOLERANCE * max(1.0, scale)
    check = {"images": int(images.shape[0]), "runtime": runtime, "tolerance": tolerance, "logit_scale": scale}
    if run is None:
        return {**check, "max_abs_diff": None, "passed": None}
    with torch.no_grad():
        got = run(images)
    diff = float((got.float() - expected.float()).abs().max())
    same_top1 = bool(torch.equal(got.argmax(dim=1), expected.argmax(dim=1)))
    return {**check, "max_abs_diff": diff, "same_top1": same_top1, "passed": diff <= tolerance}


def _checkpoint_bytes(cfg, model: nn.Module, meta: dict, images: torch.Tensor, expected: torch.Tensor) -> tuple[bytes, dict]:
    """An ftwt checkpoint of ``model`` and its check: loaded back as every command loads checkpoints."""
    payload = {"format": ckpt.FORMAT, "version": ckpt.VERSION, "meta": dict(meta), "model": ckpt._cpu_state(model.state_dict())}
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "check.pt"
        path.write_bytes(buffer.getvalue())
        reloaded = prepared(loading.load_model(cfg, str(path)).model)
    return buffer.getvalue(), compare(reloaded, images, expected, "ftwt")


def block_offsets(state: dict) -> dict[str, list[float]]:
    """Per gated block (dense conv name), its heads' logit offsets, read from an FTWT state dict (a static
    core's block: the offsets of its gated filters)."""
    offsets: dict[str, list[float]] = {}
    for key, value in state.items():
        for suffix in (".head.inner.logit_offset", ".head.logit_offset"):
            if key.endswith(suffix) and key.startswith("backbone."):
                name = key[len("backbone.") : -len(suffix)]
                if suffix == ".head.inner.logit_offset" or name not in offsets:
                    offsets[name] = [float(v) for v in value.flatten()]
                break
    return offsets


def describe(meta: dict, state: dict, fmt: str | None = None) -> dict:
    """What a checkpoint or exported file needs to be rebuilt and used on its own (plain values)."""
    side = meta.get("input_size") or [None, None]
    doc: dict = {
        "format": fmt,
        "ftwt_version": __version__,
        "trained_with_ftwt": meta.get("ftwt_version"),
        "kind": meta.get("kind"),
        "model": meta.get("model"),
        "num_classes": meta.get("num_classes"),
        "input_size": meta.get("input_size"),
        "input": {"name": "images", "shape": ["batch", 3, *side], "dtype": "float32", "normalized_with": meta.get("normalization")},
        "output": {"name": "logits", "shape": ["batch", meta.get("num_classes")]},
        "normalization": meta.get("normalization"),
        "class_names": meta.get("class_names"),
        "data": meta.get("data"),
    }
    if meta.get("kind") == "ftwt":
        offsets = block_offsets(state)
        doc.update(
            head=HeadSpec.from_meta(meta).to_meta(), r=meta.get("r"), target=meta.get("target"), mode=meta.get("mode"),
            signature=meta.get("signature"), blocks=list(offsets), offsets=offsets, calibration=meta.get("calibration"),
        )  # fmt: skip
    if meta.get("kind") == "static":
        doc.update({k: meta.get(k) for k in ("method", "target_flops", "dense_macs", "static_macs", "kept_filters", "pruning_history")})
    if meta.get("static_core"):
        doc.update(static_core=meta["static_core"], dense_macs=meta.get("dense_macs"), core_figures=meta.get("core_figures"))
    return doc


def info(path: str) -> dict:
    """The description of a checkpoint, a plain state_dict or an exported file; nothing in it is run."""
    file = Path(path)
    if file.is_dir():
        raise BadInput(f"{file} is a folder; give a checkpoint or an exported file")
    if not file.is_file():
        raise BadInput(f"file not found: {file}")
    found = artifact.read_meta(file)
    if found is not None:
        fmt, doc = found
        return {"file": str(file), "bytes": file.stat().st_size, **doc, "format": fmt}
    payload = ckpt.load_checkpoint(file, allow_state_dict=True)
    state = payload["model"]
    counts = {"tensors": len(state), "parameters": int(sum(v.numel() for v in state.values() if v.is_floating_point()))}
    if payload["meta"] is None:
        return {"file": str(file), "format": "state_dict", **counts, "note": "plain weights: no ftwt description"}
    meta = payload["meta"]
    doc = describe(meta, state, "checkpoint")
    extra = {"epoch": meta.get("epoch"), "test_top1": meta.get("test_top1"), "resumable": "train_state" in payload}
    return {"file": str(file), "bytes": file.stat().st_size, **doc, **counts, **extra}
