"""Turn a resolved :class:`Config` into data sets and models, and checkpoints into models; shared by every
workflow."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torchvision
from torch import nn
from torch.utils.data import Dataset, Subset

from ftwt_cli import __version__
from ftwt_cli.algorithms.static import apply_signature, restore, restore_core
from ftwt_cli.core.gating import FTWTModel
from ftwt_cli.core.heads import DEFAULT_HEAD, HEADS, HeadSpec
from ftwt_cli.core.targets import TARGETS, Target, make_target
from ftwt_cli.errors import BadInput
from ftwt_cli.io import checkpoint as ckpt
from ftwt_cli.io.config import Config
from ftwt_cli.io.data import DataSpec, build_dataset, class_names_of, num_classes_of, parse_data, stats_for, subset
from ftwt_cli.models import REGISTRY, create_model, input_size_for, is_user_model

#: ``--checkpoint torchvision`` / ``--init torchvision``: torchvision's pretrained weights of the model.
TORCHVISION = "torchvision"


@dataclass
class LoadedModel:
    model: nn.Module  # the dense backbone, or an FTWTModel
    meta: dict
    path: str | None  # checkpoint it came from (None: initialised weights)

    @property
    def kind(self) -> str:
        return self.meta["kind"]

    def target(self) -> Target | Sequence[Target] | None:
        """The ground truth an FTWT checkpoint's masks are judged against, as it was trained: its target
        rule at its r, or a predefined signature's per-block top-k counts (None for other kinds)."""
        if self.kind != "ftwt":
            return None
        if self.meta.get("signature"):
            return self.model.targets()  # set by apply_signature when the checkpoint was loaded
        return make_target(self.meta.get("target", "mass"), float(self.meta["r"]))


def data_spec(cfg: Config) -> DataSpec:
    return parse_data(cfg.data)


def family(cfg: Config) -> str:
    """Transform family: ``--image-size`` 32 is CIFAR's, any other the ImageNet transforms at that size;
    otherwise registry models know theirs and other models take CIFAR's."""
    if cfg.image_size:
        return "cifar" if cfg.image_size == 32 else "imagenet"
    if not is_user_model(cfg.model):
        if cfg.model not in REGISTRY:
            create_model(cfg.model, 10)  # raises the one-line unknown-model error
        return REGISTRY[cfg.model].family
    return "cifar"


def input_size(cfg: Config) -> tuple[int, int]:
    if cfg.image_size:
        return (cfg.image_size, cfg.image_size)
    return input_size_for(cfg.model, (224, 224) if family(cfg) == "imagenet" else (32, 32))


def dataset(
    cfg: Config, split: str, *, augment: bool = False, normalize: bool = True, cap: bool = True, limit: int | None = None
) -> Dataset:
    """The split with the family's transforms, capped to ``limit`` (default: ``samples`` for the training
    split, a planning pass; ``test_samples`` for the test split) when ``cap``."""
    ds = build_dataset(
        data_spec(cfg),
        split,
        family=family(cfg),
        augment=augment,
        normalize=normalize,
        root=cfg.data_root,
        download=cfg.download,
        seed=cfg.seed,
        size=input_size(cfg)[0],
        stats=normalization(cfg),
    )
    if limit is None:
        limit = cfg.samples if split == "train" else cfg.test_samples
    return subset(ds, limit if cap else 0, seed=cfg.seed)


def normalization(cfg: Config) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) the inputs are normalised with: the checkpoint's a run follows on other data, else the data's."""
    if cfg.normalization:
        mean, std = cfg.normalization
        return tuple(mean), tuple(std)
    return stats_for(data_spec(cfg), family(cfg))


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
    ``val_fraction`` is 0), carved from the training split capped to ``train_samples``, with the run's seed."""
    train = dataset(cfg, "train", augment=augment, limit=cfg.train_samples)
    keep, held = holdout_indices(len(train), cfg.val_fraction, cfg.seed)
    if not held:
        return train, None
    return Subset(train, keep), Subset(dataset(cfg, "train", limit=cfg.train_samples), held)


def num_classes(cfg: Config) -> int:
    return num_classes_of(data_spec(cfg), cfg.data_root)


