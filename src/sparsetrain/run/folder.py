"""The run folder: the one place that knows its files, writes them and reads them back.

    config.json             resolved options, the model's constructor call, the method's name and
                            options, total steps; at the end the final metrics and the widths of
                            layers whose sizes changed (channel pruning)
    metrics.jsonl           one record per epoch
    checkpoint.safetensors  model, optimizer, LR schedule, method and RNG states (atomic, every epoch)
    model.safetensors       the final plain weights
    report.md, training.png, layers.png, tensorboard/

Nothing else in the folder is ours: starting a run over removes only the files a run writes before
its first checkpoint, by name, and refuses when the folder holds anything else. While a process
trains in the folder it holds an OS lock on it (``flock``, released when the process dies), so a
second ``train`` or ``--resume`` of the same folder is refused; reading it (eval, report) is not.

:func:`load_run` rebuilds a run's model for eval, report, export, the bench and the benchmark
scripts: a finished one from its widths and weights, a checkpoint with its method re-attached.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from ..inference import load_model_state
from ..methods import Method, create, method_options
from ..models import create_model, input_size, rebuild
from ..nm import NMPattern
from ..structured import layer_shapes
from .checkpoint import (
    TMP_SUFFIX,
    atomic_write,
    first_non_finite,
    load_checkpoint,
    load_weights,
    save_checkpoint,
    write_json,
    writing,
)

CONFIG, METRICS, CHECKPOINT, MODEL, REPORT = (
    "config.json",
    "metrics.jsonl",
    "checkpoint.safetensors",
    "model.safetensors",
    "report.md",
)
TRAINING_PLOT, LAYERS_PLOT, TENSORBOARD = "training.png", "layers.png", "tensorboard"
RUN_FILES = (CONFIG, METRICS, CHECKPOINT, MODEL, REPORT, TRAINING_PLOT, LAYERS_PLOT)
# Temporary files of atomic_write: ".NAME.HEX.tmp" for a file NAME of the run.
_LEFTOVER = re.compile(rf"\.({'|'.join(map(re.escape, RUN_FILES))})\.[0-9a-f]+{re.escape(TMP_SUFFIX)}")
_EVENTS_PREFIX = "events.out.tfevents."  # TensorBoard's event files


class RunFolder:
    """One run's folder at ``path``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock: int | None = None  # the descriptor holding the folder's lock

    def file(self, name: str) -> Path:
        return self.path / name

    def exists(self) -> bool:
        return self.path.exists()

    def has_checkpoint(self) -> bool:
        return self.file(CHECKPOINT).is_file()

    def has_config(self) -> bool:
        return self.file(CONFIG).is_file()

    def is_finished(self) -> bool:
        return self.file(MODEL).is_file()

    def lock(self) -> None:
        """Take the folder's exclusive lock for this process; ValueError naming the folder when
        another process holds it (a run training in it)."""
        descriptor = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            raise ValueError(f"run folder {self.path} is in use by another training process; "
                             "allowed: wait for it to end, or a new --name.") from None
        self._lock = descriptor

    def unlock(self) -> None:
        """Release the lock taken by :meth:`lock`, if held."""
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def remove_leftovers(self) -> list[Path]:
        """Delete temporary files of our atomic writes cut short (a run killed while writing); return them."""
        leftovers = sorted(entry for entry in self.path.iterdir()
                           if _LEFTOVER.fullmatch(entry.name) and _is_plain_file(entry)) if self.path.is_dir() else []
        for leftover in leftovers:
            leftover.unlink()
        return leftovers

    def check_start_over(self) -> list[Path]:
        """What a run writes before its first checkpoint (config.json, TensorBoard events), found in
        the folder; ValueError naming the first other entry, if the folder holds one."""
        events = self.file(TENSORBOARD)
        events_folder = events.is_dir() and not events.is_symlink()
        inside = list(events.iterdir()) if events_folder else []
        ours = [self.file(CONFIG)] if _is_plain_file(self.file(CONFIG)) else []
        ours += [entry for entry in inside if entry.name.startswith(_EVENTS_PREFIX) and _is_plain_file(entry)]
        others = sorted(str(entry.relative_to(self.path)) for entry in [*self.path.iterdir(), *inside]
                        if entry not in ours and not (entry == events and events_folder))
        if others:
            raise ValueError(f"cannot start {self.path} over: it holds {others[0]!r}, which a run stopped before its "
                             "first checkpoint does not write; allowed: move it out of the folder, or a new --name.")
        return ours

    def start_over(self) -> None:
        """Remove what :meth:`check_start_over` finds, by name, so the run can start again; the
        folder itself stays. Nothing is removed when the folder holds anything else."""
        for entry in self.check_start_over():
            entry.unlink()
        if self.file(TENSORBOARD).is_dir() and not self.file(TENSORBOARD).is_symlink():
            self.file(TENSORBOARD).rmdir()

    def create(self, config: dict[str, Any]) -> None:
        """Make the folder (or reuse the empty one :meth:`start_over` left), lock it and write its config.json."""
        try:
            self.path.mkdir(parents=True, exist_ok=self._lock is not None)
            if self._lock is None:
                self.lock()
            write_json(self.file(CONFIG), config)
        except FileExistsError:
            raise ValueError(f"run folder {self.path} already exists; allowed: --resume to continue it, or a new --name.") from None
        except OSError as error:
            raise ValueError(f"cannot create the run folder {self.path}: {error.strerror}; "
                             "allowed: --out in a writable folder.") from None

    def config(self) -> dict[str, Any]:
        """The run's config.json; ValueError naming the file if it is not a JSON mapping."""
        path = self.file(CONFIG)
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{path} is not readable JSON ({error}).") from None
        if not isinstance(config, dict):
            raise ValueError(f"{path} does not hold a JSON object; allowed: the {CONFIG} sparsetrain wrote.")
        return config

    def section(self, key: str) -> dict[str, Any]:
        """One mapping of config.json ("options", "model", "method"); ValueError naming it if absent."""
        value = self.config().get(key)
        if not isinstance(value, dict):
            raise ValueError(f"{self.file(CONFIG)} has no {key!r} mapping; allowed: the {CONFIG} sparsetrain wrote.")
        return value

    def saved_options(self) -> dict[str, Any]:
        """The training options the run was started with."""
        return self.section("options")

    def update_config(self, **values: Any) -> None:
        write_json(self.file(CONFIG), {**self.config(), **values})

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        save_checkpoint(self.file(CHECKPOINT), state)

    def load_checkpoint(self, device: torch.device) -> dict[str, Any]:
        return load_checkpoint(self.file(CHECKPOINT), device)

    def write_metrics(self, history: list[dict[str, Any]]) -> None:
        text = "".join(json.dumps(record) + "\n" for record in history)
        atomic_write(self.file(METRICS), lambda tmp: Path(tmp).write_text(text))

    def metrics(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.file(METRICS).read_text().splitlines()]

    def write_model(self, model: nn.Module) -> None:
        state = {key: value.detach().contiguous().cpu() for key, value in model.state_dict().items()}
        atomic_write(self.file(MODEL), lambda tmp: save_file(state, tmp))

    def write_text(self, name: str, text: str) -> None:
        atomic_write(self.file(name), lambda tmp: Path(tmp).write_text(text))

    def tensorboard(self) -> EventLog | None:
        """A TensorBoard log into tensorboard/, or None when tensorboard is not installed."""
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return None
        with writing(self.file(TENSORBOARD)):
            return EventLog(SummaryWriter(str(self.file(TENSORBOARD))), self.file(TENSORBOARD))


