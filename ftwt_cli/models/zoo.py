"""Architectures of the field's model zoos by name: ``torchvision:NAME`` and ``timm:NAME`` (random weights).

torchvision's classification models come from ``torchvision.models.get_model``; timm's from
``timm.create_model``, timm being an optional extra (``pip install 'ftwt[timm]'``). Pretrained weights
are not fetched here: trained weights load from checkpoints or plain state_dicts like any model's.
"""

from __future__ import annotations

import difflib
import importlib

import torchvision
from torch import nn

from ftwt_cli.errors import BadInput

ZOOS = ("torchvision", "timm")
TIMM_EXTRA = "pip install 'ftwt[timm]' (or pip install timm)"

#: Build options that make a torchvision model return plain logits in training mode too (their auxiliary
#: classifiers return tuples otherwise) and initialise the weights without a warning.
_TORCHVISION_OPTIONS = {
    "googlenet": {"aux_logits": False, "init_weights": True},
    "inception_v3": {"aux_logits": False, "init_weights": True},
}


def is_zoo_model(spec: str) -> bool:
    return spec.partition(":")[0] in ZOOS and bool(spec.partition(":")[2])


def torchvision_names() -> list[str]:
    """torchvision's classification models (detection, segmentation and video models live in submodules)."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


def timm():
    """The timm module, imported on first use: timm is an optional extra."""
    try:
        return importlib.import_module("timm")
    except ImportError:
        raise BadInput(f"--model timm:NAME needs timm, which is not installed: {TIMM_EXTRA}") from None


def create_zoo_model(spec: str, num_classes: int) -> nn.Module:
    """``torchvision:resnet50`` or ``timm:efficientnet_b0``, initialised, with ``num_classes`` outputs."""
    zoo, _, name = spec.partition(":")
    if zoo == "torchvision":
        names = torchvision_names()
        if name not in names:
            raise BadInput(f"torchvision has no classification model {name!r}{did_you_mean(name, names)}")
        build = lambda: torchvision.models.get_model(name, weights=None, num_classes=num_classes, **_TORCHVISION_OPTIONS.get(name, {}))  # noqa: E731
    else:
        library = timm()
        if not library.is_model(name):
            raise BadInput(f"timm has no model {name!r}{did_you_mean(name, library.list_models())}")
        build = lambda: library.create_model(name, pretrained=False, num_classes=num_classes)  # noqa: E731
    try:
        return build()
    except Exception as exc:  # noqa: BLE001 - the library's own refusal, in one line
        raise BadInput(f"{spec} cannot be built with {num_classes} classes: {type(exc).__name__}: {exc}") from None


def did_you_mean(name: str, names: list[str]) -> str:
    """`` (did you mean a, b?)`` with the names nearest a misspelt one, or nothing."""
    close = difflib.get_close_matches(name, names, n=3)
    return f" (did you mean {', '.join(close)}?)" if close else ""
