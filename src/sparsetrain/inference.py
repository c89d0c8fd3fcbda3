"""Load a checkpoint written mid-training into a plain model for inference.

A checkpoint taken while a method is attached holds the model as the method changed it
(parametrized weights, ``...parametrizations.weight.original``; GDP's gates; FRS's widths), so it
loads into neither the plain model class nor ``LightningModule.load_from_checkpoint``.
:func:`load_finalized` attaches the method to a fresh model, loads the method's state and then
the model's (the order of resuming, :mod:`sparsetrain.methods.protocol`), and finalizes:

    model = sparsetrain.load_finalized(Classifier(), "checkpoints/last.ckpt")          # Lightning
    model = sparsetrain.load_finalized(BertForSequenceClassification(config), "out/checkpoint-500")
    model = sparsetrain.load_finalized(resnet, {"model": model_state, "method": method_state},
                                       example_inputs=torch.zeros(2, 3, 32, 32))     # GDP, own loop

The checkpoint is one of

- a Lightning ``.ckpt`` written during ``Trainer.fit`` with the ``Sparsify`` callback: the model
  under ``state_dict``, the method's state under the callback's entry of ``callbacks``;
- a Hugging Face ``Trainer`` checkpoint folder written with ``SparsifyCallback``: the model in
  ``model.safetensors`` (or the shards ``model.safetensors.index.json`` lists; entries that
  ``save_pretrained`` renamed, as transformers 5 does a ViT's, are given their names back), the
  method's state in :data:`HF_STATE_FILE` beside it;
- a mapping ``{"model": model.state_dict(), "method": method.state_dict()}``, or a file
  ``torch.save`` wrote it to.

Files are read with ``torch.load(weights_only=True)`` and safetensors: nothing is unpickled.

:func:`load_compact` loads a Hugging Face model that channel pruning made narrower from the folder
``save_pretrained`` wrote. GDP's and FRS's surgery leaves each layer with its own width (one MLP
keeps 90 units, the next 70), which a transformers config (one ``intermediate_size``) cannot state,
so ``from_pretrained`` refuses the weights. The surgery keeps the config describing the model
(:func:`~sparsetrain.structured.surgery.record_shapes_`): where every MLP kept the same width the
config's width says so and plain ``from_pretrained`` loads it; otherwise ``config.sparsetrain_shapes``
holds the sizes of the layers that differ from what the config builds:

    compact = method.finalize()
    compact.save_pretrained("out")
    model = sparsetrain.load_compact(BertForSequenceClassification, "out")
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .messages import shown
from .methods import create
from .structured.surgery import CONFIG_SHAPES, resize_

HF_STATE_FILE = "sparsify_state.pt"  # written by sparsetrain.integrations.hf.SparsifyCallback
HF_WEIGHTS, HF_INDEX, HF_CONFIG = "model.safetensors", "model.safetensors.index.json", "config.json"
LIGHTNING_CALLBACK = "Sparsify"  # the callback's state key starts with its class name
ALLOWED = ("a Lightning .ckpt written with the Sparsify callback, a Hugging Face checkpoint folder written "
           "with SparsifyCallback, or a mapping (or torch.save file) of {'model': ..., 'method': ...}")


def load_finalized(
    model: nn.Module,
    checkpoint: str | Path | Mapping[str, Any],
    method: str | None = None,
    *,
    total_steps: int | None = None,
    example_inputs: Tensor | Mapping[str, Tensor] | None = None,
    **options: Any,
) -> nn.Module:
    """Attach ``method`` to the freshly built ``model``, load the method's and the model's states
    from ``checkpoint`` and return ``finalize()``'s plain model (for GDP and FRS the compact one).

    ``model`` is a new instance of what the method sparsified (the LightningModule, the Trainer's
    model); ``method`` defaults to the one the checkpoint names; ``options`` are the method's, as
    given when training (the saved state refuses other settings, naming the first that differs);
    ``total_steps`` defaults to the training length the state records; ``example_inputs`` is
    needed by the methods that trace the model (gdp, frs).
    """
    model_state, method_state = _read_checkpoint(checkpoint, method)
    name = method or method_state.get("method")
    settings = method_state.get("settings")
    if total_steps is None:
        total_steps = settings.get("total_steps", 1) if isinstance(settings, Mapping) else 1
    attached = create(model, name, total_steps=total_steps, example_inputs=example_inputs, data=(), **options)
    attached.load_state_dict(method_state)
    if isinstance(checkpoint, (str, Path)) and Path(checkpoint).is_dir():
        model_state = _own_names(model, model_state)
    _load(model, model_state, "the checkpoint's model state does not fit this model")
    return attached.finalize()


def _read_checkpoint(checkpoint: str | Path | Mapping[str, Any],
                    method: str | None = None) -> tuple[Mapping[str, Tensor], Mapping[str, Any]]:
    """The (model state, method state) that ``checkpoint`` holds (see the module's notes); with
    several Sparsify states in a Lightning checkpoint, ``method`` picks one."""
    if isinstance(checkpoint, Mapping):
        return _states(checkpoint, "the mapping given", method)
    if not isinstance(checkpoint, (str, Path)):
        raise TypeError(f"checkpoint={shown(checkpoint)} is not allowed; allowed: {ALLOWED}.")
    path = Path(checkpoint)
    if path.is_dir():
        method_state = _torch_load(_existing(path / HF_STATE_FILE, "its method state"))
        return _hf_weights(path), method_state
    return _states(_torch_load(_existing(path, "the checkpoint")), str(path), method)


def _states(saved: object, where: str, method: str | None) -> tuple[Mapping[str, Tensor], Mapping[str, Any]]:
    if isinstance(saved, Mapping) and isinstance(saved.get("state_dict"), Mapping) and "callbacks" in saved:
        return saved["state_dict"], _lightning_method_state(saved["callbacks"], where, method)
    if isinstance(saved, Mapping) and isinstance(saved.get("model"), Mapping) and isinstance(saved.get("method"), Mapping):
        return saved["model"], saved["method"]
    raise ValueError(f"{where} holds neither a Lightning checkpoint nor {{'model': ..., 'method': ...}}; allowed: {ALLOWED}.")


def _lightning_method_state(callbacks: Mapping[str, Any], where: str, method: str | None) -> Mapping[str, Any]:
    """The method state the Sparsify callback saved (its state is ``{"method": method.state_dict()}``)."""
    found = [state["method"] for key, state in callbacks.items()
             if str(key).startswith(LIGHTNING_CALLBACK) and isinstance(state, Mapping)
             and isinstance(state.get("method"), Mapping)]
    if method is not None:
        found = [state for state in found if state.get("method") == method]
    if len(found) != 1:
        what = "no" if not found else f"{len(found)}"
        which = f" {method!r}" if method else ""
        raise ValueError(f"{where} holds {what} Sparsify{which} method states; allowed: a checkpoint written during "
                         "fit with one Sparsify callback (or method= naming one of them).")
    return found[0]


def _existing(path: Path, what: str) -> Path:
    if not path.is_file():
        raise ValueError(f"{path} ({what}) does not exist; allowed: {ALLOWED}.")
    return path


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a pickle of other objects, a truncated or foreign file
        raise ValueError(f"{path} is not a checkpoint torch.load reads with weights_only=True ({type(error).__name__}); "
                         f"allowed: {ALLOWED}.") from None


def _hf_weights(folder: Path) -> dict[str, Tensor]:
    """The model state of a Hugging Face checkpoint folder: model.safetensors, or every shard its index lists."""
    from safetensors.torch import load_file

    index = folder / HF_INDEX
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        shards = [_existing(folder / HF_WEIGHTS, "the model's weights").name]
    state: dict[str, Tensor] = {}
    for shard in shards:
        state.update(load_file(str(folder / shard)))
    return state


def _own_names(model: nn.Module, state: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    """``state`` as ``save_pretrained`` wrote it, under the model's own entry names: Transformers may
    save entries renamed (in transformers 5, ViT's under their legacy names). The renaming is the one
    ``save_pretrained`` applies (``transformers.core_model_loading.revert_weight_conversion``, already
    imported with the model's class), run on the model's own state; entries it only renames keep
    their tensor, which pairs the names."""
    if not any(cls.__module__.startswith("transformers.") for cls in type(model).__mro__):
        return state
    revert = getattr(sys.modules.get("transformers.core_model_loading"), "revert_weight_conversion", None)
    if revert is None:
        return state
    own = model.state_dict()
    name_of = {id(tensor): name for name, tensor in own.items()}
    saved_as = {saved: name_of[id(tensor)] for saved, tensor in revert(model, dict(own)).items() if id(tensor) in name_of}
    return {saved_as.get(name, name): tensor for name, tensor in state.items()}


def load_model_state(model: nn.Module, state: Mapping[str, Tensor]) -> None:
    """``model.load_state_dict(state)``, strict except for entries that share their tensor with an
    entry ``state`` holds (tied weights, which Hugging Face checkpoints store once), and refusing a
    tensor of another dtype (PyTorch would cast it silently). ValueError naming the first entry that
    is missing, unexpected or of another shape or dtype ("'conv1.weight' is int64, not float32"):
    callers say which checkpoint and model."""
    own = model.state_dict(keep_vars=True)
    stored = {id(own[key]) for key in state if key in own}
    for key, value in own.items():
        if key not in state and id(value) not in stored:
            raise ValueError(f"{key!r} is missing")
    for key, value in state.items():
        if key not in own:
            raise ValueError(f"{key!r} is not in the model")
        if not isinstance(value, Tensor):
            raise ValueError(f"{key!r} is a {type(value).__name__}, not a tensor")
        if value.shape != own[key].shape:
            raise ValueError(f"{key!r} has shape {tuple(value.shape)}, not {tuple(own[key].shape)}")
        if value.dtype != own[key].dtype:
            raise ValueError(f"{key!r} is {_dtype(value)}, not {_dtype(own[key])}")
    model.load_state_dict(state, strict=False)


def _dtype(tensor: Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def _load(model: nn.Module, state: Mapping[str, Tensor], what: str) -> None:
    try:
        load_model_state(model, state)
    except ValueError as error:
        raise ValueError(f"{what}: {error}; allowed: the state of the same model class with the same method and "
                         "options attached.") from None


def load_compact(model_class: type[nn.Module], directory: str | Path) -> nn.Module:
    """The model ``save_pretrained`` wrote to ``directory``, in eval mode: ``model_class`` built
    from the saved config (as ``from_pretrained`` builds it), the layers its
    ``sparsetrain_shapes`` names given those sizes, then every saved weight loaded, strictly (a
    missing, unexpected or differently shaped entry is a ``ValueError`` naming it)."""
    folder = Path(directory)
    config_class = getattr(model_class, "config_class", None)
    if not isinstance(model_class, type) or not callable(getattr(config_class, "from_pretrained", None)):
        raise ValueError(f"model_class={shown(model_class)} is not allowed; allowed: a Hugging Face model class "
                         "(one with a config_class), such as BertForSequenceClassification.")
    if not (folder / HF_CONFIG).is_file():
        raise ValueError(f"directory={shown(str(directory))} holds no {HF_CONFIG}; allowed: a folder save_pretrained wrote.")
    model = model_class(config_class.from_pretrained(folder))
    resize_(model, getattr(model.config, CONFIG_SHAPES, None) or {})
    _load(model, _own_names(model, _hf_weights(folder)), f"the weights in {folder} do not fit the compact model")
    return model.eval()
