"""What the tests of the models users bring share: CNNs written as users write them (F.relu, residual
adds, one in-place ReLU module called several times) and the README's bare training loop."""

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sparsetrain.calls import call_model, logits_of


def logits(model: nn.Module, inputs: Any) -> torch.Tensor:
    """The model's logits on a tensor batch or a dict of named inputs, whatever it returns them in."""
    return logits_of(call_model(model, inputs))


def train_steps(model: nn.Module, method: Any, optimizer: torch.optim.Optimizer, batches: Iterable[tuple[Any, torch.Tensor]]) -> None:
    """The protocol loop: forward, backward, before_optimizer_step, optimizer step, method step; the
    cross-entropy over every position of a language model's logits."""
    for x, y in batches:
        out = logits(model, x)
        loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        method.before_optimizer_step()
        optimizer.step()
        method.step()


def bare_loop(model: nn.Module, method: Any, batches: Iterable[tuple[Any, torch.Tensor]]) -> None:
    """The README's loop from a fresh SGD optimizer bound to ``method``, in training mode."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    method.bind(optimizer)
    model.train()
    train_steps(model, method, optimizer, batches)


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
