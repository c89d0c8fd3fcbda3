"""Methods: the protocol every method implements, the registry, and one module per family.

Importing this package registers, in order: dense, the unstructured presets (feather, st3,
st3-sigma, gmp, ste), gdp and frs. A new method is one module that calls
:func:`register_method`, imported here.
"""

from .protocol import Method
from .registry import (
    Context,
    MethodSpec,
    create,
    list_methods,
    method_options,
    method_spec,
    reference_method,
    register_method,
    unregister_method,
)
from .dense import Dense, DenseOptions
from .unstructured import MethodConfig, Sparsifier, UnstructuredOptions, method_config, register_preset
from .gdp import GDP, GDPOptions
from .frs import FRS, FRSOptions

__all__ = [
    "FRS",
    "GDP",
    "Context",
    "Dense",
    "DenseOptions",
    "FRSOptions",
    "GDPOptions",
    "Method",
    "MethodConfig",
    "MethodSpec",
    "Sparsifier",
    "UnstructuredOptions",
    "create",
    "list_methods",
    "method_config",
    "method_options",
    "method_spec",
    "reference_method",
    "register_method",
    "register_preset",
    "unregister_method",
]
