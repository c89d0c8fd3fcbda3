"""Measuring a model: FLOPs of one forward pass, parameter counts, layer widths and the sparsity of
its prunable weights. Below :mod:`sparsetrain.structured` and :mod:`sparsetrain.methods`: it imports
only torch and :mod:`~sparsetrain.calls`, :mod:`~sparsetrain.modes` and :mod:`~sparsetrain.prunable`.

- FLOPs F: what ``torch.utils.flop_counter`` counts for one forward pass in eval mode without
  gradients (a Conv/Linear layer: 2 * output elements * inputs per output). Counting only the
  non-zero weights, each prunable layer l's count F_l is scaled by its density d_l (non-zeros /
  entries): F - sum_l F_l (1 - d_l), the work of a kernel that multiplies only non-zero weights.
- Parameters: sum of ``numel()`` over ``model.parameters()``; non-zero parameters: their non-zero entries.
- Sparsity of the prunable weights: zeros / entries over the weights of the prunable layers
  (Conv, Linear, transformers' Conv1D), a shared weight counted once, as the forward pass uses them.
- Widths: a layer's output (input) channels or features.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from .calls import ExampleInputs, call_model
from .modes import eval_mode
from .prunable import find_prunable, out_in, stored_weight, stores_transposed


def count_flops(model: nn.Module, example_inputs: ExampleInputs, skip_zeros: bool = False) -> int:
    """FLOPs of one forward pass (torch.utils.flop_counter, eval mode, no grad). Attention runs
    by its math path while counting, so its matrix products count on every device (the counter
    does not see CPU's fused attention kernel, and CUDA's fused kernels count differently).

    With ``skip_zeros`` each Conv/Linear layer's FLOPs are scaled by its weight density
    (non-zeros / entries): the work of a sparse kernel that multiplies only non-zero weights.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), eval_mode(model), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        call_model(model, example_inputs)
    if not skip_zeros:
        return int(counter.get_total_flops())
    per_module = counter.get_flop_counts()
    root = type(model).__name__
    total = counter.get_total_flops()
    for name, module in find_prunable(model):
        flops = sum(per_module.get(f"{root}.{name}", {}).values())
        density = float(torch.count_nonzero(module.weight)) / module.weight.numel()
        total -= round(flops * (1.0 - density))
    return int(total)


def param_counts(model: nn.Module) -> tuple[int, int]:
    """(number of parameters, number of non-zero parameter entries) of ``model``."""
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(int(torch.count_nonzero(p)) for p in params)


def count_flops_params(model: nn.Module, example_inputs: ExampleInputs) -> tuple[int, int]:
    """(FLOPs of one forward pass on ``example_inputs``, :func:`count_flops`; number of parameters)."""
    return count_flops(model, example_inputs), param_counts(model)[0]


def prunable_sparsity(model: nn.Module) -> float:
    """Fraction of zeros among the weights of ``model``'s prunable layers (Conv, Linear and
    transformers' Conv1D, a shared weight counted once) as the forward pass uses them; 0.0 for a
    model without such a layer."""
    with torch.no_grad():
        weights = {id(stored_weight(module)): module.weight for _, module in find_prunable(model)}
        size = sum(w.numel() for w in weights.values())
        return sum(int((w == 0).sum()) for w in weights.values()) / size if size else 0.0


def output_width(module: nn.Module) -> int:
    """Output channels of a convolution, output features of a Linear or Conv1D layer."""
    return out_in(stored_weight(module), stores_transposed(module)).shape[0]


def input_width(module: nn.Module) -> int:
    """Input channels of a convolution, input features of a Linear or Conv1D layer."""
    if isinstance(module, _ConvNd):
        return module.in_channels
    return out_in(stored_weight(module), stores_transposed(module)).shape[1]
