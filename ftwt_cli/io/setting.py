"""A checkpoint carries its setting: the data, input size, normalisation and classes it was trained on.

Every command that reads a checkpoint starts from that setting (:func:`follow`) unless the user gave
another one: an option the checkpoint contradicts (another class count, another input size) is refused
in one line, and the setting used is said in one line on stderr. A profile's own checkpoint (the
shipped quickstart model) is used only with the data it was trained on.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

from ftwt_cli.console import console
from ftwt_cli.errors import BadInput
from ftwt_cli.io import checkpoint as ckpt
from ftwt_cli.io import loading
from ftwt_cli.io.config import DEFAULT_PROFILE, Config
from ftwt_cli.io.data import class_names_of, num_classes_of, parse_data, stats_for


def recorded(path: str | None) -> dict | None:
    """The meta of the ftwt checkpoint at ``path``; None for plain weights, ``torchvision`` or a file that
    cannot be read (loading it later says what is wrong, in its own words)."""
    if not path or path == loading.TORCHVISION or not Path(path).is_file():
        return None
    try:
        return ckpt.load_checkpoint(path, allow_state_dict=True)["meta"]
    except BadInput:
        return None


def dense_run_dir(cfg: Config) -> str:
    name = Path(cfg.model.split(":")[0]).stem if ":" in cfg.model else cfg.model  # file.py:build → file
    return f"runs/{name}-dense"


def train_dense_command(cfg: Config) -> str:
    profile = "" if cfg.profile == DEFAULT_PROFILE else f" --profile {cfg.profile}"
    return f"ftwt train --dense{profile} --model {cfg.model} --data {cfg.data} --out {dense_run_dir(cfg)}"


def follow(cfg: Config, path: str | None, option: str = "--checkpoint") -> Config:
    """``cfg`` with the data and input size ``path`` was trained on, where the user gave none.

    ``option`` names how the user passes such a checkpoint (``--checkpoint``, ``--init``) in the way out
    offered when the profile's own checkpoint does not fit the data given.
    """
    meta = recorded(path)
    if not meta:
        return cfg
    data = meta.get("data") or cfg.data
    origin = "from the checkpoint"
    if data != cfg.data:
        if "data" not in cfg.explicit:
            spec = parse_data(data)
            if spec.kind == "imagefolder" and not spec.path.is_dir():  # moved since: say how to point at it
                raise BadInput(f"checkpoint {path} was trained on {data}, which is not there; pass --data with its new place")
            cfg = dataclasses.replace(cfg, data=data)
        elif path == cfg.checkpoint and "checkpoint" not in cfg.explicit:
            raise BadInput(
                f"the profile's checkpoint {path} was trained on {data}, not on --data {cfg.data}; train a dense "
                f"model on it first: {train_dense_command(cfg)} (then pass {option} {dense_run_dir(cfg)}/best.pt)"
            )
        else:
            origin = f"given; {Path(path).name} was trained on {data}"
    classes = int(meta.get("num_classes") or 0)
    if classes and "data" in cfg.explicit and num_classes_of(parse_data(cfg.data), cfg.data_root) != classes:
        raise BadInput(
            f"--data {cfg.data} does not have the {classes} classes checkpoint {path} was trained on ({data}); "
            "drop --data to use the checkpoint's"
        )
    if "data" in cfg.explicit and data != cfg.data:
        _same_class_names(cfg, meta, path)
    cfg = _follow_size(cfg, meta, path)
    cfg, note = _follow_normalisation(cfg, meta)
    h, w = loading.input_size(cfg)
    if os.environ.get("RANK", "0") == "0":  # torchrun: one line, not one per process
        console.print(f"data: {cfg.data}, {h}×{w} inputs, {classes or '?'} classes ({origin}){note}", highlight=False, soft_wrap=True)
    return cfg


def _same_class_names(cfg: Config, meta: dict, path: str) -> None:
    """Other data with the checkpoint's class count must name its classes alike, in the same order, or its
    labels would silently mean other classes."""
    recorded_names = meta.get("class_names")
    names = class_names_of(parse_data(cfg.data), cfg.data_root)
    if not recorded_names or names is None or list(names) == list(recorded_names):
        return
    i = next(i for i, (a, b) in enumerate(zip(names, recorded_names)) if a != b)
    raise BadInput(
        f"--data {cfg.data} names its classes otherwise than checkpoint {path} (class {i}: {names[i]!r}, not "
        f"{recorded_names[i]!r}), so its labels would mean other classes; drop --data or name the class folders alike"
    )


def _follow_size(cfg: Config, meta: dict, path: str) -> Config:
    size = meta.get("input_size")
    if not size or tuple(size) == loading.input_size(cfg):
        return cfg
    if "image_size" in cfg.explicit:
        raise BadInput(
            f"checkpoint {path} was trained on {size[0]}×{size[1]} inputs; --image-size {cfg.image_size} contradicts it "
            "(drop --image-size)"
        )
    if size[0] != size[1]:
        raise BadInput(f"checkpoint {path} was trained on {size[0]}×{size[1]} inputs; ftwt feeds square images only")
    return dataclasses.replace(cfg, image_size=int(size[0]))


def _follow_normalisation(cfg: Config, meta: dict) -> tuple[Config, str]:
    """The model sees inputs normalised as in its training, also on other data: the checkpoint's statistics
    where they differ from the data's (and a word on it)."""
    wanted = meta.get("normalization") or {}
    mean, std = stats_for(parse_data(cfg.data), loading.family(cfg))
    if not wanted or _close(mean, wanted.get("mean")) and _close(std, wanted.get("std")):
        return cfg, ""
    cfg = dataclasses.replace(cfg, normalization=[list(wanted["mean"]), list(wanted["std"])])
    return cfg, f"; normalised as the checkpoint was (mean {_short(wanted['mean'])}, std {_short(wanted['std'])}), not with {cfg.data}'s statistics"


def _short(values) -> str:
    return "/".join(f"{v:.3g}" for v in values)


def _close(a, b) -> bool:
    return b is not None and len(a) == len(b) and all(math.isclose(x, y, abs_tol=1e-6) for x, y in zip(a, b))


def same_data(cfg: Config, paths: list[str]) -> None:
    """Refuse checkpoints compared side by side that were trained on different data sets."""
    first = recorded(cfg.checkpoint)
    reference = (first or {}).get("data") or cfg.data
    for path in paths:
        data = (recorded(path) or {}).get("data")
        if data and data != reference:
            raise BadInput(
                f"--compare {path} was trained on {data} but {cfg.checkpoint} on {reference}; compare checkpoints of one data set"
            )

