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
import pickle
import tempfile
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ftwt_cli.errors import BadInput

FORMAT = "ftwt"
VERSION = 1


#: Kernel file systems: nothing a command writes belongs there (and writing may half succeed as root).
SPECIAL_ROOTS = (Path("/proc"), Path("/sys"), Path("/dev"))


def check_writable(path: str | Path, option: str = "output", *, folder: bool = False) -> None:
    """BadInput unless ``path`` can be created (a folder when ``folder``), checked before any work: not
    under /proc, /sys or /dev, not an existing file where a folder is wanted (nor a folder where a file
    is), and its nearest existing ancestor a folder where a file can really be created (probed)."""
    path = Path(path).expanduser().absolute()
    real = Path(os.path.realpath(path))
    special = next((root for root in SPECIAL_ROOTS if real == root or root in real.parents), None)
    if special is not None:
        raise BadInput(f"cannot write {option} {path}: {special} is a system folder, not a place for results (choose another path)")
    if path.exists() and folder and not path.is_dir():
        raise BadInput(f"cannot write {option} {path}: it is a file, not a folder (choose another path)")
    if path.exists() and not folder and path.is_dir():
        raise BadInput(f"cannot write {option} {path}: it is a folder; give a file name")
    ancestor = path if path.exists() else next(p for p in path.parents if p.exists())
    if ancestor != path and not ancestor.is_dir():
        raise BadInput(f"cannot write {option} {path}: {ancestor} is a file, not a folder (choose another path)")
    where = ancestor if ancestor.is_dir() else ancestor.parent
    if not os.access(where, os.W_OK | os.X_OK):
        raise BadInput(f"cannot write {option} {path}: no permission to write in {where} (choose another path)")
    try:  # permissions say yes to root on read-only mounts; creating (and removing) a file says for sure
        with tempfile.TemporaryFile(prefix=".ftwt-probe-", dir=where):
            pass
    except OSError as exc:
        raise BadInput(f"cannot write {option} {path}: {exc.strerror or exc} in {where} (choose another path)") from None


def atomic_write_bytes(path: str | Path, write) -> None:
    """Call ``write(file_object)`` on a temporary file beside ``path``, then rename it into place."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:  # read-only file system, no permission, a file where a folder should be
        raise BadInput(f"cannot write {path}: {exc.strerror or exc} (choose another path)") from None
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


#: Keys under which training scripts commonly nest a state_dict ({"state_dict": ..., "epoch": ...}).
NESTED_STATE_KEYS = ("state_dict", "model_state_dict", "model")
HOW_TO_SAVE = "save weights with torch.save(model.state_dict(), PATH)"


def load_checkpoint(path: str | Path, *, allow_state_dict: bool = False) -> dict:
    """Read and validate a checkpoint; any problem is a one-line :class:`BadInput`.

    With ``allow_state_dict`` a plain ``state_dict`` (``torch.save(model.state_dict(), PATH)``, also
    nested under ``state_dict``/``model`` or saved from a DDP wrapper) is accepted and returned as
    ``{"format": "state_dict", "meta": None, "model": state}``.
    """
    path = Path(path)
    if path.is_dir():
        raise BadInput(f"checkpoint {path} is a folder; give the .pt file (a run's best.pt, for instance)")
    if not path.is_file():
        raise BadInput(f"checkpoint not found: {path}")
    payload = _torch_load(path)
    if isinstance(payload, dict) and payload.get("format") == FORMAT and "model" in payload:
        if payload.get("version") != VERSION:
            raise BadInput(f"{path} has checkpoint version {payload.get('version')}, this ftwt reads {VERSION}")
        return payload
    state = _plain_state(payload)
    if state is None:
        raise BadInput(f"{path} holds neither an ftwt checkpoint nor a state_dict of tensors ({HOW_TO_SAVE})")
    if not allow_state_dict:
        raise BadInput(f"{path} holds plain weights (a state_dict); this needs an ftwt checkpoint from 'ftwt train'")
    return {"format": "state_dict", "meta": None, "model": state}


def _torch_load(path: Path) -> Any:
    """``torch.load(weights_only=True)`` with its failures told apart in one line each."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if not magic:
        raise BadInput(f"cannot read checkpoint {path}: the file is empty (0 bytes); {HOW_TO_SAVE}")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols on files it then rejects
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        if magic.startswith(b"PK"):
            raise BadInput(
                f"cannot read checkpoint {path}: it holds Python objects besides tensors (a whole pickled model?) "
                f"and ftwt loads weights only, running no code from files; {HOW_TO_SAVE}"
            ) from None
        raise BadInput(f"cannot read checkpoint {path}: it is not a PyTorch checkpoint; {HOW_TO_SAVE}") from None
    except Exception:  # noqa: BLE001 - truncated zips, text files, random bytes
        if magic.startswith(b"PK"):
            raise BadInput(
                f"cannot read checkpoint {path}: the file is truncated or corrupt (an interrupted copy or download?)"
            ) from None
        raise BadInput(f"cannot read checkpoint {path}: it is not a PyTorch checkpoint; {HOW_TO_SAVE}") from None


