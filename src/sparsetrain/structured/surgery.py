"""Channel surgery: remove output channels for real, with everything coupled to them.

Coupling is found by Torch-Pruning's ``DependencyGraph`` (traced once with example inputs),
never by a tracer of our own: removing output channel c of a convolution also removes
channel c of the batch norms that normalise it, the input channel of every layer that reads
it (through ReLUs, pools, flattens and depthwise convolutions), the same channel of every
other layer writing into the same residual stream, and the matching slice of every
``torch.cat`` (DenseNet) it flows into.

A *channel group* is one such set of coupled channels: its ``layers`` write them, its
``readers`` read them, and one ``root`` layer indexes them. Channels are always named by the
root's output-channel index.

Supported layers: Conv1d/2d/3d that are regular (groups = 1) or depthwise
(groups = in_channels = out_channels), Linear, transformers' ``Conv1D`` (GPT-2's Linear layers,
weight stored (in, out); cut by a pruner of our own, found by class name) and BatchNorm;
parameter-free operations in between are channel-wise. A group touching any other layer with
parameters (a grouped convolution, GroupNorm, LayerNorm, an embedding, ...) is not pruned, and
asking to is a ``ValueError`` naming the layer. Nor is a group whose channels meet an operation
that mixes features with one another (:data:`MIXING_OPERATIONS`: attention, batched matrix
products, softmax, norms over features): Torch-Pruning takes such an operation for an element-wise one, and cutting
one channel of a query, key or value projection would cut part of a head (the model then no
longer runs, or computes something else). Those groups are found before Torch-Pruning follows
them (its search does not end on the rotary embedding of Llama's queries and keys), so
attention is never cut, while the hidden units of a transformer's MLP (BERT's and ViT's
intermediate layer, Llama's SwiGLU ``gate_proj``/``up_proj`` -> ``down_proj``, GPT-2's
``c_fc`` -> ``c_proj``) are ordinary groups. A compact model is saved as plain weights plus
:func:`layer_shapes`, and rebuilt with :func:`with_shapes` (a registered model:
:func:`sparsetrain.models.rebuild`), never by unpickling modules; the config of a Hugging Face
model is kept describing its layers after every cut (:func:`record_shapes_`), so that
``save_pretrained`` writes what rebuilds it.

Example inputs are a tensor (``model(x)``) or a mapping of named tensors (``model(**x)``, e.g.
``input_ids`` and ``attention_mask``); the model may return its logits or an object holding
them (:func:`~sparsetrain.calls.logits_of`), which the tracing follows.
"""

from __future__ import annotations

import copy
import inspect
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch_pruning as tp
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch_pruning.pruner.function import BasePruningFunc

from ..calls import ExampleInputs, call_model, logits_of, map_inputs
from ..measure import output_width
from ..modes import eval_mode
from ..prunable import stores_transposed

SUPPORTED_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, _BatchNorm)
MIXING_OPERATIONS: tuple[str, ...] = ("attention", "bmm", "softmax", "einsum", "layernorm", "groupnorm", "rmsnorm")
"""Substrings of the (lower-cased) autograd node names of operations that mix the features of
one position with one another: scaled dot-product attention (every kernel), batched matrix
products (``torch.matmul`` of activations), softmax, einsum, and the functional layer, group and
RMS norms (those with parameters are refused as layers anyway)."""



@dataclass(frozen=True)
class ChannelGroup:
    """A set of coupled prunable channels, indexed by the output channels of ``root``.

    ``layers``: the Conv/Linear layers writing these channels (all convolutions adding into one
    residual stream, or one layer and the depthwise convolutions passing its channels on);
    ``readers``: the regular (not depthwise) Conv/Linear layers reading them as inputs;
    ``channels``: how many there are. Pass ``root`` and channel indices to :func:`remove_channels`.
    """

    root: str
    layers: tuple[str, ...]
    readers: tuple[str, ...]
    channels: int


@dataclass(frozen=True)
class Coupling:
    """A channel group with its index maps, as traced (internal to :mod:`sparsetrain.structured`).

    ``outputs[name]`` lists (output channel of layer ``name``, group channel) pairs and
    ``inputs[name]`` (input feature of reader ``name``, group channel) pairs (depthwise
    convolutions are only in ``outputs``). ``is_output`` marks the network's output (no
    Conv/Linear reads it); ``unsupported`` names what surgery cannot cut (``"layer 'ln'"``, or
    the operation mixing the channels).
    """

    root: str
    channels: int
    outputs: Mapping[str, tuple[tuple[int, int], ...]]
    inputs: Mapping[str, tuple[tuple[int, int], ...]]
    is_output: bool
    unsupported: str | None

    def group(self) -> ChannelGroup:
        return ChannelGroup(self.root, tuple(self.outputs), tuple(self.inputs), self.channels)


