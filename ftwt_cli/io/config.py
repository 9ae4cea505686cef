"""Profiles (TOML files in the top-level ``profiles/``, shipped inside the wheel as ``ftwt_cli/profiles/``)
and the resolved run configuration.

A profile sets every field of :class:`Config`; each CLI option overrides its field. Profile files may
group fields in tables (``[dense]``, ``[dynamic]``) for readability; table keys are flattened with
their table name as prefix except ``[dynamic]``, whose keys are the plain training fields.

``--profile`` takes a shipped profile's name or the path of a TOML file of your own; the environment
variable ``FTWT_PROFILES`` replaces the shipped folder.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from ftwt_cli.core.graph import GATES
from ftwt_cli.core.heads import DEFAULT_HEAD, HEAD_POOLS, HEADS
from ftwt_cli.core.targets import TARGETS
from ftwt_cli.errors import BadInput
from ftwt_cli.models import check_model_name
from ftwt_cli.models.zoo import did_you_mean


def _shipped_profiles() -> Path:
    """The recipes: ``ftwt_cli/profiles/`` in an installed wheel (package data), else the source tree's
    top-level ``profiles/`` (an editable install, or the checkout on ``PYTHONPATH``)."""
    package = Path(__file__).resolve().parents[1]
    packaged = package / "profiles"
    return packaged if packaged.is_dir() else package.parent / "profiles"


PROFILE_DIR = Path(os.environ.get("FTWT_PROFILES") or _shipped_profiles())
DEFAULT_PROFILE = "quickstart"
MAX_RATIOS = 10_001  # 0:1:0.0001; finer grids only cost memory
#: How the heads train with the backbone: detached inputs (decoupled) or straight-through (joint).
MODES = ("decoupled", "joint")


@dataclass
class Config:
    profile: str = DEFAULT_PROFILE
    description: str = ""
    # what to run on
    model: str = "smallnet"
    data: str = "synthetic"
    data_root: str = "data"
    download: bool = False
    pretrained: bool = False
    checkpoint: str | None = None
    normalization: list | None = None  # [mean, std] of the checkpoint followed on other --data (None: the data's own)
    image_size: int = 0  # input side in pixels (0: the model's own: registry models know it, other models take 32)
    samples: int = 0  # cap on training images of a planning pass: estimate, search (0: all)
    train_samples: int = 0  # cap on the training images 'ftwt train' uses, held-out ones included (0: all)
    test_samples: int = 0  # cap on test images evaluated (0: all)
    val_fraction: float = 0.1  # training images held out (seeded): best.pt selection and budget calibration
    sync_bn: bool = False  # SyncBatchNorm across torchrun processes (CUDA only)
    batch_size: int = 128
    workers: int = 0
    device: str = "auto"
    seed: int = 0
    # FTWT
    ratios: str = "0.80:1.00:0.01"
    r: float = 0.9
    target: str = "mass"
    head_softmax: bool = True
    head_pool: str = "max"
    head_norm: bool = False
    head: str = DEFAULT_HEAD  # a registered head variant (ftwt_cli.core.heads.HEADS)
    gate: str = "all"  # which conv→BN blocks get heads (ftwt_cli.core.graph.GATES)
    codebook: int = 0  # K prototype masks per gated block, fitted when the heads freeze (0: none)
    distill: float = 0.0  # distillation from the dense init at this temperature (0: none)
    distill_weight: float = 0.5  # share of the distillation term in the task loss
    bn_reestimate: bool = False  # re-estimate BN statistics under the final masks (budgeted runs)
    # dense baseline recipe
    dense_epochs: int = 200
    dense_lr: float = 0.1
    dense_milestones: list[int] = field(default_factory=lambda: [80, 120, 150])
    # dynamic training recipe
    epochs: int = 200
    lr: float = 0.01
    milestones: list[int] = field(default_factory=lambda: [80, 120, 150])
    gamma: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    head_lr: float = 0.1
    mode: str = "decoupled"
    freeze_heads_after: float = 0.5
    head_init: str = "random"
    head_warmup: int = 0  # epochs of head-only training on the frozen backbone before any mask is applied
    calibrate: bool = True  # with --target-flops: per-layer head thresholds hit the budget after training
    # the fields the user gave (CLI options), so that a checkpoint's own setting fills only the others;
    # not part of the configuration's record
    explicit: frozenset[str] = field(default=frozenset(), repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        doc = dataclasses.asdict(self)
        del doc["explicit"]
        return doc

    def override(self, **values: Any) -> "Config":
        """Return a copy with every non-None value replaced (CLI options default to None)."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown config fields: {sorted(unknown)}")
        return dataclasses.replace(self, **{k: v for k, v in values.items() if v is not None})


