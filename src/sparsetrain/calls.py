"""How a model is called and what it returns: the inputs a method traces it with are a tensor
batch or a mapping of named inputs (a Hugging Face model's ``{"input_ids": ..., ...}``), and its
output is the logits, an output object holding them (``.logits``) or a tuple or mapping of tensors."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor, nn

ExampleInputs = Tensor | Mapping[str, Tensor]


def call_model(model: nn.Module, example_inputs: ExampleInputs) -> Any:
    """``model(x)`` for a tensor, ``model(**x)`` for a mapping of named inputs."""
    return model(**example_inputs) if isinstance(example_inputs, Mapping) else model(example_inputs)


def map_inputs(example_inputs: ExampleInputs, fn: Callable[[Tensor], Tensor]) -> ExampleInputs:
    """``fn`` applied to the tensor, or to every tensor of the mapping."""
    if isinstance(example_inputs, Mapping):
        return {key: fn(value) for key, value in example_inputs.items()}
    return fn(example_inputs)


def logits_of(output: Any) -> Tensor:
    """The logits in a model's output: the output itself if it is a tensor, else its ``logits``
    (attribute or key, as Hugging Face outputs hold them), else the first tensor of a tuple,
    list or mapping."""
    if isinstance(output, Tensor):
        return output
    logits = output.get("logits") if isinstance(output, Mapping) else getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    values = output.values() if isinstance(output, Mapping) else output if isinstance(output, (tuple, list)) else ()
    first = next((value for value in values if isinstance(value, Tensor)), None)
    if first is None:
        raise ValueError(
            f"the model's output is a {type(output).__name__} without a tensor; allowed: logits, an output "
            "object with .logits, or a tuple or mapping whose first tensor is the logits."
        )
    return first