def is_layer(module: object) -> bool:
    """True for the layers channels are gated and cut at: Conv1d/2d/3d, Linear, transformers' Conv1D
    (``module`` may be anything the traced graph holds: operations, parameters)."""
    return isinstance(module, (_ConvNd, nn.Linear)) or isinstance(module, nn.Module) and stores_transposed(module)


def _call_without_cache(model: nn.Module, example_inputs: ExampleInputs) -> Any:
    """:func:`call_model` with ``use_cache=False`` where the model's forward takes it (a
    transformers decoder): Torch-Pruning misreads the key/value cache's concatenation."""
    if "use_cache" not in inspect.signature(model.forward).parameters:
        return call_model(model, example_inputs)
    if isinstance(example_inputs, Mapping):
        return model(**{"use_cache": False, **example_inputs})
    return model(example_inputs, use_cache=False)


def is_depthwise(module: nn.Module) -> bool:
    """True for a convolution with groups = in_channels = out_channels > 1."""
    return isinstance(module, _ConvNd) and module.groups > 1 and module.groups == module.in_channels == module.out_channels


def _unsupported(module: nn.Module) -> bool:
    """True for a layer with parameters or buffers that surgery cannot cut."""
    if stores_transposed(module):
        return False
    if isinstance(module, _ConvNd):
        return not isinstance(module, SUPPORTED_TYPES) or module.transposed or (module.groups > 1 and not is_depthwise(module))
    if isinstance(module, SUPPORTED_TYPES):
        return False
    return any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False))


class _TransposedLinearPruner(BasePruningFunc):
    """Torch-Pruning's cuts of transformers' ``Conv1D``: a Linear layer whose weight is stored
    (in, out) and whose forward reads its width from ``nf``."""

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        keep = sorted(set(range(layer.weight.shape[1])) - set(idxs))
        layer.weight = self._prune_parameter_and_grad(layer.weight, keep, 1)
        if layer.bias is not None:
            layer.bias = self._prune_parameter_and_grad(layer.bias, keep, 0)
        layer.nf = len(keep)
        return layer

    def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        keep = sorted(set(range(layer.weight.shape[0])) - set(idxs))
        layer.weight = self._prune_parameter_and_grad(layer.weight, keep, 0)
        layer.nx = len(keep)
        return layer

    def get_out_channels(self, layer: nn.Module) -> int:
        return layer.weight.shape[1]

    def get_in_channels(self, layer: nn.Module) -> int:
        return layer.weight.shape[0]


def _out_fn(graph: tp.DependencyGraph, module: nn.Module) -> Any:
    return graph.get_pruner_of_module(module).prune_out_channels


def _is_cut_point(node: Any) -> bool:
    """A layer whose input and output channels are independent (a regular Conv/Linear/Conv1D)."""
    return is_layer(node.module) and not is_depthwise(node.module)


def _mixed_writers(graph: tp.DependencyGraph) -> dict[nn.Module, str]:
    """Each layer whose output channels meet a :data:`MIXING_OPERATIONS` operation before the
    next layers read them, with that operation's name. The search walks the traced graph both
    ways from a layer's output, through everything but regular layers, so it covers every
    layer writing into the same channels (the query, key and value projections together)."""
    mixed: dict[nn.Module, str] = {}
    done: set[Any] = set()
    for start in graph.module2node.values():
        if not _is_cut_point(start) or start in done:
            continue
        writers, seen, mixing = {start}, set(), None
        stack = list(start.outputs)
        while stack:
            node = stack.pop()
            if _is_cut_point(node) or node in seen:
                continue  # a reader (reached from its input side), or done
            seen.add(node)
            name = node.grad_fn.name() if hasattr(node.grad_fn, "name") else ""
            if mixing is None and any(op in name.lower() for op in MIXING_OPERATIONS):
                mixing = name
            stack.extend(node.outputs)
            for source in node.inputs:
                if not _is_cut_point(source):
                    stack.append(source)
                elif source not in writers:  # another writer: its output side only
                    writers.add(source)
                    stack.extend(source.outputs)
        done |= writers
        if mixing is not None:
            mixed.update((writer.module, mixing) for writer in writers)
    return mixed


