"""Turn a resolved :class:`Config` into data sets, models and checkpoints; shared by every command."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from ftwt_cli import checkpoint as ckpt
from ftwt_cli.config import Config
from ftwt_cli.data import DataSpec, build_dataset, num_classes_of, parse_data, subset
from ftwt_cli.errors import BadInput
from ftwt_cli.gating import FTWTModel, HeadSpec
from ftwt_cli.models import REGISTRY, create_model, input_size_for, is_user_model


@dataclass
class LoadedModel:
    model: nn.Module  # the dense backbone, or an FTWTModel
    meta: dict
    path: str | None  # checkpoint it came from (None: initialised weights)

    @property
    def kind(self) -> str:
        return self.meta["kind"]


def data_spec(cfg: Config) -> DataSpec:
    return parse_data(cfg.data)


def family(cfg: Config) -> str:
    """Transform family: registry models know it; user models follow the data (ImageNet-sized folders)."""
    if not is_user_model(cfg.model):
        if cfg.model not in REGISTRY:
            create_model(cfg.model, 10)  # raises the one-line unknown-model error
        return REGISTRY[cfg.model].family
    return "cifar"


def input_size(cfg: Config) -> tuple[int, int]:
    return input_size_for(cfg.model, (224, 224) if family(cfg) == "imagenet" else (32, 32))


def dataset(cfg: Config, split: str, *, augment: bool = False, normalize: bool = True, cap: bool = True) -> Dataset:
    """The split with the family's transforms, capped to ``samples``/``test_samples`` when ``cap``."""
    ds = build_dataset(
        data_spec(cfg),
        split,
        family=family(cfg),
        augment=augment,
        normalize=normalize,
        root=cfg.data_root,
        download=cfg.download,
        seed=cfg.seed,
    )
    limit = (cfg.samples if split == "train" else cfg.test_samples) if cap else 0
    return subset(ds, limit, seed=cfg.seed)


def holdout_indices(size: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(training, held-out) indices: a seeded ``fraction`` of ``size`` items (at least one) held out."""
    if fraction <= 0:
        return list(range(size)), []
    held = max(1, round(fraction * size))
    if held >= size:
        raise BadInput(f"--val-fraction {fraction:g} leaves no training images out of {size}")
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed + 7919)).tolist()
    return sorted(order[held:]), sorted(order[:held])


def training_splits(cfg: Config, augment: bool = True) -> tuple[Dataset, Dataset | None]:
    """The training images (augmented) and the held-out validation images (plain transforms, None when
    ``val_fraction`` is 0), carved from the (capped) training split with the run's seed."""
    train = dataset(cfg, "train", augment=augment)
    keep, held = holdout_indices(len(train), cfg.val_fraction, cfg.seed)
    if not held:
        return train, None
    return Subset(train, keep), Subset(dataset(cfg, "train"), held)


def num_classes(cfg: Config) -> int:
    return num_classes_of(data_spec(cfg), cfg.data_root)


def dense_meta(cfg: Config, classes: int) -> dict:
    return {
        "kind": "dense",
        "model": cfg.model,
        "num_classes": classes,
        "input_size": list(input_size(cfg)),
        "data": cfg.data,
    }


def ftwt_meta(cfg: Config, classes: int, r: float) -> dict:
    return {
        **dense_meta(cfg, classes),
        "kind": "ftwt",
        "r": r,
        "target": cfg.target,
        **head_spec(cfg).to_meta(),
        "mode": cfg.mode,
        # which training images the run held out (ftwt calibrate reuses them)
        "samples": cfg.samples,
        "val_fraction": cfg.val_fraction,
        "seed": cfg.seed,
    }


def head_spec(cfg: Config) -> HeadSpec:
    return HeadSpec(pool=cfg.head_pool, softmax=cfg.head_softmax, norm=cfg.head_norm)


def wrap(backbone: nn.Module, cfg: Config) -> FTWTModel:
    return FTWTModel(backbone, input_size(cfg), head=head_spec(cfg))


def load_model(cfg: Config, path: str | None, *, require: str | None = None, warn_untrained: bool = True) -> LoadedModel:
    """The model of ``path`` (an ftwt checkpoint) or, with no path, the initialised dense ``cfg.model``.

    ``require`` = "dense" or "ftwt" rejects the other kind with a one-line error.
    """
    if path is None:
        classes = num_classes(cfg)
        if warn_untrained:
            warnings.warn(
                f"no checkpoint: running on initialised {cfg.model} weights; estimates mean something only "
                "for a trained dense model (pass --checkpoint)",
                stacklevel=2,
            )
        model = create_model(cfg.model, classes, pretrained=cfg.pretrained)
        if require == "ftwt":
            raise BadInput("this command needs an FTWT checkpoint (--checkpoint from 'ftwt train --r ...')")
        return LoadedModel(model, dense_meta(cfg, classes), None)
    payload = ckpt.load_checkpoint(path)
    meta = payload["meta"]
    if meta.get("model") != cfg.model:
        raise BadInput(
            f"checkpoint {path} is for model {meta.get('model')!r}, but the configuration says {cfg.model!r} "
            f"(pass --model {meta.get('model')} or the matching --profile)"
        )
    if require and meta.get("kind") != require:
        raise BadInput(f"checkpoint {path} is a {meta.get('kind')} checkpoint; this command needs a {require} one")
    model = create_model(cfg.model, int(meta["num_classes"]))
    what = f"{cfg.model} ({meta['kind']})"
    if meta["kind"] == "ftwt":
        model = FTWTModel(model, tuple(meta["input_size"]), head=HeadSpec.from_meta(meta))
        if meta.get("signature"):  # predefined signature: every head keeps its fixed count
            from ftwt_cli.static import apply_signature

            apply_signature(model, meta["signature"])
    elif meta["kind"] == "static":  # rebuilt by replaying the pruning history, never unpickled
        from ftwt_cli.static import restore

        model = restore(model, meta["pruning_history"], tuple(meta["input_size"]))
    ckpt.load_weights(model, payload["model"], path, what)
    return LoadedModel(model, meta, str(Path(path)))