def dense_meta(cfg: Config, classes: int) -> dict:
    """What every checkpoint carries to be rebuilt and used on its own (``ftwt info`` prints it)."""
    mean, std = normalization(cfg)
    names = class_names_of(data_spec(cfg), cfg.data_root)
    return {
        "kind": "dense",
        "model": cfg.model,
        "num_classes": classes,
        "input_size": list(input_size(cfg)),
        "data": cfg.data,
        "normalization": {"mean": list(mean), "std": list(std)},
        "class_names": names if names is not None and len(names) == classes else None,
        "ftwt_version": __version__,
    }


def ftwt_meta(cfg: Config, classes: int, r: float) -> dict:
    return {
        **dense_meta(cfg, classes),
        "kind": "ftwt",
        "r": r,
        "target": cfg.target,
        **head_spec(cfg).to_meta(),
        "gate": cfg.gate,
        "mode": cfg.mode,
        **distill_meta(cfg),
        **({"codebook": cfg.codebook} if cfg.codebook else {}),
        **({"bn_reestimate": True} if cfg.bn_reestimate else {}),
        # which training images the run held out (ftwt calibrate reuses them)
        "samples": cfg.samples,
        "train_samples": cfg.train_samples,
        "val_fraction": cfg.val_fraction,
        "seed": cfg.seed,
    }


def distill_meta(cfg: Config) -> dict:
    """The distillation a run used, for its checkpoints (nothing when it used none)."""
    return {"distill": cfg.distill, "distill_weight": cfg.distill_weight} if cfg.distill > 0 else {}


def head_spec(cfg: Config) -> HeadSpec:
    return HeadSpec(pool=cfg.head_pool, softmax=cfg.head_softmax, norm=cfg.head_norm, variant=cfg.head)


def wrap(backbone: nn.Module, cfg: Config) -> FTWTModel:
    return FTWTModel(backbone, input_size(cfg), head=head_spec(cfg), gate=cfg.gate)


def initial_weights(cfg: Config, given: str | None) -> str | None:
    """The dense weights an FTWT run starts from: ``--init``, else the profile's checkpoint, else
    torchvision's pretrained weights when the profile says ``pretrained = true``."""
    return given or cfg.checkpoint or (TORCHVISION if cfg.pretrained else None)


def how_to_get_weights(cfg: Config) -> str:
    return (
        f"pass --checkpoint FILE (an ftwt checkpoint, or {cfg.model}'s weights saved with "
        f"torch.save(model.state_dict(), FILE)) or train them with 'ftwt train --dense --model {cfg.model}'"
    )


