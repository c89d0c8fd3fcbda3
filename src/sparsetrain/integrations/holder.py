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

    def _method(self) -> Method:
        if self.method is None:
            raise RuntimeError(f"{type(self).__name__} has no method yet: it is created when training starts.")
        return self.method
