"""SmallNet: the quickstart model, four conv→BN→ReLU blocks, small enough to train on a laptop CPU."""


from ftwt_cli.models.vgg import VGG


def smallnet(num_classes: int = 10) -> VGG:
    return VGG((16, "M", 32, "M", 64, "M", 64), num_classes)