def load_model(cfg: Config, path: str | None, *, require: str | None = None, warn_untrained: bool = True) -> LoadedModel:
    """The model of ``path`` or, with no path, the initialised dense ``cfg.model``.

    ``path`` is an ftwt checkpoint, a plain state_dict of ``cfg.model`` (dense weights for the data's
    classes) or ``torchvision`` (torchvision's pretrained weights of ``cfg.model``, which is also what
    ``pretrained = true`` means without a path); all three go through the same checks.
    ``require`` = "dense" or "ftwt" rejects the other kind with a one-line error.
    """
    if path is None and cfg.pretrained:
        path = TORCHVISION
    if path is None and require == "ftwt":
        raise BadInput("this command needs an FTWT checkpoint (--checkpoint from 'ftwt train --r ...')")
    classes = num_classes(cfg)  # before any download: a missing data folder is the first thing to fix
    if path is None:
        if warn_untrained:
            warnings.warn(
                f"no checkpoint: running on initialised {cfg.model} weights; estimates mean something only "
                f"for a trained dense model: {how_to_get_weights(cfg)}",
                stacklevel=2,
            )
        model = create_model(cfg.model, classes)
        return LoadedModel(model, dense_meta(cfg, classes), None)
    if path == TORCHVISION:
        path = str(pretrained_weights(cfg.model))
    payload = ckpt.load_checkpoint(path, allow_state_dict=require != "ftwt")
    meta = payload["meta"]
    if meta is None:  # plain weights: the dense cfg.model for the data's classes
        model = create_model(cfg.model, classes)
        ckpt.load_weights(model, payload["model"], path, cfg.model)
        return LoadedModel(model, {**dense_meta(cfg, classes), "weights": "state_dict"}, str(Path(path)))
    if meta.get("model") != cfg.model:
        raise BadInput(
            f"checkpoint {path} is for model {meta.get('model')!r}, but the configuration says {cfg.model!r} "
            f"(pass --model {meta.get('model')} or the matching --profile)"
        )
    known = cfg.image_size or is_user_model(cfg.model) or cfg.model in REGISTRY  # else the model knows (tests' toys)
    if known and meta.get("input_size") and tuple(meta["input_size"]) != input_size(cfg):
        side = meta["input_size"][0]
        raise BadInput(
            f"checkpoint {path} is for {side}×{meta['input_size'][1]} inputs but the configuration gives "
            f"{input_size(cfg)[0]}×{input_size(cfg)[1]} (pass --image-size {side})"
        )
    if require and meta.get("kind") != require:
        raise BadInput(f"checkpoint {path} is a {meta.get('kind')} checkpoint; this command needs a {require} one")
    if int(meta["num_classes"]) != classes:
        raise BadInput(
            f"checkpoint {path} has {meta['num_classes']} classes but --data {cfg.data} has {classes} "
            f"(it was trained on {meta.get('data')!r}; pass the matching --data)"
        )
    model = create_model(cfg.model, int(meta["num_classes"]))
    what = f"{cfg.model} ({meta['kind']})"
    if meta["kind"] == "ftwt":
        for registry, name in ((HEADS, meta.get("head", DEFAULT_HEAD)), (TARGETS, meta.get("target", "mass"))):
            if name not in registry:  # e.g. a variant registered by the code that trained it
                raise BadInput(
                    f"checkpoint {path} uses the {registry.what} {name!r}, which this ftwt does not have "
                    f"(known: {registry.choices()}); register it before loading"
                )
        model = FTWTModel(model, tuple(meta["input_size"]), head=HeadSpec.from_meta(meta), gate=meta.get("gate", "all"))
        if meta.get("signature"):  # predefined signature: every head keeps its fixed count
            apply_signature(model, meta["signature"])
        if any(meta.get("codebook_sizes") or []):  # routing among prototypes: buffers of these shapes
            widths = [b.out_channels for b in model.graph.blocks]
            model.set_codebooks([torch.zeros(k, c) if k else None for k, c in zip(meta["codebook_sizes"], widths)])
        if meta.get("static_core"):  # pruned, heads for the gated filters only: rebuilt from plain values
            model = restore_core(model, meta["static_core"])
    elif meta["kind"] == "static":  # rebuilt by replaying the pruning history, never unpickled
        model = restore(model, meta["pruning_history"], tuple(meta["input_size"]))
    ckpt.load_weights(model, payload["model"], path, what)
    return LoadedModel(model, meta, str(Path(path)))


def pretrained_weights(model_name: str) -> Path:
    """torchvision's pretrained weights file of a registry model, in torch hub's cache ($TORCH_HOME);
    downloaded once when missing (asking for pretrained weights is the opt-in)."""
    entry = REGISTRY.get(model_name)
    if entry is None or not entry.supports_pretrained:
        names = ", ".join(n for n, e in REGISTRY.items() if e.supports_pretrained)
        raise BadInput(
            f"torchvision has pretrained weights for {names}, not {model_name!r}; drop --init torchvision / "
            "pretrained, or train a dense baseline with 'ftwt train --dense'"
        )
    url = torchvision_weights_url(model_name)
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
    if not path.is_file():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(url, str(path), progress=True)
        except Exception as exc:  # noqa: BLE001 - offline, proxy, disk: all one line
            raise BadInput(
                f"cannot download torchvision's {model_name} weights from {url} ({type(exc).__name__}); "
                f"put the file at {path} (TORCH_HOME sets the folder) or pass --checkpoint FILE"
            ) from None
    return path


def torchvision_weights_url(model_name: str) -> str:
    return torchvision.models.get_model_weights(model_name).DEFAULT.url


def first_test_images(cfg: Config, count: int) -> torch.Tensor:
    """The first ``count`` images of the test split (seeded subset), normalised, as one tensor."""
    images = dataset(cfg, "test", limit=count)
    return torch.stack([images[i][0] for i in range(len(images))])
