"""CNNs written as users write them (F.relu, residual adds, one in-place ReLU module called several
times), shared by the tests of the models users bring."""

import torch
import torch.nn.functional as F
from torch import nn


class PlainCNN(nn.Module):
    """Convolutions and F.relu, as users write them."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        return self.fc(F.relu(self.conv2(x)).mean((2, 3)))


class ResidualCNN(nn.Module):
    """A stem and one residual block, with F.relu after the add."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv_a, self.bn_a = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv_b, self.bn_b = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.stem(x)))
        x = F.relu(x + self.bn_b(self.conv_b(F.relu(self.bn_a(self.conv_a(x))))))
        return self.fc(x.mean((2, 3)))


class InplaceCNN(nn.Module):
    """One nn.ReLU(inplace=True) module called after every convolution."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.conv1, self.conv2, self.conv3 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 16, 3)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.conv3(self.relu(self.conv2(self.relu(self.conv1(x))))))
        return self.fc(x.mean((2, 3)))
