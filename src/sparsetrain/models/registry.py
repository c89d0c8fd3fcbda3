"""Model registry: names map to factory functions with JSON-serialisable keyword arguments.

A model is rebuilt from ``{"name": ..., "kwargs": {...}}`` stored in a run's config.json,
so every factory argument is a named argument with a JSON-serialisable default,
and every value passed to :func:`create_model` must be JSON-serialisable too.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from torch import nn

from ..messages import shown
from ..structured.surgery import with_shapes

ModelFactory = Callable[..., nn.Module]


@dataclass(frozen=True)
class ModelSpec:
    """A registered model: its factory, expected input size (C, H, W) and default arguments."""

    name: str
    factory: ModelFactory
    input_size: tuple[int, ...]
    defaults: Mapping[str, Any]


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(
    name: str, *, input_size: tuple[int, ...] = (3, 32, 32)
) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator registering ``factory`` under ``name``; ``input_size`` is (C, H, W).

    The factory must take ``num_classes`` and only keyword-compatible arguments with
    JSON-serialisable defaults.
    """

    def decorator(factory: ModelFactory) -> ModelFactory:
        if name in _REGISTRY:
            raise ValueError(f"model name {name!r} is already registered; choose another name")
        defaults: dict[str, Any] = {}
        for param in inspect.signature(factory).parameters.values():
            if param.kind not in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY):
                raise ValueError(f"factory for model {name!r} has unsupported parameter "
                                 f"{param}; only named arguments with defaults are allowed")
            if param.default is param.empty:
                raise ValueError(f"argument {param.name!r} of model {name!r} has no default; "
                                 "every factory argument needs one")
            defaults[param.name] = param.default
        if "num_classes" not in defaults:
            raise ValueError(f"factory for model {name!r} lacks the required 'num_classes' "
                             "argument")
        _check_json(name, defaults)
        _REGISTRY[name] = ModelSpec(name, factory, tuple(input_size), MappingProxyType(defaults))
        return factory

    return decorator


def _check_json(name: str, kwargs: Mapping[str, Any]) -> None:
    for key, value in kwargs.items():
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError):
            raise ValueError(f"argument {key}={value!r} of model {name!r} is not "
                             "JSON-serialisable; use numbers, strings, booleans, lists or dicts"
                             ) from None


def model_spec(name: str) -> ModelSpec:
    """The :class:`ModelSpec` registered under ``name``; ``ValueError`` for unknown names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(list_models())
        raise ValueError(f"unknown model {name!r}; known models: {known}") from None


def list_models() -> list[str]:
    """Names of all registered models, sorted."""
    return sorted(_REGISTRY)


def input_size(name: str) -> tuple[int, ...]:
    """Expected input size (C, H, W) of model ``name``, e.g. (3, 32, 32) for CIFAR models."""
    return model_spec(name).input_size


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build model ``name`` with factory arguments ``kwargs``.

    Unknown names, unknown arguments and non-JSON-serialisable values raise ``ValueError``.
    """
    spec = model_spec(name)
    for key in kwargs:
        if key not in spec.defaults:
            raise ValueError(f"unknown argument {key!r} for model {name!r}; "
                             f"allowed arguments: {', '.join(spec.defaults)}")
    _check_json(name, kwargs)
    try:
        return spec.factory(**kwargs)
    except (RuntimeError, MemoryError, TypeError, ValueError) as error:  # e.g. a width too large to allocate
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise ValueError(f"model {name!r} cannot be built with {shown(kwargs)}: {reason}; allowed: arguments it can be built with.") from None


def rebuild(name: str, kwargs: Mapping[str, Any], shapes: Mapping[str, Mapping[str, int]] | None) -> nn.Module:
    """Registered model ``name(**kwargs)`` with each layer in ``shapes`` replaced by a fresh one of
    the saved sizes (:func:`~sparsetrain.structured.surgery.with_shapes`), so a compact model's
    state_dict loads strictly. Without shapes (None or empty: no channel was removed) it is the
    model as registered."""
    return with_shapes(create_model(name, **kwargs), shapes, f"model {name!r}")
