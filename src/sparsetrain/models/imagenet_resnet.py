"""ImageNet ResNets (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, table 1).

A 7x7 stride-2 conv stem and 3x3 stride-2 max pool, four stages of BasicBlocks (ResNet-18/34)
or Bottlenecks (ResNet-50) with 64/128/256/512 base channels and strides 1/2/2/2, global
average pooling and a Linear classifier; projection shortcuts (1x1 conv + BN) where the
shape changes. Inputs are 3x224x224; any size of at least 32x32 works.
"""

from __future__ import annotations

from torch import Tensor, nn

from sparsetrain.models.layers import (
    BasicBlock,
    Bottleneck,
    check_positive_int,
    conv_bn,
    init_weights,
    residual_stage,
)
from sparsetrain.models.registry import register_model

_IMAGENET = (3, 224, 224)


class ImageNetResNet(nn.Module):
    """ResNet with ``stage_blocks`` residual blocks of type ``block`` in each of four stages."""

    def __init__(self, block: type[BasicBlock] | type[Bottleneck],
                 stage_blocks: tuple[int, int, int, int], num_classes: int = 1000) -> None:
        super().__init__()
        check_positive_int("num_classes", num_classes)
        self.conv1, self.bn1 = conv_bn(3, 64, 7, stride=2)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_channels = 64
        stages = []
        for index, (channels, num_blocks) in enumerate(zip((64, 128, 256, 512), stage_blocks)):
            stride = 1 if index == 0 else 2
            stages.append(residual_stage(block, in_channels, channels, num_blocks, stride))
            in_channels = channels * block.expansion
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


@register_model("resnet18", input_size=_IMAGENET)
def resnet18(num_classes: int = 1000) -> ImageNetResNet:
    """ResNet-18: BasicBlocks 2/2/2/2."""
    return ImageNetResNet(BasicBlock, (2, 2, 2, 2), num_classes)


@register_model("resnet34", input_size=_IMAGENET)
def resnet34(num_classes: int = 1000) -> ImageNetResNet:
    """ResNet-34: BasicBlocks 3/4/6/3."""
    return ImageNetResNet(BasicBlock, (3, 4, 6, 3), num_classes)


@register_model("resnet50", input_size=_IMAGENET)
def resnet50(num_classes: int = 1000) -> ImageNetResNet:
    """ResNet-50: Bottlenecks 3/4/6/3, stride on the 3x3 convolution."""
    return ImageNetResNet(Bottleneck, (3, 4, 6, 3), num_classes)
