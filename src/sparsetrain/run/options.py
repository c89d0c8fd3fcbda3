"""The options of a training run: the recipes of the papers, and how the command line's method
flags become a method's options.

Default recipe (Feather's): SGD with momentum 0.9, lr 0.1, weight decay 5e-4 on conv and linear
weights only (none on batch-norm parameters, biases and GDP's gates), cosine decay per step,
gradient-norm clipping at 3, random crop (pad 4) + horizontal flip, CIFAR normalisation.

Named recipes (``recipe``: files in ``run/recipes/``, listed by :func:`list_recipes`) set the
papers' own options; options given explicitly win. Their epoch-valued settings (milestones,
warm-up, FRS's prune_every and stop_at) scale with the epochs of the run when those differ from
the recipe's.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import yaml

from ..data import DATASET_NAMES
from ..messages import shown
from ..methods import list_methods, method_options, method_spec
from ..models import list_models
from .flags import flag_names, method_flags

DEFAULT_EPOCHS = {"cifar10-sample": 12, "cifar10": 160, "cifar100": 160}
LR_SCHEDULES = ("cosine", "multistep")
RECIPES = Path(__file__).parent / "recipes"
EPOCH_VALUED = ("milestones", "warmup")  # scaled with the run's epochs, beside the method flags in epochs


def text_value(text: str) -> Any:
    """The value of a command-line ``KEY=VALUE``'s text: a JSON value (number, true, list...), or else the text."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


