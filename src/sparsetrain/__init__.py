"""sparsetrain: make neural networks sparse during ordinary training."""

from .methods import MethodConfig, list_methods, method_config, register_method
from .operators import sparsify_ste, threshold_operator
from .report import LayerReport, SparsityReport, sparsity_report
from .schedules import Constant, Cubic, Linear, make_schedule
from .selection import kth_smallest, magnitude_threshold
from .sparsifier import Sparsifier, find_prunable
from .structured import FRS, GDP

__all__ = [
    "FRS",
    "GDP",
    "Constant",
    "Cubic",
    "LayerReport",
    "Linear",
    "MethodConfig",
    "Sparsifier",
    "SparsityReport",
    "find_prunable",
    "kth_smallest",
    "list_methods",
    "magnitude_threshold",
    "make_schedule",
    "method_config",
    "register_method",
    "sparsify_ste",
    "sparsity_report",
    "threshold_operator",
]
