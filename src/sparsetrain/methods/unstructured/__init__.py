"""Unstructured (weight-level) methods: one engine, the :class:`Sparsifier` (:mod:`.engine`, the
maths), its knobs (:mod:`.config`), the parametrization of a weight (:mod:`.weight`), its work across
processes (:mod:`.distributed`, :mod:`.sharding`) and the named presets (:mod:`.presets`)."""

from .config import MethodConfig, method_config, nm_presets, resolve_config
from .engine import Sparsifier
from .presets import NMOptions, UnstructuredOptions, register_preset
from .weight import SparseWeight, st3_rescale

__all__ = [
    "MethodConfig",
    "NMOptions",
    "SparseWeight",
    "Sparsifier",
    "UnstructuredOptions",
    "method_config",
    "nm_presets",
    "register_preset",
    "resolve_config",
    "st3_rescale",
]
