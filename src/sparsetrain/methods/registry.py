"""The registry of methods: one entry per method, each with a validated options dataclass.

``create(model, name, total_steps=..., example_inputs=..., data=..., **options)`` builds any
registered method. The context arguments are offered to every method and used by those that
need them: ``example_inputs`` by the methods that trace the model (gdp, frs), ``data`` (a
re-iterable of (x, y) batches) by those that score it (frs).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from ..declare import declared
from ..messages import shown
from ..schedules import validate_total_steps
from .protocol import Method


@dataclass(frozen=True)
class Context:
    """What a method may need besides its options: the length of training, a batch to trace
    the model with, and batches to score it on."""

    total_steps: int
    example_inputs: Tensor | Mapping[str, Tensor] | None = None
    data: Iterable[tuple[Tensor, Tensor]] | None = None

    def need_example_inputs(self, method: str) -> Tensor | Mapping[str, Tensor]:
        """The example inputs, checked only for presence: each method checks the kinds it accepts."""
        if self.example_inputs is None:
            raise ValueError(f"method {method!r} traces the model; allowed: example_inputs=a tensor batch the model accepts.")
        return self.example_inputs

    def need_data(self, method: str) -> Iterable[tuple[Tensor, Tensor]]:
        if self.data is None:
            raise ValueError(f"method {method!r} scores the model on data; allowed: data=a re-iterable of (x, y) batches.")
        return self.data


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: its options dataclass (its fields declared with
    :func:`sparsetrain.declare.option`), a builder, a one-line summary, the training recipe of its
    paper (``recipe``, a name of :func:`sparsetrain.run.options.list_recipes`), defaults to show in
    listings, and whether it is the unpruned reference every comparison starts from."""

    name: str
    options: type
    build: Callable[[nn.Module, Any, Context], Method]
    summary: str
    recipe: str = "feather"
    shown_defaults: dict[str, Any] = field(default_factory=dict)
    reference: bool = False

    @property
    def target(self) -> str | None:
        """The option ``bench`` varies for this method: the one declared with an axis (None: none)."""
        return next((name for name, spec, _ in declared(self.options) if spec.axis is not None), None)

    def option_names(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self.options)]

    def defaults(self) -> dict[str, Any]:
        """Every option with its default value."""
        values = {f.name: _default(f) for f in dataclasses.fields(self.options)}
        return {**values, **self.shown_defaults}


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


_REGISTRY: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    """Add a method to the registry; it then appears in ``create``, ``list_methods`` and the CLI."""
    if spec.name in _REGISTRY:
        raise ValueError(f"method {spec.name!r} is already registered.")
    if not dataclasses.is_dataclass(spec.options):
        raise ValueError(f"method {spec.name!r}: options={spec.options!r} is not allowed; allowed: a dataclass type.")
    _REGISTRY[spec.name] = spec
    return spec


def reference_method() -> str:
    """The registered unpruned reference (``dense``)."""
    return next(name for name, spec in _REGISTRY.items() if spec.reference)


def unregister_method(name: str) -> None:
    """Remove method ``name`` from the registry (a method registered for a while, e.g. in a test)."""
    method_spec(name)
    del _REGISTRY[name]


def method_spec(name: str) -> MethodSpec:
    """The registered entry of method ``name``."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(_REGISTRY)}.")
    return _REGISTRY[name]


def list_methods() -> dict[str, dict[str, Any]]:
    """Every registered method, in registration order, with its options and their defaults."""
    return {name: spec.defaults() for name, spec in _REGISTRY.items()}


def method_options(name: str, **options: Any) -> Any:
    """The validated options dataclass of method ``name``; an unknown option is a ValueError
    that lists the allowed ones."""
    spec = method_spec(name)
    allowed = spec.option_names()
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        listed = ", ".join(allowed) if allowed else "none"
        raise ValueError(f"unknown option {unknown[0]!r} for method {name!r}; allowed options: {listed}.")
    return spec.options(**options)


def create(
    model: nn.Module,
    method: str,
    *,
    total_steps: int,
    example_inputs: Tensor | Mapping[str, Tensor] | None = None,
    data: Iterable[tuple[Tensor, Tensor]] | None = None,
    **options: Any,
) -> Method:
    """Attach method ``method`` to ``model`` for a training of ``total_steps`` optimizer steps.

    Build the optimizer after this call (so it holds the method's parameters, e.g. GDP's
    gates), then ``bind`` it.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model={shown(model)} is not allowed; allowed: a torch.nn.Module, e.g. "
                        "sparsetrain.models.create_model('resnet20').")
    wrapped = next((name for name, module in model.named_modules() if _is_fsdp1(module)), None)
    if wrapped is not None:
        what = f"module {wrapped!r}" if wrapped else "the model"
        raise ValueError(f"{what} is wrapped by FullyShardedDataParallel (FSDP1, "
                         "flat parameters); allowed: create() on the plain model, then FSDP2's fully_shard (in "
                         "Lightning: ModelParallelStrategy), or DDP.")
    spec = method_spec(method)
    validated = method_options(method, **options)
    context = Context(validate_total_steps(total_steps), example_inputs, data)
    return spec.build(model, validated, context)


def _is_fsdp1(module: nn.Module) -> bool:
    """Whether ``module`` is torch's FullyShardedDataParallel wrapper (known by its class, so that
    torch.distributed need not be imported)."""
    return type(module).__name__ == "FullyShardedDataParallel" and type(module).__module__.startswith("torch.distributed.fsdp")