@dataclass
class EventLog:
    """TensorBoard's writer (its files are written by a thread of its own); a failed write is an
    OSError naming the folder."""

    writer: Any
    path: Path

    def add(self, values: dict[str, float], step: int) -> None:
        with writing(self.path):
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        with writing(self.path):
            self.writer.close()


def _is_plain_file(path: Path) -> bool:
    return path.is_file() and not path.is_symlink()


def changed_shapes(model: nn.Module, reference: nn.Module) -> dict[str, dict[str, int]]:
    """The sizes of the layers of ``model`` that differ from ``reference`` (JSON-ready)."""
    before = layer_shapes(reference)
    return {name: sizes for name, sizes in layer_shapes(model).items() if before.get(name) != sizes}


@dataclass
class LoadedRun:
    """A run's model rebuilt from its folder. ``method`` is attached when it came from a
    checkpoint (the model then computes with the method's forward weights), else None."""

    folder: RunFolder
    config: dict[str, Any]
    model: nn.Module
    method: Method | None
    weights: Path

    @property
    def nm(self) -> NMPattern | None:
        """The N:M pattern of an N:M method's run, else None."""
        return nm_pattern(self.config)


def nm_pattern(config: dict[str, Any]) -> NMPattern | None:
    """The N:M pattern of the run whose config.json holds ``config``, as its method's options give it
    (their ``pattern()``; None for a method without one, or a folder with no method recorded)."""
    section = config.get("method") or {}
    if "name" not in section:  # a bare weights folder: no method recorded
        return None
    options = method_options(section["name"], **section.get("options", {}))
    return options.pattern() if hasattr(options, "pattern") else None  # options that state no pattern: none


