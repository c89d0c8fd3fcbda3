"""Which layers are prunable, and which stay dense by default.

Prunable types (``PRUNABLE_TYPES``): ``nn.Linear``, ``nn.Conv1d/2d/3d`` and transformers' ``Conv1D``
(GPT-2's layers), named by class so that transformers is never imported here. A ``types`` list may
hold classes (matched with ``isinstance``) and class names (matched against the class and its
bases, by name or by module-qualified name). Embeddings (``nn.Embedding``) are never pruned.

Weight layout: PyTorch stores a weight as (out, in, *kernel); transformers' ``Conv1D`` stores
(in, out) (:func:`stores_transposed`, the one test of it). Everything that depends on which
dimension is the input (N:M groups, ST-3's per-output-channel rescale, the packed N:M export, an
output width) reads the weight through :func:`out_in`, the (out, in) view.

Default exclusions (``exclude`` unset), each listed with its reason by :func:`choose_layers` (and so
by ``Sparsifier.excluded``, ``sparsity_report`` and ``sparsetrain report``). The README's table:

| left dense | because | e.g. |
|---|---|---|
| embeddings (``nn.Embedding``) | never pruned, whatever ``types`` and ``exclude`` say | BERT's, GPT-2's, Llama's token embeddings |
| what a module of the model declares in a ``default_exclude`` tuple of glob patterns (relative to that module) | the model's author says so | our ViTs' patch embedding and head |
| the input embedding a model names with ``get_input_embeddings()``, and every layer inside it | transformers models: the tokens' or the image's embedding | ViT's ``embeddings.patch_embeddings.projection`` |
| the output embedding a model names with ``get_output_embeddings()`` | transformers models: the language-model head | GPT-2's and Llama's ``lm_head`` |
| a layer whose weight another module holds without pruning it | a tied weight is pruned everywhere or nowhere | ``lm_head`` tied to GPT-2's or OPT's ``wte`` |
| a layer with fewer than ``min_size`` weights | the seed's ``pthres`` | |

An image model's patch embedding is found as its input embedding, not by tracing: a CNN's first
convolution is pruned. Classification heads are pruned (``get_output_embeddings()`` of a classifier
is None), as the first and last layers of a CNN are; ``exclude=["classifier"]`` keeps one dense.
An ``exclude`` given replaces the defaults (``exclude=[]`` prunes every layer of a prunable type);
each of its patterns must match a module, and a weight tied to a module left dense is then
refused, never pruned silently.
"""

from __future__ import annotations

import fnmatch
import glob
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor, nn
from torch.nn.utils import parametrize

from .messages import shown

LayerType = type[nn.Module] | str
PRUNABLE_TYPES: tuple[LayerType, ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, "Conv1D")
EMBEDDING = "an embedding (never pruned)"


def stores_transposed(module: nn.Module) -> bool:
    """Whether ``module`` stores its weight as (in, out): transformers' ``Conv1D`` (GPT, GPT-2),
    recognised by its class's name and package."""
    return any(c.__name__ == "Conv1D" and c.__module__.split(".")[0] == "transformers" for c in type(module).__mro__)


def out_in(tensor: Tensor, transposed: bool) -> Tensor:
    """A weight, or a tensor shaped like it, as (out, in, *kernel): the transposed view of one stored
    (in, out), else the tensor itself. Its own inverse: ``out_in(out_in(t, f), f)`` is ``t``'s layout."""
    return tensor.t() if transposed else tensor


def is_sharded(w: Tensor) -> bool:
    """Whether ``w`` is a DTensor (FSDP2 has sharded it). ``torch.distributed.tensor`` is not imported
    for this (it takes most of a second): until something has imported it, no tensor is a DTensor."""
    dtensor = sys.modules.get("torch.distributed.tensor")
    return dtensor is not None and isinstance(w, dtensor.DTensor)


def stored_weight(module: nn.Module) -> Tensor | None:
    """The tensor ``module`` stores as its weight (the original under a parametrization, without
    computing it), None if it has none."""
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight.original
    weight = getattr(module, "weight", None)
    return weight if isinstance(weight, Tensor) else None


def validate_types(types: object) -> tuple[LayerType, ...]:
    """``types`` as a tuple after checking it is a non-empty list of module classes or class names."""
    if (
        not isinstance(types, (list, tuple))
        or not types
        or not all(isinstance(t, str) and t or isinstance(t, type) and issubclass(t, nn.Module) for t in types)
    ):
        raise ValueError(f"types={shown(types)} is not allowed; allowed: a list of layer classes or class names, "
                         "e.g. ['Linear', 'Conv1D'].")
    return tuple(types)


def is_of_type(module: nn.Module, types: Sequence[LayerType]) -> bool:
    """Whether ``module`` is an instance of a class in ``types``, or of a class (or base) whose name
    or module-qualified name is a string in ``types``."""
    names = {name for c in type(module).__mro__ for name in (c.__name__, f"{c.__module__}.{c.__qualname__}")}
    return any(isinstance(module, t) if isinstance(t, type) else t in names for t in types)


def _prunable(module: nn.Module, types: Sequence[LayerType]) -> bool:
    return not isinstance(module, nn.Embedding) and is_of_type(module, types) and stored_weight(module) is not None


