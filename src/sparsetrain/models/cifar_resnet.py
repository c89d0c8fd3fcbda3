"""CIFAR ResNets (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, sec. 4.2).

A 3x3 conv stem, three stages of n = (depth - 2) / 6 BasicBlocks with strides 1/2/2,
global average pooling and a Linear classifier. Shortcuts are projections (1x1 conv + BN)
where the shape changes and identities elsewhere.
"""

from __future__ import annotations

from torch import Tensor, nn

from sparsetrain.models.layers import (
    BasicBlock,
    check_positive_int,
    conv_bn,
    init_weights,
    residual_stage,
    scale_channels,
)
from sparsetrain.models.registry import register_model


class CifarResNet(nn.Module):
    """ResNet-``depth`` for 32x32 inputs with stage widths ``widths`` scaled by ``width``."""

    def __init__(self, depth: int, num_classes: int = 10,
                 widths: tuple[int, int, int] = (16, 32, 64), width: float = 1.0) -> None:
        super().__init__()
        if (depth - 2) % 6 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2 with n >= 1, got {depth!r}")
        check_positive_int("num_classes", num_classes)
        blocks_per_stage = (depth - 2) // 6
        channels = [scale_channels(c, width) for c in widths]
        self.conv1, self.bn1 = conv_bn(3, channels[0], 3)
        self.relu = nn.ReLU()
        self.layer1 = residual_stage(BasicBlock, channels[0], channels[0], blocks_per_stage, 1)
        self.layer2 = residual_stage(BasicBlock, channels[0], channels[1], blocks_per_stage, 2)
        self.layer3 = residual_stage(BasicBlock, channels[1], channels[2], blocks_per_stage, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels[2], num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))


@register_model("resnet20")
def resnet20(num_classes: int = 10, width: float = 1.0) -> CifarResNet:
    """ResNet-20 (3 blocks per stage), widths 16/32/64 times ``width``."""
    return CifarResNet(20, num_classes, width=width)


@register_model("resnet32")
def resnet32(num_classes: int = 10, width: float = 1.0) -> CifarResNet:
    """ResNet-32 (5 blocks per stage), widths 16/32/64 times ``width``."""
    return CifarResNet(32, num_classes, width=width)


@register_model("resnet44")
def resnet44(num_classes: int = 10, width: float = 1.0) -> CifarResNet:
    """ResNet-44 (7 blocks per stage), widths 16/32/64 times ``width``."""
    return CifarResNet(44, num_classes, width=width)


@register_model("resnet56")
def resnet56(num_classes: int = 10, width: float = 1.0) -> CifarResNet:
    """ResNet-56 (9 blocks per stage), widths 16/32/64 times ``width``."""
    return CifarResNet(56, num_classes, width=width)


@register_model("resnet110")
def resnet110(num_classes: int = 10, width: float = 1.0) -> CifarResNet:
    """ResNet-110 (18 blocks per stage), widths 16/32/64 times ``width``."""
    return CifarResNet(110, num_classes, width=width)


@register_model("resnet20_feather")
def resnet20_feather(num_classes: int = 10, width: float = 1.0) -> CifarResNet:
    """The 2x-wide ResNet-20 (widths 32/64/128 times ``width``) of the Feather repository
    (Glentis Georgoulakis et al., BMVC 2023)."""
    return CifarResNet(20, num_classes, widths=(32, 64, 128), width=width)
