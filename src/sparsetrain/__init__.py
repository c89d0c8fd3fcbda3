"""sparsetrain: make neural networks sparse during ordinary training."""

from .inference import load_compact, load_finalized
from .methods import (
    FRS,
    GDP,
    Method,
    MethodConfig,
    MethodSpec,
    Sparsifier,
    create,
    list_methods,
    method_config,
    method_options,
    register_method,
    register_preset,
)
from .onnx import export_onnx
from .operators import sparsify_ste, threshold_operator
from .prunable import find_prunable
from .report import LayerReport, SparsityReport, sparsity_report
from .schedules import Constant, Cubic, Linear, make_schedule
from .selection import Selection, kth_smallest, select

__all__ = [
    "FRS",
    "GDP",
    "Constant",
    "Cubic",
    "LayerReport",
    "Linear",
    "Method",
    "MethodConfig",
    "MethodSpec",
    "Selection",
    "Sparsifier",
    "SparsityReport",
    "create",
    "export_onnx",
    "find_prunable",
    "kth_smallest",
    "list_methods",
    "load_compact",
    "load_finalized",
    "make_schedule",
    "method_config",
    "method_options",
    "register_method",
    "register_preset",
    "select",
    "sparsify_ste",
    "sparsity_report",
    "threshold_operator",
]