@dataclass(frozen=True)
class TrainOptions:
    """Every option of a training run; the defaults are the seeds' recipe. ``method_flags``: the
    method's options given by flag (:mod:`.flags`, in the flags' units: epochs where a flag counts
    them); ``method_args``: any option of the method, in its own units. What is not given takes the
    method's default."""

    model: str = "resnet20"
    model_args: dict[str, Any] = field(default_factory=dict)
    dataset: str = "cifar10-sample"
    data_dir: str | None = None
    method: str = "feather"
    method_args: dict[str, Any] = field(default_factory=dict)
    method_flags: dict[str, Any] = field(default_factory=dict)
    epochs: int | None = None
    batch_size: int = 128
    lr: float = 0.1
    wd: float = 5e-4
    momentum: float = 0.9
    clip: float = 3.0
    lr_schedule: str = "cosine"
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1
    warmup: int = 0
    label_smoothing: float = 0.0
    recipe: str | None = None
    seed: int = 0
    device: str = "auto"
    workers: int = 0
    fsdp: bool = False
    limit: int | None = None
    name: str | None = None
    out: str = "runs"

    def __post_init__(self) -> None:
        for name in ("model", "dataset", "method", "lr_schedule", "device", "out"):
            _check_text(name, getattr(self, name))
        for name in ("data_dir", "recipe", "name"):
            if getattr(self, name) is not None:
                _check_text(name, getattr(self, name))
        if self.name is not None and (Path(self.name).name != self.name or self.name in (".", "..")):
            raise ValueError(f"name={shown(self.name)} is not allowed; allowed: a folder name inside --out, without '/'.")
        for name in ("out", "name", "data_dir"):
            check_path_length(name, getattr(self, name))
        if self.data_dir is not None and not Path(self.data_dir).expanduser().is_dir():
            raise ValueError(f"data_dir={shown(self.data_dir)} is not a folder; allowed: the folder holding the dataset.")
        if self.model not in list_models():
            raise ValueError(f"unknown model {shown(self.model)}; known models: {', '.join(list_models())}.")
        if self.dataset not in DATASET_NAMES:
            raise ValueError(f"unknown dataset {shown(self.dataset)}; known datasets: {', '.join(DATASET_NAMES)}.")
        for name in ("model_args", "method_args", "method_flags"):
            if not isinstance(getattr(self, name), dict):
                raise ValueError(f"{name}={shown(getattr(self, name))} is not allowed; allowed: a mapping of names to values.")
        _check_number("epochs", self.epochs, int, minimum=1, optional=True, maximum=MAX_EPOCHS)
        _check_number("batch_size", self.batch_size, int, minimum=1)
        _check_number("lr", self.lr, float, minimum=0.0, exclusive=True)
        _check_number("wd", self.wd, float, minimum=0.0, maximum=1.0)
        _check_number("momentum", self.momentum, float, minimum=0.0, maximum=1.0)
        _check_number("clip", self.clip, float, minimum=0.0, exclusive=True)
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule={shown(self.lr_schedule)} is not allowed; allowed: {', '.join(LR_SCHEDULES)}.")
        if not isinstance(self.milestones, list) or any(
            isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in self.milestones
        ) or self.milestones != sorted(self.milestones):
            raise ValueError(f"milestones={shown(self.milestones)} is not allowed; allowed: increasing epochs >= 1.")
        _check_number("gamma", self.gamma, float, minimum=0.0, exclusive=True, maximum=1.0)
        _check_number("warmup", self.warmup, int, minimum=0)
        _check_number("label_smoothing", self.label_smoothing, float, minimum=0.0)
        if self.label_smoothing >= 1.0:
            raise ValueError(f"label_smoothing={self.label_smoothing!r} is not allowed; allowed: a number in [0, 1).")
        _check_number("seed", self.seed, int, minimum=0)
        _check_number("workers", self.workers, int, minimum=0, maximum=MAX_WORKERS)
        if not isinstance(self.fsdp, bool):
            raise ValueError(f"fsdp={shown(self.fsdp)} is not allowed; allowed: true or false.")
        _check_number("limit", self.limit, int, minimum=1, optional=True)
        if self.epochs is None:
            object.__setattr__(self, "epochs", DEFAULT_EPOCHS[self.dataset])
        flags = method_flags()
        unknown = sorted(set(self.method_flags) - set(flags))
        if unknown:
            raise ValueError(f"unknown method flag {shown(unknown[0])}; known flags: {', '.join(flags)}.")
        for key, value in self.method_flags.items():  # a flag converted to the option's units: a number first
            if flags[key].epochs or flags[key].offset:
                _check_number(key, value, float if flags[key].epochs else int, minimum=0.0)
        epoch_valued = {"warmup": self.warmup, **{k: v for k, v in self.method_flags.items() if flags[k].epochs}}
        for key, value in epoch_valued.items():
            if value > self.epochs:
                raise ValueError(f"--{key.replace('_', '-')} {value:g} is beyond the run's {self.epochs} epochs; "
                                 f"allowed: at most {self.epochs}.")
        self.method_options(steps_per_epoch=1)  # the method exists and takes every option given
        if self.name is None:
            stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
            object.__setattr__(self, "name", f"{self.model}-{self.method}-{stamp}")
        resolve_device(self.device)

    @property
    def run_dir(self) -> Path:
        return Path(self.out) / str(self.name)

    def method_options(self, steps_per_epoch: int) -> dict[str, Any]:
        """The options given to the method: ``method_args`` and the method flags given, in the
        method's units; validated by the method (a flag it does not take is an error)."""
        spec = method_spec(self.method)
        flags = method_flags()
        values = dict(self.method_args)
        for key, value in self.method_flags.items():
            flag = flags[key]
            if self.method not in flag.takes:
                raise ValueError(
                    f"--{key.replace('_', '-')} does not apply to method {self.method!r}; "
                    f"its options: {', '.join(spec.option_names()) or 'none'}."
                )
            values[flag.takes[self.method]] = flag.to_option(value, steps_per_epoch)
        method_options(self.method, **values)
        return values

    def record(self) -> dict[str, Any]:
        """The options as config.json keeps them: one flat mapping, the method flags beside the others."""
        values = dataclasses.asdict(self)
        flags = values.pop("method_flags")
        return {**values, **flags}


def method_names() -> list[str]:
    """Every ``--method`` a run accepts, in registration order."""
    return list(list_methods())


MAX_INT = 2**31 - 1
MAX_EPOCHS = 1_000_000
MAX_WORKERS = 4096


NAME_MAX = 255  # bytes in one file or folder name, on every common file system


