"""Shared model-zoo pieces: argument checks, channel scaling, weight init, residual blocks."""

from __future__ import annotations

import math

from torch import Tensor, nn


def check_positive_int(name: str, value: object) -> int:
    """Return ``value`` if it is an int >= 1, else raise ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def scale_channels(channels: int, width: float) -> int:
    """``channels * width`` rounded half up to an int, at least 1 (width multiplier)."""
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not (
        math.isfinite(width) and width > 0
    ):
        raise ValueError(f"width must be a positive finite number, got {width!r}")
    return max(1, math.floor(channels * width + 0.5))


def init_weights(model: nn.Module) -> None:
    """He et al. (2015) normal init, fan_out mode with ReLU gain, for convolutions (bias 0);
    batch-norm weight 1 and bias 0. Linear layers keep PyTorch's default init."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def conv_bn(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
            groups: int = 1) -> list[nn.Module]:
    """A bias-free ``kernel_size`` convolution with 'same' padding followed by batch norm."""
    return [
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2,
                  groups=groups, bias=False),
        nn.BatchNorm2d(out_channels),
    ]


def shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Module:
    """Identity if shapes match, else a 1x1 conv + BN projection (He et al. 2016, option B)."""
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    return nn.Sequential(*conv_bn(in_channels, out_channels, 1, stride))


class BasicBlock(nn.Module):
    """Residual block of two 3x3 conv-BN layers (He et al. 2016, fig. 2 left).

    The residual add is a plain ``out + shortcut(x)`` followed by its own ReLU module, so
    dependency tracers (Torch-Pruning) and activation hooks see every step.
    """

    expansion = 1

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.bn1 = conv_bn(in_channels, channels, 3, stride)
        self.relu1 = nn.ReLU()
        self.conv2, self.bn2 = conv_bn(channels, channels, 3)
        self.shortcut = shortcut(in_channels, channels, stride)
        self.relu2 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """Residual block 1x1 reduce, 3x3, 1x1 expand by 4 (He et al. 2016, fig. 5 right).

    The stride sits on the 3x3 convolution (the common "v1.5" placement). Same add/ReLU
    layout as :class:`BasicBlock`.
    """

    expansion = 4

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = channels * self.expansion
        self.conv1, self.bn1 = conv_bn(in_channels, channels, 1)
        self.relu1 = nn.ReLU()
        self.conv2, self.bn2 = conv_bn(channels, channels, 3, stride)
        self.relu2 = nn.ReLU()
        self.conv3, self.bn3 = conv_bn(channels, out_channels, 1)
        self.shortcut = shortcut(in_channels, out_channels, stride)
        self.relu3 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu3(out + self.shortcut(x))


def residual_stage(block: type[BasicBlock] | type[Bottleneck], in_channels: int, channels: int,
                   num_blocks: int, stride: int) -> nn.Sequential:
    """``num_blocks`` residual blocks; the first one applies ``stride``."""
    blocks = []
    for index in range(num_blocks):
        blocks.append(block(in_channels, channels, stride if index == 0 else 1))
        in_channels = channels * block.expansion
    return nn.Sequential(*blocks)
