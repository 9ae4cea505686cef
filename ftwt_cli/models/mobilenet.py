"""MobileNetV1 for 32×32 inputs: a stride-1 stem and 13 depthwise-separable blocks."""

from torch import nn

from ftwt_cli.models.vgg import _init_weights

# (output channels, stride) of each depthwise-separable block
MOBILENETV1_LAYOUT = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
                      (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1))  # fmt: skip


def _conv_bn_relu(in_channels: int, out_channels: int, kernel: int, stride: int, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class MobileNetV1(nn.Module):
    def __init__(self, num_classes: int = 10, layout=MOBILENETV1_LAYOUT) -> None:
        super().__init__()
        layers = [_conv_bn_relu(3, 32, 3, 1)]
        channels = 32
        for out_channels, stride in layout:
            layers.append(_conv_bn_relu(channels, channels, 3, stride, groups=channels))  # depthwise
            layers.append(_conv_bn_relu(channels, out_channels, 1, 1))  # pointwise
            channels = out_channels
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)
        _init_weights(self)

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)).flatten(1))


def mobilenetv1(num_classes: int = 10) -> MobileNetV1:
    return MobileNetV1(num_classes)
