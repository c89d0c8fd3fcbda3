"""Shared fixtures: one torch thread, tiny models and deterministic data for exact tests."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from user_models import train_steps


class TinyNet(nn.Module):
    """Conv2d (regular and depthwise) + BatchNorm + Linear: small, but every magnitude distinct."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.conv(x)))
        x = F.relu(self.conv2(F.relu(self.depthwise(x))))
        return self.fc(x.mean((2, 3)))


def _make_batches(count: int, seed: int = 0, size: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, size, size, generator=gen), torch.randint(0, 10, (8,), generator=gen)) for _ in range(count)]


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread in every test: the thread count must not depend on the machine, and on a
    shared 2-core machine OpenMP's waiting threads made tests up to 50x slower when another process
    held the other core. Child processes set their own (--workers 1). Restored afterwards, also
    after a run in the test set its own (``--workers``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_net() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet()


@pytest.fixture
def make_batches():
    """make_batches(count, seed=0, size=8): a list of deterministic (x, y) batches."""
    return _make_batches


@pytest.fixture
def train():
    """train(model, method, optimizer, batches): the protocol loop over ``batches``."""
    return train_steps


def _randomize_batch_norms(model: nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                module.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                module.bias.copy_(torch.randn(n, generator=gen) * 0.1)
                module.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                module.running_var.copy_(torch.rand(n, generator=gen) + 0.5)


@pytest.fixture(scope="session")
def randomize_batch_norms():
    """randomize_batch_norms(model, seed=0): non-trivial batch-norm statistics, so that removed
    channels would show in the outputs."""
    return _randomize_batch_norms
