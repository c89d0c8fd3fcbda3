"""Per-layer sparsity report: each prunable layer's name, size and fraction of zeros, plus totals;
for an N:M run, whether each layer holds the pattern; and what was left dense, and why."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .measure import count_flops, output_width, param_counts
from .nm import NMPattern, as_pattern, has_groups, pattern_holds
from .prunable import PRUNABLE_TYPES, LayerType, choose_layers, find_prunable, out_in, stores_transposed


@dataclass(frozen=True)
class LayerReport:
    """One prunable layer: its module name, weight count, zero count and, for an N:M report,
    whether its weight holds the pattern (None: the weight has no groups of M, it stays dense)."""

    name: str
    size: int
    zeros: int
    pattern: bool | None = None

    @property
    def sparsity(self) -> float:
        return self.zeros / self.size


@dataclass(frozen=True)
class SparsityReport:
    """The layers of a model and their totals; ``nm`` the (N, M) pattern checked, if any; ``dense``
    the (name, reason) of each module left out of the report: layers left dense by default or by
    ``exclude``, and embeddings (:func:`~sparsetrain.prunable.choose_layers`)."""

    layers: tuple[LayerReport, ...]
    nm: NMPattern | None = None
    dense: tuple[tuple[str, str], ...] = ()

    @property
    def size(self) -> int:
        return sum(layer.size for layer in self.layers)

    @property
    def zeros(self) -> int:
        return sum(layer.zeros for layer in self.layers)

    @property
    def sparsity(self) -> float:
        return self.zeros / self.size

    def to_markdown(self) -> str:
        """A markdown table, one row per layer and a total row (with an N:M column for an N:M report),
        then one line per module left dense and why."""
        if self.nm is None:
            rows = ["| layer | weights | zeros | sparsity |", "|---|---:|---:|---:|"]
            rows += [f"| {r.name} | {r.size:,} | {r.zeros:,} | {r.sparsity:.2%} |" for r in self.layers]
            rows.append(f"| **total** | {self.size:,} | {self.zeros:,} | {self.sparsity:.2%} |")
        else:
            n, m = self.nm
            holds = {True: "yes", False: "no", None: f"dense (input not a multiple of {m})"}
            rows = [f"| layer | weights | zeros | sparsity | {n}:{m} |", "|---|---:|---:|---:|---|"]
            rows += [f"| {r.name} | {r.size:,} | {r.zeros:,} | {r.sparsity:.2%} | {holds[r.pattern]} |"
                     for r in self.layers]
            held = sum(r.pattern is True for r in self.layers)
            rows.append(f"| **total** | {self.size:,} | {self.zeros:,} | {self.sparsity:.2%} | "
                        f"{held} of {len(self.layers)} layers |")
        if self.dense:
            rows += ["", "Left dense:", *(f"- {name}: {reason}" for name, reason in self.dense)]
        return "\n".join(rows)

    def __str__(self) -> str:
        return self.to_markdown()


def sparsity_report(
    model: nn.Module,
    exclude: Sequence[str] | None = None,
    nm: NMPattern | tuple[int, int] | str | None = None,
    types: Sequence[LayerType] = PRUNABLE_TYPES,
) -> SparsityReport:
    """The zeros of each prunable layer's weight (Conv1d/2d/3d, Linear, transformers' Conv1D, or
    ``types``) as the forward pass uses it: the thresholded weight while a method is attached, the
    plain weight after. ``exclude``: glob patterns of layers left out; None: the default exclusions
    (:func:`~sparsetrain.prunable.choose_layers`: e.g. a ViT's patch embedding, a tied language-model
    head), listed with their reasons in ``dense``. ``nm``: the N:M pattern to check in each layer
    (an NMPattern, (n, m) or "N:M"), groups along its input dimension (:mod:`sparsetrain.nm`)."""
    nm = None if nm is None else as_pattern(nm)
    choice = choose_layers(model, types, exclude)
    with torch.no_grad():
        layers = [
            LayerReport(name, m.weight.numel(), int((m.weight == 0).sum()), _pattern(m, nm))
            for name, m in choice.layers
        ]
    if not layers:
        raise ValueError(f"model {type(model).__name__} has no prunable layer to report on.")
    return SparsityReport(tuple(layers), nm, choice.dense)


def _pattern(module: nn.Module, nm: tuple[int, int] | None) -> bool | None:
    weight = out_in(module.weight, stores_transposed(module))
    if nm is None or not has_groups(weight.shape, nm[1]):
        return None
    return pattern_holds(weight, *nm)


def size_report(before: nn.Module, after: nn.Module, example_inputs: torch.Tensor) -> str:
    """Markdown: parameters and FLOPs (non-zero weights only) of ``before`` and ``after``, and each
    Conv/Linear layer's output width in both."""
    params, nonzero = zip(*(param_counts(m) for m in (before, after)))
    flops = [count_flops(m, example_inputs, skip_zeros=True) for m in (before, after)]
    rows = [
        "| | before | after | ratio |",
        "|---|---:|---:|---:|",
        f"| parameters | {params[0]:,} | {params[1]:,} | {params[1] / params[0]:.2%} |",
        f"| non-zero parameters | {nonzero[0]:,} | {nonzero[1]:,} | {nonzero[1] / nonzero[0]:.2%} |",
        f"| FLOPs (non-zero weights) | {flops[0]:,} | {flops[1]:,} | {flops[1] / flops[0]:.2%} |",
        "",
        "| layer | width before | width after |",
        "|---|---:|---:|",
    ]
    after_layers = dict(find_prunable(after))
    for name, module in find_prunable(before):
        after_width = output_width(after_layers[name]) if name in after_layers else 0
        rows.append(f"| {name} | {output_width(module)} | {after_width} |")
    return "\n".join(rows)