def trace_couplings(model: nn.Module, example_inputs: ExampleInputs) -> tuple[tp.DependencyGraph, list[Coupling]]:
    """Build the dependency graph of ``model`` (in eval mode; training flags restored) and
    describe every group of coupled Conv/Linear/Conv1D output channels by module names."""
    pruners = {type(m): _TransposedLinearPruner() for m in model.modules() if stores_transposed(m)}
    with torch.enable_grad(), eval_mode(model):
        graph = tp.DependencyGraph().build_dependency(
            model, example_inputs, forward_fn=_call_without_cache, output_transform=logits_of, customized_pruners=pruners,
            verbose=False)
    names = {module: name for name, module in model.named_modules()}
    order = {name: index for index, name in enumerate(names.values())}
    mixed = _mixed_writers(graph)
    couplings = []
    visited: set[nn.Module] = set()
    for module in list(graph.module2node):
        if not is_layer(module) or module in visited:
            continue
        if module in mixed:
            visited.add(module)
            width = output_width(module)
            couplings.append(Coupling(names[module], width, {names[module]: tuple((i, i) for i in range(width))}, {},
                                      is_output=False, unsupported=f"operation {mixed[module]!r}"))
            continue
        group = graph.get_pruning_group(module, _out_fn(graph, module), list(range(output_width(module))))
        visited.update(item.dep.target.module for item in group if graph.is_out_channel_pruning_fn(item.dep.handler))
        outputs: dict[str, list[tuple[int, int]]] = {}
        inputs: dict[str, list[tuple[int, int]]] = {}
        unsupported = None
        for item in group:
            module, handler = item.dep.target.module, item.dep.handler
            name = names.get(module) if isinstance(module, nn.Module) else None
            if isinstance(module, nn.Parameter):
                unsupported = unsupported or f"layer {graph._param_to_name.get(module, 'an unwrapped parameter')!r}"
                continue
            if name is None:
                continue  # a parameter-free operation (add, cat, flatten, ...)
            if _unsupported(module):
                unsupported = unsupported or f"layer {name!r}"
            if not is_layer(module):
                continue
            pairs = list(zip(item.idxs, item.root_idxs))
            if graph.is_out_channel_pruning_fn(handler):
                outputs.setdefault(name, []).extend(pairs)
            elif graph.is_in_channel_pruning_fn(handler) and not is_depthwise(module):
                inputs.setdefault(name, []).extend(pairs)
        channels = len(group[0].idxs)
        partial = [n for n, pairs in inputs.items() if {root for _, root in pairs} != set(range(channels))]
        unsupported = unsupported or next((f"layer {n!r}" for n in partial), None)  # channels re-viewed on the way
        root = _root(model, outputs, channels, names[group[0].dep.target.module])
        couplings.append(Coupling(
            root=root,
            channels=channels,
            outputs={n: tuple(sorted(set(p))) for n, p in sorted(outputs.items(), key=lambda kv: order[kv[0]])},
            inputs={n: tuple(sorted(set(p))) for n, p in sorted(inputs.items(), key=lambda kv: order[kv[0]])},
            is_output=not inputs,
            unsupported=unsupported,
        ))
    return graph, couplings


def _root(model: nn.Module, outputs: Mapping[str, list[tuple[int, int]]], channels: int, traced_root: str) -> str:
    """The first regular layer (in module order) whose output channels are the group's, one to one;
    else the layer Torch-Pruning traced the group from."""
    identity = {(i, i) for i in range(channels)}
    for name, module in model.named_modules():
        if name in outputs and set(outputs[name]) == identity and not is_depthwise(module):
            return name
    return traced_root


def channel_groups(model: nn.Module, example_inputs: ExampleInputs) -> list[ChannelGroup]:
    """Every group of coupled prunable output channels of ``model``, in traced order.

    The network's output layer (the classifier) and groups touching a layer surgery cannot cut
    are left out. ``model`` is traced in eval mode with ``example_inputs`` and left unchanged.
    """
    _, couplings = trace_couplings(copy.deepcopy(model), example_inputs)
    return [c.group() for c in couplings if not c.is_output and c.unsupported is None]


def remove_channels(model: nn.Module, drop: Mapping[str, Sequence[int]], example_inputs: ExampleInputs) -> nn.Module:
    """A physically smaller deep copy of ``model`` without the given output channels; ``model``
    is never modified (see :func:`remove_channels_`)."""
    compact = copy.deepcopy(model)
    _cut(compact, drop, example_inputs, type(model).__name__)
    return compact


