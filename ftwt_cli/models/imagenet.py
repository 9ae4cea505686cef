"""ImageNet models from torchvision (initialised weights; ftwt_cli.io.loading.pretrained_weights fetches torchvision's
pretrained state_dicts, which load through the same path as any checkpoint)."""

import torchvision


def _torchvision(name: str):
    def build(num_classes: int = 1000):
        return getattr(torchvision.models, name)(weights=None, num_classes=num_classes)

    build.__name__ = name
    return build


resnet18 = _torchvision("resnet18")
resnet34 = _torchvision("resnet34")
mobilenet_v2 = _torchvision("mobilenet_v2")
