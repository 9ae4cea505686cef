"""Model registry: CIFAR and ImageNet families by name, the zoos (``torchvision:NAME``, ``timm:NAME``), plus
any user model by import path or file."""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from torch import nn

from ftwt_cli.errors import BadInput
from ftwt_cli.models import imagenet, mobilenet, resnet_cifar, small, vgg
from ftwt_cli.models.zoo import create_zoo_model, did_you_mean, is_zoo_model


@dataclass(frozen=True)
class ModelEntry:
    name: str
    build: Callable[..., nn.Module]
    family: str  # "cifar" (32×32) or "imagenet" (224×224)
    supports_pretrained: bool = False

    @property
    def input_size(self) -> tuple[int, int]:
        return (32, 32) if self.family == "cifar" else (224, 224)


REGISTRY: dict[str, ModelEntry] = {
    e.name: e
    for e in (
        ModelEntry("smallnet", small.smallnet, "cifar"),
        ModelEntry("vgg16_bn", vgg.vgg16_bn, "cifar"),
        ModelEntry("resnet20", resnet_cifar.resnet20, "cifar"),
        ModelEntry("resnet56", resnet_cifar.resnet56, "cifar"),
        ModelEntry("mobilenetv1", mobilenet.mobilenetv1, "cifar"),
        ModelEntry("resnet18", imagenet.resnet18, "imagenet", True),
        ModelEntry("resnet34", imagenet.resnet34, "imagenet", True),
        ModelEntry("mobilenet_v2", imagenet.mobilenet_v2, "imagenet", True),
    )
}


def is_user_model(spec: str) -> bool:
    """Not a registry name: a zoo model or a user callable (both follow the data's input size)."""
    return ":" in spec


def check_model_name(spec: str) -> None:
    """A one-line BadInput, with the nearest names, for a registry name that is not one."""
    if not is_user_model(spec) and spec not in REGISTRY:
        raise BadInput(
            f"unknown model {spec!r}{did_you_mean(spec, list(REGISTRY))}; known: {', '.join(REGISTRY)} (or torchvision:NAME, "
            "timm:NAME, package.module:callable, path/to/file.py:callable)"
        )


def create_model(spec: str, num_classes: int) -> nn.Module:
    """Build a registry model by name, a zoo model (``torchvision:NAME``, ``timm:NAME``), or call
    ``package.module:callable`` / ``file.py:callable``.

    Weights are initialised; pretrained and trained weights are loaded by ftwt_cli.io.loading.load_model.
    """
    if not is_user_model(spec):
        check_model_name(spec)
        return REGISTRY[spec].build(num_classes=num_classes)
    if is_zoo_model(spec):
        return create_zoo_model(spec, num_classes)
    factory = _load_callable(spec)
    try:
        model = factory(num_classes=num_classes)
    except TypeError as exc:
        raise BadInput(f"model callable {spec!r} must accept num_classes (def build(num_classes=10): ...): {exc}") from None
    except Exception as exc:  # noqa: BLE001 - user code: report, don't crash with a traceback
        raise BadInput(f"model callable {spec!r} failed with num_classes={num_classes}: {type(exc).__name__}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise BadInput(f"model callable {spec!r} returned {type(model).__name__}, not an nn.Module")
    return model


def _load_callable(spec: str) -> Callable[..., nn.Module]:
    location, _, attribute = spec.rpartition(":")
    if not location or not attribute:
        raise BadInput(f"model spec {spec!r} must look like package.module:callable or path/to/file.py:callable")
    if location.endswith(".py") or "/" in location or "\\" in location:
        path = Path(location).expanduser()
        if not path.is_file():
            raise BadInput(f"model file not found: {location} (give path/to/file.py:callable)")
        module_name = f"ftwt_user_model_{abs(hash(str(path.resolve())))}"
        # An explicit source loader: any file name is read as Python source, never looked up by suffix.
        loader = importlib.machinery.SourceFileLoader(module_name, str(path))
        module_spec = importlib.util.spec_from_loader(module_name, loader)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module  # fx tracing and pickling look modules up by name
        try:
            loader.exec_module(module)
        except Exception as exc:  # noqa: BLE001 - user code: report, don't crash with a traceback
            sys.modules.pop(module_name, None)
            detail = " ".join(str(exc).split())[:200]
            raise BadInput(
                f"could not import model file {location} as Python source: {type(exc).__name__}: {detail}"
            ) from None
    else:
        try:
            module = importlib.import_module(location)
        except Exception as exc:  # noqa: BLE001 - ImportError, or an error inside the user's module
            raise BadInput(
                f"could not import model module {location!r}: {type(exc).__name__}: {exc} "
                "(is it on PYTHONPATH? a file is given as path/to/file.py:callable)"
            ) from None
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise BadInput(f"{location} has no callable named {attribute!r} (the part after ':' names a function or class in it)")
    return factory


def input_size_for(spec: str, data_input_size: tuple[int, int]) -> tuple[int, int]:
    """Registry models know their input size; user models take the data set's."""
    return data_input_size if is_user_model(spec) else REGISTRY[spec].input_size