def remove_channels_(
    model: nn.Module,
    drop: Mapping[str, Sequence[int]],
    example_inputs: ExampleInputs,
    optimizer: torch.optim.Optimizer | None = None,
) -> nn.Module:
    """Remove the given output channels from ``model`` in place and return it.

    ``drop`` maps a Conv/Linear name (as in ``model.named_modules()``) to output-channel indices
    of that layer; each channel is removed from its whole group (batch norms, readers'
    inputs, residual partners, depthwise convolutions, concatenations). Each resized parameter
    is a new Parameter; ``optimizer`` (over ``model.parameters()``) is re-pointed at it, in its
    param group's place, with its per-parameter state (momentum, Adam moments: any tensor shaped
    like the parameter) sliced to the survivors. Bad input raises ``ValueError`` naming the layer,
    before anything is cut.
    """
    survivors = surviving_indices(model, drop, example_inputs)
    params = dict(model.named_parameters())
    _cut(model, drop, example_inputs, type(model).__name__)
    for name, old in params.items():
        new = model.get_parameter(name)
        if new is not old:
            _repoint(optimizer, old, new, partial(_gather, shape=old.shape, survivors=survivors[name], new_shape=new.shape))
    return model


def _repoint(optimizer: torch.optim.Optimizer | None, old: Tensor, new: Tensor, convert: Any = None) -> None:
    """Put ``new`` where ``old`` was in the optimizer's param groups, its state converted by
    ``convert`` (dropped without one)."""
    if optimizer is None:
        return
    for group in optimizer.param_groups:
        group["params"] = [new if p is old else p for p in group["params"]]
    state = optimizer.state.pop(old, None)
    if state is not None and convert is not None:
        optimizer.state[new] = {key: convert(value) for key, value in state.items()}


def surviving_indices(
    model: nn.Module, drop: Mapping[str, Sequence[int]], example_inputs: ExampleInputs
) -> dict[str, Tensor]:
    """For each parameter of ``remove_channels(model, drop, ...)``, by name, the flat indices
    into the original parameter of its surviving entries (found by cutting a copy whose
    parameters hold their own flat indices, in float64 so indices stay exact; floating-point
    inputs follow, integer inputs such as token ids stay as they are)."""
    tagged = copy.deepcopy(model).double()
    with torch.no_grad():
        for param in tagged.parameters():
            param.copy_(torch.arange(param.numel(), dtype=torch.float64, device=param.device).view_as(param))
    inputs = map_inputs(example_inputs, lambda x: x.double() if x.is_floating_point() else x)
    cut = remove_channels(tagged, drop, inputs)
    return {name: param.detach().flatten().long() for name, param in cut.named_parameters()}


def _gather(value: Any, shape: torch.Size, survivors: Tensor, new_shape: torch.Size) -> Any:
    """A parameter-shaped state tensor at the surviving indices; anything else as it is."""
    if isinstance(value, Tensor) and value.shape == shape:
        return value.flatten()[survivors.to(value.device)].view(new_shape).clone()
    return value


def _cut(model: nn.Module, drop: Mapping[str, Sequence[int]], example_inputs: ExampleInputs, model_name: str) -> None:
    """Cut ``model`` in place with Torch-Pruning (new Parameter objects for the cut layers)."""
    modules = dict(model.named_modules())
    requested = {name: _indices(modules, name, indices, model_name) for name, indices in drop.items()}
    graph, couplings = trace_couplings(model, example_inputs)
    writers = {name: c for c in couplings for name in c.outputs}
    plan: dict[str, tuple[Coupling, set[int]]] = {}
    for name, indices in requested.items():
        coupling = writers.get(name)
        if coupling is None:
            raise ValueError(f"layer {name!r} is not reached by the forward pass on example_inputs; allowed: layers the model uses.")
        if coupling.is_output:
            raise ValueError(f"layer {name!r} is the network's output layer; allowed: inner layers (the classifier keeps its outputs).")
        if coupling.unsupported is not None:
            raise ValueError(
                f"channels of layer {name!r} are coupled to {coupling.unsupported}, which surgery cannot cut; "
                "allowed: groups of regular or depthwise convolutions, linear layers and batch norms joined by "
                "channel-wise operations."
            )
        to_group = dict(coupling.outputs[name])
        _, chosen = plan.setdefault(coupling.root, (coupling, set()))
        chosen.update(to_group[i] for i in indices)
    for root, (coupling, chosen) in plan.items():
        if len(chosen) >= coupling.channels:
            raise ValueError(
                f"removing {len(chosen)} of the {coupling.channels} channels of layer {root!r} (with its coupled layers "
                f"{', '.join(coupling.outputs)}) would leave none; allowed: at most {coupling.channels - 1}."
            )
    for root, (_, chosen) in plan.items():
        if chosen:
            module = modules[root]
            graph.get_pruning_group(module, _out_fn(graph, module), sorted(chosen)).prune(record_history=False)
    record_shapes_(model)


