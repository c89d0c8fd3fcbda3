"""Which layers are prunable: Conv and Linear weights, filtered by name pattern, type and size."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

from torch import Tensor, nn

PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def find_prunable(
    model: nn.Module,
    types: Sequence[type[nn.Module]] = PRUNABLE_TYPES,
    exclude: Sequence[str] = (),
    min_size: int = 0,
) -> list[tuple[str, nn.Module]]:
    """(name, module) of every layer of one of ``types`` whose weight has at least ``min_size``
    entries and whose name matches none of the glob patterns in ``exclude``."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, tuple(types))
        and isinstance(getattr(module, "weight", None), Tensor)
        and module.weight.numel() >= min_size
        and not any(fnmatch.fnmatchcase(name, pattern) for pattern in exclude)
    ]


def default_exclude(model: nn.Module) -> tuple[str, ...]:
    """The exclusions the model's own modules declare (a ``default_exclude`` tuple of patterns
    relative to that module, e.g. a ViT's patch embedding and head), as patterns on ``model``."""
    return tuple(
        f"{name}.{pattern}" if name else pattern
        for name, module in model.named_modules()
        for pattern in getattr(module, "default_exclude", ())
    )