def final_weights(path: str | Path) -> Path:
    """The finished model.safetensors of the run folder at ``path``; ValueError if it has none."""
    weights = _weights_file(Path(path))
    if weights.name != MODEL or not weights.is_file():
        raise ValueError(f"{path} has no finished {MODEL} to export")
    return weights


def _weights_file(path: Path) -> Path:
    if path.is_dir():
        return path / MODEL if (path / MODEL).is_file() else path / CHECKPOINT
    return path


def _finite(state: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    bad = first_non_finite(state)
    if bad is not None:
        raise ValueError(f"{path}: {bad} holds NaN or infinite values; allowed: a model of finite weights.")
    return state


def load_run(path: str | Path, device: torch.device) -> LoadedRun:
    """Rebuild the model of the run folder (or weights file inside one) at ``path``: the final
    weights with the saved widths, or a checkpoint's with its method re-attached. ValueError if
    ``path`` is not such a folder or file."""
    weights = _weights_file(Path(path))
    folder = RunFolder(weights.parent)
    if not weights.is_file() or not folder.file(CONFIG).is_file():
        raise ValueError(f"{path} is not a run folder or a weights file beside {CONFIG}")
    config = folder.config()
    record = folder.section("model")
    name, kwargs = record.get("name"), record.get("kwargs")
    if not isinstance(name, str) or not isinstance(kwargs, dict):
        raise ValueError(f"{folder.file(CONFIG)} has no model name and kwargs; allowed: the {CONFIG} sparsetrain wrote.")
    if weights.name != CHECKPOINT:
        model = rebuild(name, kwargs, config.get("shapes")).to(device)
        _load_into(model, _finite(load_weights(weights, device), weights), weights, name)
        return LoadedRun(folder, config, model, None, weights)
    state = load_checkpoint(weights, device)
    _finite(state["model"], weights)
    model = create_model(name, **kwargs).to(device)
    example = torch.zeros(2, *input_size(name), device=device)
    method = create(model, config["method"]["name"], total_steps=config["total_steps"], example_inputs=example, data=(),
                    **config["method"]["options"])
    method.load_state_dict(state["method"])
    _load_into(model, state["model"], weights, name)
    return LoadedRun(folder, config, model, method, weights)


def _load_into(model: nn.Module, state: dict[str, torch.Tensor], path: Path, name: str) -> None:
    try:
        load_model_state(model, state)
    except ValueError as error:
        raise ValueError(f"the weights in {path} do not fit the model {name!r} its {CONFIG} names ({error}).") from None