def _indices(modules: Mapping[str, nn.Module], name: str, indices: Sequence[int], model_name: str) -> list[int]:
    """Check that ``name`` is a Conv/Linear layer and ``indices`` its output channels; return them as ints."""
    module = modules.get(name)
    if module is None:
        raise ValueError(f"unknown layer {name!r} in drop; allowed: names of Conv/Linear layers of {model_name}.")
    if not is_layer(module):
        raise ValueError(f"layer {name!r} is a {type(module).__name__}; allowed: Conv or Linear layers (coupled batch norms follow them).")
    size = output_width(module)
    checked = []
    for index in indices:
        try:
            value = operator.index(index) if not isinstance(index, bool) else None
        except TypeError:
            value = None
        if value is None or not 0 <= value < size:
            raise ValueError(f"channel index {index!r} of layer {name!r} is out of range; allowed: integers 0 to {size - 1}.")
        checked.append(value)
    return checked


def _sizes(module: nn.Module) -> dict[str, int] | None:
    """The constructor sizes of a Conv (in_channels, out_channels, groups), BatchNorm
    (num_features), Linear (in_features, out_features) or transformers' Conv1D (nf outputs, nx
    inputs) layer; None for any other module."""
    if stores_transposed(module):
        return {"nf": module.nf, "nx": module.nx}
    if isinstance(module, _ConvNd):
        return {"in_channels": module.in_channels, "out_channels": module.out_channels, "groups": module.groups}
    if isinstance(module, _BatchNorm):
        return {"num_features": module.num_features}
    if isinstance(module, nn.Linear):
        return {"in_features": module.in_features, "out_features": module.out_features}
    return None


def layer_shapes(model: nn.Module) -> dict[str, dict[str, int]]:
    """The constructor sizes of every Conv, BatchNorm, Linear and Conv1D layer, by module name (JSON-ready)."""
    return {name: sizes for name, module in model.named_modules() if (sizes := _sizes(module)) is not None}


def with_shapes(model: nn.Module, shapes: Mapping[str, Mapping[str, int]] | None, what: str) -> nn.Module:
    """``model`` with each layer in ``shapes`` (as :func:`layer_shapes` wrote them) replaced, in
    place, by a fresh one of the saved sizes (other hyper-parameters kept), so a compact model's
    state_dict loads strictly; ``what`` names the model in errors (e.g. ``"model 'resnet20'"``).
    Without shapes (None or empty: no channel was removed) it is ``model`` unchanged.
    :func:`sparsetrain.models.rebuild` applies it to a registered model."""
    modules = dict(model.named_modules())
    for layer, sizes in (shapes or {}).items():
        old = modules.get(layer)
        if old is None or _sizes(old) is None:
            raise ValueError(f"shapes name layer {layer!r}, which is not a Conv, BatchNorm or Linear layer of {what}.")
        new = _resized(old, dict(sizes), layer)
        parent, _, attr = layer.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, new)
    return model


def resize_(
    model: nn.Module, shapes: Mapping[str, Mapping[str, int]], optimizer: torch.optim.Optimizer | None = None
) -> nn.Module:
    """Give ``model``'s layers the sizes in ``shapes`` (as :func:`layer_shapes` wrote them), in
    place: resized parameters and buffers become zeros of their new shape, to be overwritten by
    a state dict of the compact model; ``optimizer`` is re-pointed at the new parameters (their
    state dropped)."""
    modules = dict(model.named_modules())
    for layer, sizes in shapes.items():
        old = modules.get(layer)
        if old is None or _sizes(old) is None:
            raise ValueError(f"shapes name layer {layer!r}, which is not a Conv, BatchNorm or Linear layer of {type(model).__name__}.")
        fresh = _resized(old, dict(sizes), layer)
        for attr in _sizes(old):
            setattr(old, attr, getattr(fresh, attr))
        for name, tensor in [*fresh.named_parameters(recurse=False), *fresh.named_buffers(recurse=False)]:
            current = getattr(old, name)
            if current is None or current.shape == tensor.shape:
                continue
            zeros = torch.zeros(tensor.shape, dtype=current.dtype, device=current.device)
            if isinstance(current, nn.Parameter):
                new = nn.Parameter(zeros, current.requires_grad)
                setattr(old, name, new)
                _repoint(optimizer, current, new)
            else:
                setattr(old, name, zeros)
    record_shapes_(model)
    return model