def _plain_state(payload: Any) -> dict[str, torch.Tensor] | None:
    """The tensors of a plain or nested state_dict, without a DDP ``module.`` prefix; None if it is not one.
    The state_dict's ``_metadata`` (module versions, which e.g. torchvision's MNASNet reads) is kept."""
    if not isinstance(payload, dict):
        return None
    if not _all_tensors(payload):
        nested = [payload[k] for k in NESTED_STATE_KEYS if isinstance(payload.get(k), dict) and _all_tensors(payload[k])]
        if not nested:
            return None
        payload = nested[0]
    metadata = getattr(payload, "_metadata", None)
    if payload and all(isinstance(k, str) and k.startswith("module.") for k in payload):
        payload = {k[len("module.") :]: v for k, v in payload.items()}
        if metadata is not None:
            metadata = OrderedDict((k.partition("module")[2].lstrip("."), v) for k, v in metadata.items() if k.startswith("module"))
    return _with_metadata(dict(payload), metadata)


def _with_metadata(state: dict, metadata: Any) -> dict:
    """``state`` as the OrderedDict ``load_state_dict`` reads, carrying ``metadata`` when there is one."""
    state = OrderedDict(state)
    if metadata is not None:
        state._metadata = OrderedDict(metadata)  # type: ignore[attr-defined]
    return state


def _all_tensors(mapping: dict) -> bool:
    return bool(mapping) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in mapping.items())


def load_weights(model: nn.Module, state: dict, path: str | Path, what: str) -> None:
    """Load a state dict strictly; a mismatch is told as another architecture or another class count."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unknown = [k for k in state if k not in expected]
    if missing or unknown:
        parts = []
        if missing:
            parts.append(f"{len(missing)} of {what}'s tensors are missing (e.g. {missing[0]})")
        if unknown:
            parts.append(f"{len(unknown)} are not {what}'s (e.g. {unknown[0]})")
        raise BadInput(
            f"checkpoint {path} does not fit {what}: {' and '.join(parts)}; it was saved from another architecture "
            "(pass the --model it was trained with)"
        )
    wrong = [k for k, v in expected.items() if tuple(state[k].shape) != tuple(v.shape)]
    if wrong:
        last_module = next(reversed(expected)).rsplit(".", 1)[0]
        if all(k.startswith(last_module + ".") for k in wrong):
            key = wrong[0]
            raise BadInput(
                f"checkpoint {path} has {state[key].shape[0]} classes ({key} {list(state[key].shape)}) but {what} "
                f"needs {expected[key].shape[0]} for this data (pass the --data it was trained on)"
            )
        key = wrong[0]
        raise BadInput(
            f"checkpoint {path} does not fit {what}: {key} is {list(state[key].shape)} in the file, "
            f"{list(expected[key].shape)} in the model (another width or variant; pass the --model it was trained with)"
        )
    model.load_state_dict(state, strict=True)


def _cpu_state(state: dict) -> dict:
    return _with_metadata({k: v.detach().cpu() for k, v in state.items()}, getattr(state, "_metadata", None))