def find_prunable(
    model: nn.Module,
    types: Sequence[LayerType] = PRUNABLE_TYPES,
    exclude: Sequence[str] = (),
    min_size: int = 0,
) -> list[tuple[str, nn.Module]]:
    """(name, module) of every layer of one of ``types`` whose weight has at least ``min_size``
    entries and whose name matches none of the glob patterns in ``exclude`` (no defaults here:
    :func:`choose_layers` applies them)."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if _prunable(module, types)
        and stored_weight(module).numel() >= min_size
        and not any(fnmatch.fnmatchcase(name, pattern) for pattern in exclude)
    ]


@dataclass(frozen=True)
class LayerChoice:
    """The layers to prune, and the modules left dense with why: layers of a prunable type that
    were excluded, tied or too small, and embeddings; both in module order."""

    layers: tuple[tuple[str, nn.Module], ...]
    dense: tuple[tuple[str, str], ...]


def choose_layers(
    model: nn.Module,
    types: Sequence[LayerType] = PRUNABLE_TYPES,
    exclude: Sequence[str] | None = None,
    min_size: int = 0,
) -> LayerChoice:
    """The layers of ``types`` to prune in ``model`` (see the module docstring): ``exclude`` None
    applies the default exclusions, and a layer whose weight another module holds without pruning
    it stays dense; ``exclude`` given replaces them, a pattern matching no module is a ValueError
    naming it, and so is a weight tied to a module left dense (naming both)."""
    rules = _default_rules(model) if exclude is None else _exclude_rules(model, exclude)
    layers: list[tuple[str, nn.Module]] = []
    dense: dict[str, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding):
            dense[name] = EMBEDDING
        elif _prunable(module, types):
            size = stored_weight(module).numel()
            reason = next((why for pattern, why in rules if fnmatch.fnmatchcase(name, pattern)), None)
            if reason is None and size < min_size:
                reason = f"{size:,} weights, fewer than min_size={min_size:,}"
            if reason is None:
                layers.append((name, module))
            else:
                dense[name] = reason
    chosen = {id(module) for _, module in layers}
    holders: dict[int, tuple[str, nn.Module]] = {}  # weight -> a module holding it, not pruned
    for name, module in model.named_modules(remove_duplicate=False):
        weight = stored_weight(module)
        if weight is not None and id(module) not in chosen:
            holders.setdefault(id(weight), (name, module))
    for name, module in layers:
        holder = holders.get(id(stored_weight(module)))
        if holder is None:
            continue
        held_by = f"{holder[0]!r} ({type(holder[1]).__name__})"
        if exclude is not None:
            raise ValueError(f"layer {held_by} shares a weight with prunable layer {name!r} but is not pruned "
                             f"itself; allowed: exclude {name!r} too, or leave exclude unset (a layer tied to "
                             "one left dense then stays dense).")
        dense[name] = f"weight tied to {held_by}, which is not pruned"
    order = {name: index for index, (name, _) in enumerate(model.named_modules())}
    return LayerChoice(tuple((name, module) for name, module in layers if name not in dense),
                       tuple(sorted(dense.items(), key=lambda item: order[item[0]])))


def _default_rules(model: nn.Module) -> list[tuple[str, str]]:
    """(glob pattern, reason) of every default exclusion but ties and size: the patterns modules
    declare in ``default_exclude``, and the input and output embeddings transformers models name."""
    rules = [
        (f"{owner}.{pattern}" if owner else pattern, f"declared dense by {type(module).__name__}.default_exclude")
        for owner, module in model.named_modules()
        for pattern in getattr(module, "default_exclude", ())
    ]
    names = {id(module): name for name, module in model.named_modules()}
    for module in model.modules():
        for getter, kind in (("get_input_embeddings", "input"), ("get_output_embeddings", "output")):
            embedding = _named_embedding(module, getter)
            if embedding is not None and names.get(id(embedding)):
                name = glob.escape(names[id(embedding)])
                rules += [(name, f"the {kind} embedding ({getter}())"),
                          (f"{name}.*", f"inside the {kind} embedding {names[id(embedding)]!r} ({getter}())")]
    return rules


def _named_embedding(module: nn.Module, getter: str) -> nn.Module | None:
    """The module ``module.<getter>()`` returns (transformers' embedding getters), None without one."""
    method = getattr(module, getter, None)
    if not callable(method):
        return None
    try:
        embedding = method()
    except NotImplementedError:  # transformers: a model without such an embedding (e.g. ResNet)
        return None
    return embedding if isinstance(embedding, nn.Module) else None


def _exclude_rules(model: nn.Module, exclude: Sequence[str]) -> list[tuple[str, str]]:
    """(pattern, reason) of each pattern of an ``exclude`` given, after checking each matches a module."""
    names = [name for name, _ in model.named_modules()]
    for pattern in exclude:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            layers = [name for name, module in model.named_modules() if _prunable(module, PRUNABLE_TYPES)]
            raise ValueError(f"exclude pattern {pattern!r} matches no module of {type(model).__name__}; allowed: "
                             f"glob patterns on module names, e.g. of its layers {shown(layers[:3])}.")
    return [(pattern, f"matches exclude pattern {pattern!r}") for pattern in exclude]


def transposed_weights(model: nn.Module) -> frozenset[str]:
    """The state-dict keys of the weights ``model`` stores as (in, out) (:func:`stores_transposed`)."""
    return frozenset(f"{name}.weight" if name else "weight" for name, module in model.named_modules()
                     if stores_transposed(module))