def check_path_length(name: str, path: str | None) -> None:
    """ValueError if a part of ``path`` is longer than a file system allows (NAME_MAX bytes)."""
    if path is not None and any(len(part.encode()) > NAME_MAX for part in Path(path).parts):
        raise ValueError(f"{name}={shown(path)} is too long for the file system; allowed: names of at most {NAME_MAX} bytes.")


def _check_text(name: str, value: Any) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name}={shown(value)} is not allowed; allowed: a non-empty string.")


def _check_number(
    name: str, value: Any, kind: type, minimum: float, exclusive: bool = False, optional: bool = False,
    maximum: float | None = None,
) -> None:
    """``value`` is an int (or for floats any finite number) above ``minimum`` and at most
    ``maximum`` (ints: at most MAX_INT by default, what a C int holds)."""
    if value is None and optional:
        return
    allowed = (int,) if kind is int else (int, float)
    if maximum is None and kind is int:
        maximum = MAX_INT
    bound = f"> {minimum:g}" if exclusive else f">= {minimum:g}"
    if maximum is not None:
        bound += f" and <= {maximum:g}"
    if isinstance(value, bool) or not isinstance(value, allowed) or not math.isfinite(value) or (
        value <= minimum if exclusive else value < minimum
    ) or (maximum is not None and value > maximum):
        raise ValueError(f"{name}={shown(value)} is not allowed; allowed: {'an integer' if kind is int else 'a number'} {bound}.")


def resolve_device(spec: str) -> torch.device:
    """'auto' (CUDA when available, else CPU), 'cpu', 'cuda' or 'cuda:N'."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ValueError(f"device={shown(spec)} is not a device; allowed: auto, cpu, cuda or cuda:N.") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device={spec!r} is not supported; allowed: auto, cpu, cuda or cuda:N.")
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"device={spec!r} is not available here; allowed: cpu or one of the {torch.cuda.device_count()} CUDA devices.")
    return device


def list_recipes() -> list[str]:
    """The names of the packaged recipes."""
    return sorted(path.stem for path in RECIPES.glob("*.yaml"))


def recipe_values(name: str, epochs: int | None = None) -> dict[str, Any]:
    """The options recipe ``name`` sets; with ``epochs``, its epoch-valued ones scaled to them."""
    if name not in list_recipes():
        raise ValueError(f"unknown recipe {shown(name)}; known recipes: {', '.join(list_recipes())}.")
    values = yaml.safe_load((RECIPES / f"{name}.yaml").read_text())
    if epochs is None or epochs == values["epochs"]:
        return values
    scale = epochs / values["epochs"]
    epoch_valued = (*EPOCH_VALUED, *(key for key, flag in method_flags().items() if flag.epochs))
    scaled = {key: [max(1, round(v * scale)) for v in value] if isinstance(value, list) else max(1, round(value * scale))
              for key, value in values.items() if key in epoch_valued}
    return {**values, **scaled, "epochs": epochs}


def options_from_dict(values: dict[str, Any]) -> TrainOptions:
    """Build options from a flat mapping (a config file, a saved config.json): a named ``recipe``
    first, then the values given; a method flag's key or alias goes to ``method_flags`` (None: not
    given); unknown keys are an error that lists the known ones."""
    fields = [f.name for f in dataclasses.fields(TrainOptions) if f.name != "method_flags"]
    names = flag_names(method_flags())
    normalised = {key.replace("-", "_"): value for key, value in values.items()}
    unknown = sorted(set(normalised) - set(fields) - set(names) - {"method_flags"})
    if unknown:
        raise ValueError(f"unknown option {shown(unknown[0])}; known options: {', '.join(fields + list(names))}.")
    if normalised.get("recipe") is not None:
        normalised = {**recipe_values(normalised["recipe"], normalised.get("epochs")), **normalised}
    flags = dict(normalised.pop("method_flags", {}))
    for name in [k for k in normalised if k in names]:
        value = normalised.pop(name)
        if value is not None:
            if names[name] in flags:
                raise ValueError(f"option {names[name]!r} is given twice (as {name!r}); allowed: one of its names.")
            flags[names[name]] = value
    return TrainOptions(**normalised, method_flags=flags)
