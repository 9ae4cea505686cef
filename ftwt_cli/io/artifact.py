"""Exported models: a traced eval-mode model as TorchScript, ONNX or a torch.export program (pt2), each
file carrying ftwt's description of it (``ftwt.json``) so that it can be used and rebuilt on its own.

* TorchScript and pt2 files are zip archives; the description is the extra file ``extra/ftwt.json``,
  read back here from the archive without loading (running) the program.
* ONNX files carry it in the model's ``metadata_props`` under ``ftwt``; writing and reading them needs
  the ``onnx`` package, checking them ``onnxruntime`` (both the optional extra ``ftwt[onnx]``).

The batch dimension is dynamic in every format. Masks are data-dependent products (conv output × mask),
which every format represents as they are.
"""

from __future__ import annotations

import importlib
import io
import json
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ftwt_cli.errors import BadInput

FORMATS = ("torchscript", "onnx", "pt2")
META_NAME = "ftwt.json"
ONNX_EXTRA = "pip install 'ftwt[onnx]' (or pip install onnx onnxruntime)"
ONNX_OPSET = 17


def optional(module: str, what: str):
    """An optional dependency, imported on first use; BadInput telling how to install it when missing."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise BadInput(f"{what} needs {module}, which is not installed: {ONNX_EXTRA}") from None


def trace(model: nn.Module, fmt: str, example: torch.Tensor) -> Any:
    """The format's program of ``model`` (eval mode, batch dimension dynamic)."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer and exporter notes about data-dependent masks and deprecations
        if fmt == "torchscript":
            if isinstance(model, torch.jit.ScriptModule):  # already a program (a routing model)
                return model
            return torch.jit.trace(model, example, check_trace=False)
        if fmt == "pt2":
            batch = torch.export.Dim("batch", min=1, max=65536)
            return torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
        onnx = optional("onnx", "--format onnx")
        buffer = io.BytesIO()
        torch.onnx.export(
            model, (example,), buffer, dynamo=False, opset_version=ONNX_OPSET, input_names=["images"],
            output_names=["logits"], dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
        )  # fmt: skip
        return onnx.load_from_string(buffer.getvalue())


def to_bytes(program: Any, fmt: str, meta: dict) -> bytes:
    """The file's bytes: the program with ``meta`` embedded."""
    text = json.dumps(meta, sort_keys=True)
    buffer = io.BytesIO()
    if fmt == "torchscript":
        torch.jit.save(program, buffer, _extra_files={META_NAME: text})
    elif fmt == "pt2":
        torch.export.save(program, buffer, extra_files={META_NAME: text})
    else:
        del program.metadata_props[:]
        entry = program.metadata_props.add()
        entry.key, entry.value = "ftwt", text
        return program.SerializeToString()
    return buffer.getvalue()


def runner(blob: bytes, fmt: str) -> tuple[Callable[[torch.Tensor], torch.Tensor] | None, str]:
    """A function running the exported file on images, and the runtime's name (None: none installed)."""
    if fmt == "torchscript":
        program = torch.jit.load(io.BytesIO(blob), map_location="cpu")
        return (lambda x: program(x)), "torch.jit"
    if fmt == "pt2":
        module = torch.export.load(io.BytesIO(blob)).module()
        return (lambda x: module(x)), "torch.export"
    try:
        ort = importlib.import_module("onnxruntime")
    except ImportError:
        return None, "onnxruntime (not installed)"
    session = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    return (lambda x: torch.from_numpy(session.run(None, {"images": x.numpy()})[0])), f"onnxruntime {ort.__version__}"


def read_meta(path: str | Path) -> tuple[str, dict] | None:
    """(format, embedded description) of an exported file; None if ``path`` is not one (an ftwt checkpoint
    or another torch file is not). Nothing in the file is run."""
    path = Path(path)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            found = [n for n in names if n.endswith(f"extra/{META_NAME}")]
            if not found:
                return None
            doc = _parsed(archive.read(found[0]), path)
            return str(doc.get("format", "torchscript")), doc
    with open(path, "rb") as f:
        head = f.read(64)
    if b"ftwt" not in _onnx_probe(path, head):
        return None
    onnx = optional("onnx", f"reading the ONNX file {path}")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - protobuf decode errors of every kind
        raise BadInput(f"cannot read {path}: a truncated or corrupt ONNX file") from None
    props = {p.key: p.value for p in model.metadata_props}
    if "ftwt" not in props:
        return None
    return "onnx", _parsed(props["ftwt"].encode(), path)


def _onnx_probe(path: Path, head: bytes) -> bytes:
    """The file's bytes when it looks like an ONNX protobuf (field 1 ir_version), else nothing."""
    if not head or head[0] != 0x08:
        return b""
    return path.read_bytes()


def _parsed(text: bytes, path: Path) -> dict:
    try:
        doc = json.loads(text)
    except ValueError:
        raise BadInput(f"{path}: its embedded {META_NAME} is not valid JSON") from None
    if not isinstance(doc, dict):
        raise BadInput(f"{path}: its embedded {META_NAME} is not a JSON object")
    return doc
