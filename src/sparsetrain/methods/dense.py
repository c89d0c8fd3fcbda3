"""``dense``: the reference that sparsifies nothing, driven like every other method."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..declare import Declared
from .protocol import Method
from .registry import Context, MethodSpec, register_method


@dataclass(frozen=True)
class DenseOptions(Declared):
    """The dense reference has no options."""


class Dense(Method):
    """Trains the model as it is; ``finalize()`` returns it unchanged."""

    name = "dense"

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self._step = 0

    def step(self) -> bool:
        self._check_attached()
        self._step += 1
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"method": self.name, "step": self._step}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._check_state(state)
        self._step = int(state["step"])


def _build(model: nn.Module, options: DenseOptions, context: Context) -> Dense:
    return Dense(model)


register_method(MethodSpec("dense", DenseOptions, _build, "the unpruned reference: trains the model as it is",
                           reference=True))
