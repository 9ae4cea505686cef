"""Checkpoints: tensors and plain types only, written atomically, read with ``weights_only=True``.

A checkpoint is one ``.pt`` file holding a dict::

    {"format": "ftwt", "version": 1,
     "meta": {"kind": "dense"|"ftwt", "model": str, "num_classes": int, "input_size": [H, W],
              "head_softmax": bool, "r": float|None, "target": "mass"|"topk", ...plain values},
     "model": state_dict,            # backbone keys for dense, FTWTModel keys for ftwt
     "train_state": {...} | absent}  # optimizers, schedulers, epoch, RNG states (resume)

Nothing is unpickled beyond tensors and plain containers, so a checkpoint from an untrusted source
cannot run code when it is loaded.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ftwt_cli.errors import BadInput

FORMAT = "ftwt"
VERSION = 1


def atomic_write_bytes(path: str | Path, write) -> None:
    """Call ``write(file_object)`` on a temporary file beside ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600 files; results should honour the umask
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, lambda f: f.write(text.encode()))


def atomic_write_json(path: str | Path, document: Any) -> None:
    atomic_write_text(path, json.dumps(document, indent=2, sort_keys=True) + "\n")


def save_checkpoint(path: str | Path, model: nn.Module, meta: dict, train_state: dict | None = None) -> None:
    payload = {"format": FORMAT, "version": VERSION, "meta": dict(meta), "model": _cpu_state(model.state_dict())}
    if train_state is not None:
        payload["train_state"] = train_state
    atomic_write_bytes(path, lambda f: torch.save(payload, f))


def load_checkpoint(path: str | Path) -> dict:
    """Read and validate a checkpoint; any problem is a one-line :class:`BadInput`."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated, corrupt or unsafe files all end here
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BadInput(f"cannot read checkpoint {path}: {first_line}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT or "model" not in payload:
        raise BadInput(f"{path} is not an ftwt checkpoint")
    if payload.get("version") != VERSION:
        raise BadInput(f"{path} has checkpoint version {payload.get('version')}, this ftwt reads {VERSION}")
    return payload


def load_weights(model: nn.Module, state: dict, path: str | Path, what: str) -> None:
    """Load a state dict strictly; a mismatch means the checkpoint is for another architecture."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())
        raise BadInput(f"checkpoint {path} does not fit {what}: {detail[:300]}") from None


def _cpu_state(state: dict) -> dict:
    return {k: v.detach().cpu() for k, v in state.items()}
