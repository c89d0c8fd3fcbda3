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
optimizer pointed at the model's live parameters; ``bind`` accepts only a torch optimizer over
parameters of the model (each once; a subset is fine). ``state_dict()`` holds only tensors and
plain Python values, and ``load_state_dict`` refuses a state saved with other settings. Resume
order: ``create()``, the optimizer, ``bind()``, ``method.load_state_dict()`` (which may resize
the fresh model in place), then the model's and the optimizer's own state dicts.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..measure import prunable_sparsity
from ..messages import shown
from ..prunable import is_sharded


def check_finite(magnitudes: Sequence[Tensor], names: Sequence[str], kind: str, what: str, step: int) -> None:
    """Raise FloatingPointError naming the first of ``names`` (each a ``kind``, e.g. "layer") whose
    ``magnitudes`` (non-negative tensors, one per name) hold a NaN or an infinity."""
    peaks = torch.stack(torch._foreach_max(list(magnitudes)))
    finite = torch.isfinite(peaks)
    if not bool(finite.all()):
        name = names[int((~finite).nonzero()[0])]
        raise FloatingPointError(f"{kind} {name!r} has a NaN or infinite {what} at step {step}; "
                                 f"allowed: finite {what}s (lower the learning rate or clip gradients).")


class Method(ABC):
    """Base class of every method: the protocol with the do-nothing defaults filled in."""

    name: str
    model: nn.Module
    removes_channels = False  # the model's parameters change shape: no FSDP (fully_shard)

    def __init__(self) -> None:
        self.optimizer: torch.optim.Optimizer | None = None
        self._finalized = False

    def bind(self, optimizer: torch.optim.Optimizer) -> None:
        """Remember the optimizer built over ``model.parameters()`` (methods that resize
        parameters keep its state in step), once :meth:`_check_optimizer` accepts it."""
        self._check_optimizer(optimizer)
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

    def sparsity(self) -> float:
        """Fraction of zeros among the weights of the model's prunable layers (Conv, Linear and
        transformers' Conv1D, a shared weight counted once) as the forward pass uses them, before
        and after ``finalize()``; 0.0 for a model without such a layer. Methods that prune chosen
        layers count theirs (:func:`~sparsetrain.measure.prunable_sparsity`)."""
        return prunable_sparsity(self.model)

    def metrics(self) -> dict[str, float]:
        """Numbers worth logging now (e.g. sparsity, threshold, flops_ratio), before and after
        ``finalize()``."""
        return {}

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: tensors and plain Python values only."""

    @property
    def state_is_sharded(self) -> bool:
        """Whether :meth:`state_dict` holds each rank's part of the state (DTensors placed like weights
        sharded by FSDP): every rank must then save it (``torch.distributed.checkpoint``), not rank 0 alone."""
        return False

    @abstractmethod
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state saved by :meth:`state_dict` of the same method on the same model, with
        the same settings (:meth:`_check_state` refuses any other)."""

    def _check_optimizer(self, optimizer: object) -> None:
        """TypeError unless ``optimizer`` is a torch optimizer; ValueError if it holds a tensor that
        is not a parameter of the model, or a parameter twice (a subset, e.g. frozen layers left
        out, is fine), or if the method removes channels and FSDP has sharded the model. Methods
        with more to check extend this."""
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer={shown(optimizer)} is not allowed; allowed: a torch.optim.Optimizer "
                            "over the model's parameters.")
        names = {id(p): name for name, p in self.model.named_parameters()}
        if self.removes_channels and any(is_sharded(p) for p in self.model.parameters()):
            raise ValueError(f"{self.name} removes channels, which parameters sharded by FSDP (fully_shard) cannot "
                             "follow; allowed: DDP (torchrun, one model replica per process) or a single process.")
        seen: set[int] = set()
        for index, group in enumerate(optimizer.param_groups):
            for p in group["params"]:
                if id(p) not in names:
                    raise ValueError(
                        f"the optimizer's param group {index} holds a tensor of shape {tuple(p.shape)} that is not a "
                        f"parameter of the model this {self.name} method sparsifies; allowed: an optimizer built from "
                        "that model's parameters after sparsetrain.create()."
                    )
                if id(p) in seen:
                    raise ValueError(f"the optimizer holds parameter {names[id(p)]!r} twice; allowed: each parameter "
                                     "of the model at most once.")
                seen.add(id(p))

    def _settings(self) -> dict[str, Any]:
        """What a saved state must agree on to resume (options, schedule steps); none by default."""
        return {}

    def _check_model(self, state: Mapping[str, Any]) -> None:
        """ValueError if ``state`` was saved on another model; no check by default."""

    def _check_state(self, state: object) -> None:
        """Refuse, in one sentence naming what differs, a state that :meth:`state_dict` of this method
        did not write: TypeError for a non-mapping, ValueError for another method, other keys, another
        model (:meth:`_check_model`) or other settings. A state without settings (written before they
        were recorded) is taken to have these."""
        if not isinstance(state, Mapping):
            raise TypeError(f"state={shown(state)} is not allowed; allowed: the mapping state_dict() of a "
                            f"{self.name} method returned.")
        if state.get("method") != self.name:
            raise ValueError(f"this state is for method {state.get('method')!r}; allowed: a state of method {self.name!r}.")
        expected = set(self.state_dict())
        if set(state) | ({"settings"} & expected) != expected:
            raise ValueError(f"this state has keys {sorted(map(str, state))}; allowed: a {self.name} state with "
                             f"{sorted(expected)}.")
        self._check_model(state)
        settings = self._settings()
        saved = state.get("settings", settings)
        for key, value in settings.items():
            old = saved.get(key) if isinstance(saved, Mapping) else None
            if old != value:
                raise ValueError(f"the saved state has {key}={old!r} but this {self.name} has {key}={value!r}; "
                                 "allowed: the settings of the run being resumed.")

    def _check_attached(self) -> None:
        if self._finalized:
            raise RuntimeError(f"this {self.name} method was finalized; create a new one to sparsify again.")