def _resized(old: nn.Module, sizes: dict[str, int], layer: str) -> nn.Module:
    keys = set(_sizes(old))
    if set(sizes) != keys or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in sizes.values()):
        raise ValueError(f"shape {sizes!r} of layer {layer!r} is not allowed; allowed: positive integers for exactly {sorted(keys)}.")
    if isinstance(old, _ConvNd):
        return type(old)(sizes["in_channels"], sizes["out_channels"], old.kernel_size, stride=old.stride, padding=old.padding,
                         dilation=old.dilation, groups=sizes["groups"], bias=old.bias is not None, padding_mode=old.padding_mode)
    if isinstance(old, _BatchNorm):
        return type(old)(sizes["num_features"], eps=old.eps, momentum=old.momentum, affine=old.affine,
                         track_running_stats=old.track_running_stats)
    if stores_transposed(old):
        return type(old)(sizes["nf"], sizes["nx"])
    return nn.Linear(sizes["in_features"], sizes["out_features"], bias=old.bias is not None)


CONFIG_SHAPES = "sparsetrain_shapes"
"""The attribute of a Hugging Face model's config (saved in its config.json) that holds the
:func:`layer_shapes` of the layers whose sizes differ from those the config builds."""
WIDTH_KEYS: tuple[str, ...] = ("intermediate_size", "n_inner")
"""Config keys of the one MLP width of every layer (BERT's, ViT's, Llama's; GPT-2's)."""


def record_shapes_(model: nn.Module) -> None:
    """Make the config of each Hugging Face model in ``model`` describe its layers' sizes again,
    in place, so that ``save_pretrained`` writes what rebuilds it.

    If the layers differ from those the config builds by one width only, and a
    :data:`WIDTH_KEYS` key set to it builds them exactly (every MLP kept the same number of
    units), that key is set and plain ``from_pretrained`` loads the model. Else
    ``config.sparsetrain_shapes`` records the :func:`layer_shapes` of every layer whose sizes
    differ (removed when none does), and ``sparsetrain.load_compact`` rebuilds the model from
    them. The layers a config builds are read from the model's class built from (a copy of) it on
    the meta device: no memory, no random numbers; a class that cannot be built there has every
    layer's sizes recorded. A Hugging Face model is a module with a ``config`` and
    ``save_pretrained``; where they nest, the outermost one.
    """
    inside: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in inside):
            continue
        if callable(getattr(module, "save_pretrained", None)) and hasattr(getattr(module, "config", None), "to_json_string"):
            inside.append(f"{name}." if name else "")
            _record_shapes(module)


def _record_shapes(model: nn.Module) -> None:
    """:func:`record_shapes_` for one Hugging Face model."""
    config, shapes = model.config, layer_shapes(model)
    built = _built_shapes(model, config) or {}
    differ = {name: sizes for name, sizes in shapes.items() if built.get(name) != sizes}
    widths = {size for name, sizes in differ.items() for key, size in sizes.items() if built.get(name, {}).get(key) != size}
    if len(widths) == 1:
        (width,) = widths
        for key in (key for key in WIDTH_KEYS if hasattr(config, key)):
            trial = copy.deepcopy(config)
            setattr(trial, key, width)
            if _built_shapes(model, trial) == shapes:
                setattr(config, key, width)
                differ = {}
                break
    if differ:
        setattr(config, CONFIG_SHAPES, differ)
    elif hasattr(config, CONFIG_SHAPES):
        delattr(config, CONFIG_SHAPES)


def _built_shapes(model: nn.Module, config: Any) -> dict[str, dict[str, int]] | None:
    """:func:`layer_shapes` of ``type(model)(config)``, built on the meta device from a copy of
    ``config``; None if it cannot be built there."""
    try:
        with torch.device("meta"):
            built = type(model)(copy.deepcopy(config))
    except Exception:  # whatever stops the class from being built on the meta device (.item() in __init__)
        return None
    return layer_shapes(built)

