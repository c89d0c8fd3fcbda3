"""Fixtures for the structured-pruning tests."""

import pytest
import torch
from torch import nn


@pytest.fixture(autouse=True)
def one_thread():
    """These tensors are tiny: intra-op threads only add overhead, and on a shared 2-core machine
    OpenMP's waiting threads made these tests 20x slower. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
