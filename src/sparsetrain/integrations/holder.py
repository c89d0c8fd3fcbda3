"""What every trainer callback keeps: a method by name with its options, created once training starts."""

from __future__ import annotations

from typing import Any

from ..calls import ExampleInputs
from ..methods import Method, method_options


class MethodHolder:
    """The method's name and options (validated at once, before any training), optional example
    inputs, and the method itself once a callback has created it."""

    def __init__(self, method: str, example_inputs: ExampleInputs | None, options: dict[str, Any]) -> None:
        method_options(method, **options)
        self.method_name = method
        self.options = options
        self.example_inputs = example_inputs
        self.method: Method | None = None

    def _bind(self, optimizer: Any) -> Method:
        """Bind the method to the trainer's optimizer. A method whose state each rank holds a part of
        (:attr:`~sparsetrain.methods.Method.state_is_sharded`) is refused: the trainers write a callback's
        state from rank 0 alone."""
        method = self._method()
        method.bind(optimizer)
        if method.state_is_sharded:
            raise ValueError(f"method {self.method_name!r} with these options keeps each rank's part of its state under "
                             "FSDP (N:M groups held between updates), which the trainer's checkpoint, written by rank 0 "
                             "alone, cannot hold; allowed: update_every=1 under FSDP, or DDP.")
        return method

    def _method(self) -> Method:
        if self.method is None:
            raise RuntimeError(f"{type(self).__name__} has no method yet: it is created when training starts.")
        return self.method
