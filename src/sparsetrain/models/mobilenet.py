"""MobileNetV1 (Howard et al., "MobileNets: Efficient Convolutional Neural Networks for Mobile
Vision Applications", 2017) adapted to 32x32 inputs: a stride-1 stem and strides
1,2,1,2,1,2,1,1,1,1,1,2,1 over the 13 depthwise-separable blocks, so a 32x32 image ends at 2x2.
"""

from __future__ import annotations

from torch import Tensor, nn

from sparsetrain.models.layers import check_positive_int, conv_bn, init_weights, scale_channels
from sparsetrain.models.registry import register_model

# (output channels, stride) of the 13 depthwise-separable blocks, CIFAR strides.
_BLOCKS: tuple[tuple[int, int], ...] = (
    (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
    (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1),
)


class DepthwiseSeparable(nn.Module):
    """Depthwise 3x3 conv (groups = channels) + BN + ReLU, then pointwise 1x1 conv + BN + ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv_dw, self.bn_dw = conv_bn(in_channels, in_channels, 3, stride, groups=in_channels)
        self.relu_dw = nn.ReLU()
        self.conv_pw, self.bn_pw = conv_bn(in_channels, out_channels, 1)
        self.relu_pw = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu_dw(self.bn_dw(self.conv_dw(x)))
        return self.relu_pw(self.bn_pw(self.conv_pw(x)))


class MobileNetV1(nn.Module):
    """MobileNetV1 for CIFAR with every channel count scaled by ``width``."""

    def __init__(self, num_classes: int = 10, width: float = 1.0) -> None:
        super().__init__()
        check_positive_int("num_classes", num_classes)
        in_channels = scale_channels(32, width)
        self.conv1, self.bn1 = conv_bn(3, in_channels, 3)
        self.relu = nn.ReLU()
        blocks = []
        for channels, stride in _BLOCKS:
            out_channels = scale_channels(channels, width)
            blocks.append(DepthwiseSeparable(in_channels, out_channels, stride))
            in_channels = out_channels
        self.features = nn.Sequential(*blocks)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(self.relu(self.bn1(self.conv1(x))))
        return self.fc(self.avgpool(x).flatten(1))


@register_model("mobilenetv1")
def mobilenetv1(num_classes: int = 10, width: float = 1.0) -> MobileNetV1:
    """MobileNetV1 for 32x32 inputs, channels 32 (stem), 64 ... 1024 times ``width``."""
    return MobileNetV1(num_classes, width)
