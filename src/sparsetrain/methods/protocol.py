"""The method protocol: every way of sparsifying a network is driven by the same five calls.

    method = sparsetrain.create(model, "feather", total_steps=T, example_inputs=x0, **options)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)   # after create(): it sees the method's parameters
    method.bind(optimizer)
    for x, y in batches:
        loss = loss_fn(model(x), y)
        optimizer.zero_grad(); loss.backward()
        method.before_optimizer_step()   # add gradients of the method's own objective (GDP's penalty)
        optimizer.step()
        method.step()                    # thresholds, gates, pruning events; True when shapes changed
    model = method.finalize()            # a plain nn.Module

A method changes the model in place (parametrizations, resized layers) and keeps the bound
optimizer pointed at the model's live parameters. ``state_dict()`` holds only tensors and
plain Python values. Resume order: ``create()``, the optimizer, ``bind()``,
``method.load_state_dict()`` (which may resize the fresh model in place), then the model's and
the optimizer's own state dicts.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn


class Method(ABC):
    """Base class of every method: the protocol with the do-nothing defaults filled in."""

    name: str
    model: nn.Module

    def __init__(self) -> None:
        self.optimizer: torch.optim.Optimizer | None = None
        self._finalized = False

    def bind(self, optimizer: torch.optim.Optimizer) -> None:
        """Remember the optimizer built over ``model.parameters()`` (methods that resize
        parameters keep its state in step)."""
        self.optimizer = optimizer

    def before_optimizer_step(self) -> None:
        """Add the method's own gradients (after backward, before ``optimizer.step()``)."""

    @abstractmethod
    def step(self) -> bool:
        """Advance one optimizer step (call right after ``optimizer.step()``); True when the
        model's parameter shapes changed, so a wrapper such as DDP must be rebuilt."""

    def finalize(self) -> nn.Module:
        """Bake the method into the model and return it as a plain ``nn.Module``."""
        self._check_attached()
        self._finalized = True
        return self.model

    def metrics(self) -> dict[str, float]:
        """Numbers worth logging now (e.g. sparsity, threshold, flops_ratio)."""
        return {}

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: tensors and plain Python values only."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state saved by :meth:`state_dict` of the same method on the same model."""

    def _check_attached(self) -> None:
        if self._finalized:
            raise RuntimeError(f"this {self.name} method was finalized; create a new one to sparsify again.")
