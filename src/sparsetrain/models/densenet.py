"""DenseNet-BC (Huang et al., "Densely Connected Convolutional Networks", CVPR 2017) for CIFAR.

Depth L gives three dense blocks of n = (L - 4) / 6 bottleneck layers. A 3x3 stem makes 2k
channels (k = growth rate); each bottleneck layer is BN-ReLU-1x1 conv to 4k, BN-ReLU-3x3 conv
to k, concatenated to its input with ``torch.cat``; transitions are BN-ReLU-1x1 conv to
floor(0.5 C) channels and a 2x2 average pool; the head is BN-ReLU-global average pool-Linear.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sparsetrain.models.layers import check_positive_int, init_weights
from sparsetrain.models.registry import register_model


class DenseLayer(nn.Module):
    """Bottleneck layer ``cat([x, conv3x3(relu(bn(conv1x1(relu(bn(x))))))])``: adds k channels."""

    def __init__(self, in_channels: int, growth_rate: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_channels, 4 * growth_rate, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(4 * growth_rate)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(4 * growth_rate, growth_rate, 3, padding=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(self.relu1(self.bn1(x)))
        out = self.conv2(self.relu2(self.bn2(out)))
        return torch.cat([x, out], dim=1)


class Transition(nn.Module):
    """BN-ReLU-1x1 conv to ``out_channels``, then 2x2 average pooling."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(in_channels)
        self.relu = nn.ReLU()
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.pool = nn.AvgPool2d(2)

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(self.conv(self.relu(self.bn(x))))


class DenseNetBC(nn.Module):
    """DenseNet-BC of the given ``depth`` and ``growth_rate`` with compression 0.5."""

    def __init__(self, depth: int, num_classes: int = 10, growth_rate: int = 24) -> None:
        super().__init__()
        if (depth - 4) % 6 or depth < 10:
            raise ValueError(f"DenseNet-BC depth must be 6n + 4 with n >= 1, got {depth!r}")
        check_positive_int("num_classes", num_classes)
        check_positive_int("growth_rate", growth_rate)
        layers_per_block = (depth - 4) // 6
        channels = 2 * growth_rate
        self.conv1 = nn.Conv2d(3, channels, 3, padding=1, bias=False)
        stages: list[nn.Module] = []
        for block in range(3):
            for _ in range(layers_per_block):
                stages.append(DenseLayer(channels, growth_rate))
                channels += growth_rate
            if block < 2:
                stages.append(Transition(channels, channels // 2))
                channels //= 2
        self.features = nn.Sequential(*stages)
        self.bn = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn(self.features(self.conv1(x))))
        return self.fc(self.avgpool(x).flatten(1))


@register_model("densenet40")
def densenet40(num_classes: int = 10, growth_rate: int = 24) -> DenseNetBC:
    """DenseNet-BC-40 (6 bottleneck layers per block) with growth rate ``growth_rate``."""
    return DenseNetBC(40, num_classes, growth_rate)