def list_profiles() -> list[tuple[str, str]]:
    """(name, description) of every profile file."""
    out = []
    for path in sorted(PROFILE_DIR.glob("*.toml")):
        try:
            out.append((path.stem, load_profile(path.stem).description))
        except BadInput as exc:
            out.append((path.stem, f"(invalid: {exc})"))
    return out


def profile_path(name: str) -> Path:
    """A shipped profile by name, or a TOML file of the user's by path (``my.toml``, ``conf/run.toml``)."""
    if name.endswith(".toml") or "/" in name or os.sep in name:
        path = Path(name).expanduser()
        if not path.is_file():
            raise BadInput(f"profile file not found: {name} (give a TOML file or a profile name from 'ftwt profiles')")
        return path
    path = PROFILE_DIR / f"{name}.toml"
    if not path.is_file():
        stems = [p.stem for p in sorted(PROFILE_DIR.glob("*.toml"))]
        raise BadInput(f"unknown profile {name!r}{did_you_mean(name, stems)}; available: {', '.join(stems)} (or the path of a .toml file)")
    return path


def load_profile(name: str) -> Config:
    path = profile_path(name)
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise BadInput(f"profile {path} is not valid TOML: {exc}") from None
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, dict):
            prefix = "" if key == "dynamic" else f"{key}_"
            flat.update({f"{prefix}{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    fields = {f.name for f in dataclasses.fields(Config)} - {"profile", "explicit", "normalization"}
    unknown = sorted(set(flat) - fields)
    if unknown:
        raise BadInput(f"profile {path} has unknown fields: {', '.join(unknown)} (known: {', '.join(sorted(fields))})")
    for key, value in flat.items():
        _check_type(path, key, value)
    if flat.get("checkpoint"):
        # Profile checkpoints are relative to the profile's folder, so the package (or repository) can move.
        flat["checkpoint"] = str((path.parent / flat["checkpoint"]).resolve())
    return Config(profile=path.stem, **flat)


def _check_type(path: Path, key: str, value: Any) -> None:
    """A profile value must have its field's type (TOML ints are accepted where floats are expected)."""
    default = getattr(Config(), key)
    if key == "checkpoint" or isinstance(default, str):
        ok, wanted = isinstance(value, str), "a string"
    elif isinstance(default, bool):
        ok, wanted = isinstance(value, bool), "true or false"
    elif isinstance(default, int):
        ok, wanted = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif isinstance(default, float):
        ok, wanted = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    else:  # milestone lists
        ok = isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        wanted = "a list of integers"
    if not ok:
        raise BadInput(f"profile {path}: {key} must be {wanted}, got {value!r}")


def resolve(profile: str | None, **overrides: Any) -> Config:
    """The profile's configuration with CLI overrides applied and validated.

    An ``epochs`` (or ``dense_epochs``) override without milestones scales the profile's milestones
    with it (:func:`scale_milestones`). A ``model`` override that changes the profile's model also drops the profile's checkpoint (it holds
    weights of the profile's model) and its ``pretrained`` (torchvision weights are per model) unless
    they are given again.
    """
    base = load_profile(profile or DEFAULT_PROFILE)
    if overrides.get("model") is not None and overrides["model"] != base.model:
        base = dataclasses.replace(base, checkpoint=None, pretrained=False)
    config = base.override(**overrides)
    for prefix in ("", "dense_"):  # the profile's lr milestones follow a shorter or longer --epochs
        epochs, milestones = overrides.get(f"{prefix}epochs"), f"{prefix}milestones"
        if epochs is not None and overrides.get(milestones) is None and epochs != getattr(base, f"{prefix}epochs"):
            scaled = scale_milestones(getattr(base, milestones), getattr(base, f"{prefix}epochs"), epochs)
            config = dataclasses.replace(config, **{milestones: scaled})
    config = dataclasses.replace(config, explicit=frozenset(k for k, v in overrides.items() if v is not None))
    validate(config)
    return config


def scale_milestones(milestones: list[int], profile_epochs: int, epochs: int) -> list[int]:
    """The profile's milestones as the same fractions of ``epochs``: rounded, strictly increasing, each
    before the last epoch (those that would not be are dropped)."""
    out: list[int] = []
    for m in sorted(milestones):
        at = max(round(m * epochs / max(profile_epochs, 1)), out[-1] + 1 if out else 1)
        if at < epochs:
            out.append(at)
    return out


def validate(c: Config) -> None:
    check_model_name(c.model)  # first: a misspelt model is refused before anything warns about it
    if c.batch_size < 1:
        raise BadInput(f"--batch-size must be at least 1, got {c.batch_size}")
    if c.samples < 0 or c.train_samples < 0 or c.test_samples < 0:
        raise BadInput("--samples must be 0 (all) or positive")
    if c.image_size != 0 and not (16 <= c.image_size <= 1024):
        raise BadInput(f"--image-size must be 0 (the model's own) or 16..1024 pixels, got {c.image_size}")
    if c.workers < 0:
        raise BadInput(f"--workers must be 0 (load in the main process) or positive, got {c.workers}")
    if not (0.0 <= c.val_fraction < 1.0) or math.isnan(c.val_fraction):
        raise BadInput(f"--val-fraction must be in [0, 1) (0: no validation split), got {c.val_fraction:g}")
    if not (0.0 < c.r <= 1.0):
        raise BadInput(f"r must be in (0, 1], got {c.r}")
    if c.target not in TARGETS:
        raise BadInput(f"target must be {TARGETS.alternatives()} (--gt), got {c.target!r}")
    if c.device not in ("auto", "cpu", "cuda") and not (c.device.startswith("cuda:") and c.device[5:].isdigit()):
        raise BadInput(f"--device must be auto, cpu, cuda or cuda:N, got {c.device!r}")
    if not (0.0 <= c.freeze_heads_after <= 1.0):
        raise BadInput(f"--freeze-heads-after must be in [0, 1], got {c.freeze_heads_after}")
    if c.head_warmup < 0:
        raise BadInput(f"--head-warmup must be 0 or more epochs, got {c.head_warmup}")
    if c.head_pool not in HEAD_POOLS:
        raise BadInput(f"--head-pool must be {' or '.join(HEAD_POOLS)}, got {c.head_pool!r}")
    if c.gate not in GATES:
        raise BadInput(f"--gate must be {GATES.alternatives()}, got {c.gate!r}")
    if c.codebook < 0:
        raise BadInput(f"--codebook K must be at least 1 prototype per layer (0: none), got {c.codebook}")
    if not c.distill >= 0:
        raise BadInput(f"--distill is a temperature and must be positive (0: no distillation), got {c.distill:g}")
    if not 0.0 < c.distill_weight <= 1.0:
        raise BadInput(f"--distill-weight must be in (0, 1], got {c.distill_weight:g}")
    if c.head not in HEADS:
        raise BadInput(f"--head must be {HEADS.alternatives()}, got {c.head!r}")
    if c.mode not in MODES:
        raise BadInput(f"--mode must be {' or '.join(MODES)}, got {c.mode!r}")
    if c.head_init not in ("random", "ones"):
        raise BadInput(f"--head-init must be random or ones, got {c.head_init!r}")
    parse_ratios(c.ratios)


def check_target_flops(target_pct: float) -> float:
    """A FLOPs budget is the percent of dense FLOPs to remove: (0, 100), else BadInput."""
    if not (0.0 < target_pct < 100.0):  # also rejects NaN
        raise BadInput(f"--target-flops is a percent of FLOPs to remove and must be in (0, 100), got {target_pct:g}")
    return float(target_pct)


def parse_ratios(text: str) -> list[float]:
    """``0.9,0.95`` or the inclusive range ``start:stop:step``; every value must lie in (0, 1]."""
    text = str(text).strip()
    try:
        if ":" in text:
            parts = [float(p) for p in text.split(":")]
            if len(parts) != 3 or parts[2] <= 0 or parts[1] < parts[0]:
                raise ValueError
            start, stop, step = parts
            count = int(math.floor((stop - start) / step + 1e-9)) + 1
            if count > MAX_RATIOS:
                raise BadInput(f"--ratios {text} gives {count} values; use a larger step (at most {MAX_RATIOS} values)")
            values = [round(start + i * step, 10) for i in range(count)]
        else:
            values = [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise BadInput(f"--ratios must be a comma list (0.9,0.95) or start:stop:step (0.8:1.0:0.01), got {text!r}") from None
    if not values:
        raise BadInput("--ratios is empty")
    bad = [v for v in values if not (0.0 < v <= 1.0)]
    if bad:
        raise BadInput(f"r must be in (0, 1] (1 keeps all the mass), got {bad[0]}")
    return sorted(set(values))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise BadInput("--device cuda requested but no CUDA device is available (use --device cpu)")
    device = torch.device(name)
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise BadInput(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device
