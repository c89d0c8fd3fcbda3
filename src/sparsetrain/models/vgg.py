"""VGG-16 with batch norm for CIFAR (Simonyan & Zisserman, "Very Deep Convolutional Networks
for Large-Scale Image Recognition", ICLR 2015; BN from Ioffe & Szegedy 2015).

The 13 3x3 conv + BN + ReLU layers of configuration D with five 2x2 max pools, which take
a 32x32 image to 1x1x512, then one Linear(512, num_classes) (the usual CIFAR variant).
Convolutions carry no bias since batch norm follows each one.
"""

from __future__ import annotations

from torch import Tensor, nn

from sparsetrain.models.layers import check_positive_int, conv_bn, init_weights
from sparsetrain.models.registry import register_model

# Output channels of each conv; "M" is a 2x2 max pool.
_VGG16: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
                                 512, 512, 512, "M", 512, 512, 512, "M")


class VGG(nn.Module):
    """A VGG feature stack described by ``config`` followed by a single Linear classifier."""

    def __init__(self, config: tuple[int | str, ...], num_classes: int = 10) -> None:
        super().__init__()
        check_positive_int("num_classes", num_classes)
        layers: list[nn.Module] = []
        in_channels = 3
        for item in config:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [*conv_bn(in_channels, int(item), 3), nn.ReLU()]
                in_channels = int(item)
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(in_channels, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x).flatten(1))


@register_model("vgg16")
def vgg16(num_classes: int = 10) -> VGG:
    """VGG-16-BN for 32x32 inputs with a Linear(512, num_classes) classifier."""
    return VGG(_VGG16, num_classes)
