"""ImageNet models from torchvision; ``pretrained`` uses torchvision's own weights download (opt-in)."""

import torchvision


def _torchvision(name: str):
    def build(num_classes: int = 1000, pretrained: bool = False):
        builder = getattr(torchvision.models, name)
        if pretrained:
            model = builder(weights="DEFAULT")
            if num_classes != 1000:
                raise ValueError(f"pretrained {name} weights have 1000 classes, not {num_classes}")
            return model
        return builder(weights=None, num_classes=num_classes)

    build.__name__ = name
    return build


resnet18 = _torchvision("resnet18")
resnet34 = _torchvision("resnet34")
mobilenet_v2 = _torchvision("mobilenet_v2")
