"""The training loop as a library function: the seed papers' CIFAR recipe with any method.

Recipe (Feather / ST-3 seeds): SGD with momentum 0.9, lr 0.1, weight decay 5e-4 on conv and
linear weights only (none on batch-norm parameters and biases), cosine decay per step,
gradient-norm clipping at 3, random crop (pad 4) + horizontal flip, CIFAR normalisation.

A run lives in one folder: ``config.json`` (resolved options, the model's name and arguments,
and at the end the final metrics), ``metrics.jsonl`` (one record per epoch),
``checkpoint.safetensors`` (everything needed to resume, rewritten atomically after every
epoch), and at the end ``model.safetensors``, ``report.md`` and plots.

Under ``torchrun`` the run is data-parallel (DDP): every rank shares the sparsifier's
thresholds and masks, and only rank 0 writes files.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .checkpoint import atomic_write, load_checkpoint, save_checkpoint, write_json
from .data import DATASET_NAMES, BatchLoader, ImageDataset, load_dataset
from .methods import list_methods
from .modes import eval_mode
from .models import create_model, list_models
from .plots import plot_layer_sparsity, plot_training
from .report import count_flops, sparsity_report
from .schedules import validate_sparsity
from .sparsifier import Sparsifier
from .structured import FRS, GDP, layer_shapes, rebuild
from .structured.gdp import validate_flops_target

DENSE = "dense"
STRUCTURED = ("gdp", "frs")
FRS_DEFAULT_FRACTION = 0.3  # of the prunable channels, removed over the schedule when channels_per_step is unset
DEFAULT_EPOCHS = {"cifar10-sample": 12, "cifar10": 160, "cifar100": 160}
EVAL_BATCH_SIZE = 256
CONFIG, METRICS, CHECKPOINT, MODEL, REPORT = (
    "config.json",
    "metrics.jsonl",
    "checkpoint.safetensors",
    "model.safetensors",
    "report.md",
)


def method_names() -> list[str]:
    """Every ``--method`` a run accepts: dense, the unstructured presets, the channel-pruning methods."""
    return [DENSE, *list_methods(), *STRUCTURED]


@dataclass(frozen=True)
class TrainOptions:
    """Every option of a training run; the defaults are the seeds' recipe."""

    model: str = "resnet20"
    model_args: dict[str, Any] = field(default_factory=dict)
    dataset: str = "cifar10-sample"
    data_dir: str | None = None
    method: str = "feather"
    sparsity: float = 0.9
    epochs: int | None = None
    batch_size: int = 128
    lr: float = 0.1
    wd: float = 5e-4
    momentum: float = 0.9
    clip: float = 3.0
    t1: float | None = None
    pthres: int = 0
    flops_target: float = 0.5
    prune_every: int | None = None
    channels_per_step: int | None = None
    stop_at: int | None = None
    seed: int = 0
    device: str = "auto"
    workers: int = 0
    limit: int | None = None
    name: str | None = None
    out: str = "runs"

    def __post_init__(self) -> None:
        if self.model not in list_models():
            raise ValueError(f"unknown model {self.model!r}; known models: {', '.join(list_models())}.")
        methods = method_names()
        if self.method not in methods:
            raise ValueError(f"unknown method {self.method!r}; known methods: {', '.join(methods)}.")
        if self.dataset not in DATASET_NAMES:
            raise ValueError(f"unknown dataset {self.dataset!r}; known datasets: {', '.join(DATASET_NAMES)}.")
        validate_sparsity(self.sparsity)
        _check_number("epochs", self.epochs, int, minimum=1, optional=True)
        _check_number("batch_size", self.batch_size, int, minimum=1)
        _check_number("lr", self.lr, float, minimum=0.0, exclusive=True)
        _check_number("wd", self.wd, float, minimum=0.0)
        _check_number("momentum", self.momentum, float, minimum=0.0)
        _check_number("clip", self.clip, float, minimum=0.0, exclusive=True)
        _check_number("t1", self.t1, float, minimum=0.0, optional=True)
        _check_number("pthres", self.pthres, int, minimum=0)
        _check_number("seed", self.seed, int, minimum=0)
        _check_number("workers", self.workers, int, minimum=0)
        _check_number("limit", self.limit, int, minimum=1, optional=True)
        validate_flops_target(self.flops_target)
        _check_number("prune_every", self.prune_every, int, minimum=1, optional=True)
        _check_number("channels_per_step", self.channels_per_step, int, minimum=1, optional=True)
        _check_number("stop_at", self.stop_at, int, minimum=1, optional=True)
        if self.epochs is None:
            object.__setattr__(self, "epochs", DEFAULT_EPOCHS[self.dataset])
        if self.method == "frs":  # the public FRS schedule (every 21 epochs until 150 of 200), scaled
            object.__setattr__(self, "prune_every", self.prune_every or max(1, round(self.epochs * 21 / 200)))
            object.__setattr__(self, "stop_at", self.stop_at or max(1, round(self.epochs * 150 / 200)))
        if self.name is None:
            stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
            object.__setattr__(self, "name", f"{self.model}-{self.method}-{self.sparsity:g}-{stamp}")
        resolve_device(self.device)

    @property
    def run_dir(self) -> Path:
        return Path(self.out) / str(self.name)


def _check_number(
    name: str, value: Any, kind: type, minimum: float, exclusive: bool = False, optional: bool = False
) -> None:
    if value is None and optional:
        return
    allowed = (int,) if kind is int else (int, float)
    bound = f"> {minimum:g}" if exclusive else f">= {minimum:g}"
    if isinstance(value, bool) or not isinstance(value, allowed) or not math.isfinite(value) or (
        value <= minimum if exclusive else value < minimum
    ):
        raise ValueError(f"{name}={value!r} is not allowed; allowed: {'an integer' if kind is int else 'a number'} {bound}.")


def resolve_device(spec: str) -> torch.device:
    """'auto' (CUDA when available, else CPU), 'cpu', 'cuda' or 'cuda:N'."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ValueError(f"device={spec!r} is not a device; allowed: auto, cpu, cuda or cuda:N.") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device={spec!r} is not supported; allowed: auto, cpu, cuda or cuda:N.")
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"device={spec!r} is not available here; allowed: cpu or one of the {torch.cuda.device_count()} CUDA devices.")
    return device


def options_from_dict(values: dict[str, Any]) -> TrainOptions:
    """Build options from a mapping (a config file); unknown keys are an error that lists the known ones."""
    known = [f.name for f in dataclasses.fields(TrainOptions)]
    normalised = {key.replace("-", "_"): value for key, value in values.items()}
    unknown = sorted(set(normalised) - set(known))
    if unknown:
        raise ValueError(f"unknown option {unknown[0]!r}; known options: {', '.join(known)}.")
    return TrainOptions(**normalised)


@dataclass
class Distributed:
    """This process's place in a torchrun job (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @staticmethod
    def from_environment(device: torch.device) -> Distributed:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size == 1:
            return Distributed()
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return Distributed(dist.get_rank(), dist.get_world_size())


@dataclass
class Setup:
    """Everything a run needs, built and validated before the first step."""

    options: TrainOptions
    device: torch.device
    ranks: Distributed
    data: ImageDataset
    train_loader: BatchLoader
    test_loader: BatchLoader
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    sparsifier: Sparsifier | None
    structured: GDP | FRS | None = None
    example_inputs: torch.Tensor | None = None
    start_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


def model_record(options: TrainOptions, num_classes: int) -> dict[str, Any]:
    """The model's constructor call, enough to rebuild it: {"name": ..., "kwargs": {...}}."""
    return {"name": options.model, "kwargs": {**options.model_args, "num_classes": num_classes}}


def prepare(options: TrainOptions, resume: bool = False) -> Setup:
    """Validate inputs, build data, model, optimizer, schedule and sparsifier; create or reopen the run folder.

    Every usage error (bad option, missing data, existing run folder) is a ValueError raised
    here, before anything is written.
    """
    run_dir = options.run_dir
    if resume:
        _check_resumable(options, run_dir)
    elif run_dir.exists():
        raise ValueError(f"run folder {run_dir} already exists; allowed: --resume to continue it, or a new --name.")
    device = resolve_device(options.device)
    if options.workers:
        torch.set_num_threads(options.workers)
    data = load_dataset(options.dataset, options.data_dir)
    state = load_checkpoint(run_dir / CHECKPOINT, device) if resume else None
    torch.manual_seed(options.seed)
    record = model_record(options, data.num_classes)
    shapes = None if state is None else state.get("shapes")  # set once channels were removed
    model = rebuild(record["name"], record["kwargs"], shapes).to(device)
    ranks = Distributed.from_environment(device)
    x_train, y_train = data.x_train[: options.limit], data.y_train[: options.limit]
    train_loader = BatchLoader(
        x_train, y_train, options.batch_size, data.mean, data.std, augment=True, seed=options.seed,
        rank=ranks.rank, world_size=ranks.world_size, device=device,
    )
    test_loader = BatchLoader(data.x_test, data.y_test, EVAL_BATCH_SIZE, data.mean, data.std, shuffle=False, device=device)
    total_steps = options.epochs * len(train_loader)
    example_inputs = data.x_test[:2].float().to(device)  # shape and device are what tracing needs
    sparsifier, structured = None, None
    if options.method == "gdp":
        structured = GDP(model, options.flops_target, total_steps, example_inputs)
    elif options.method == "frs":
        structured = _make_frs(options, record, model, example_inputs)
    elif options.method != DENSE:
        knobs = {} if options.t1 is None else {"start": round(options.t1 * len(train_loader))}
        sparsifier = Sparsifier(
            model, options.method, options.sparsity, total_steps, min_size=options.pthres + 1, **knobs
        )
    optimizer = make_optimizer(model, options, extra=structured.parameters() if isinstance(structured, GDP) else None)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    setup = Setup(options, device, ranks, data, train_loader, test_loader, model, optimizer, scheduler, sparsifier,
                  structured, example_inputs)
    if state is not None:
        _restore(setup, state)
    elif ranks.main:
        run_dir.mkdir(parents=True)
        write_json(run_dir / CONFIG, {"options": dataclasses.asdict(options), "model": record})
    return setup


def make_optimizer(model: nn.Module, options: TrainOptions, extra: Iterable[nn.Parameter] | None = None) -> torch.optim.SGD:
    """SGD with weight decay on conv/linear weights only; ``extra`` parameters (GDP gates) get none."""
    groups = [
        {"params": [p for p in model.parameters() if p.ndim > 1], "weight_decay": options.wd},
        {"params": [p for p in model.parameters() if p.ndim <= 1], "weight_decay": 0.0},
    ]
    if extra is not None:
        groups.append({"params": list(extra), "weight_decay": 0.0})
    return torch.optim.SGD(groups, lr=options.lr, momentum=options.momentum)


def _make_frs(options: TrainOptions, record: dict[str, Any], model: nn.Module, example_inputs: torch.Tensor) -> FRS:
    """FRS on the scaled public schedule; by default it removes 30 % of the dense model's prunable
    channels in total (counted on the dense model, so a resumed, already smaller model agrees)."""
    steps = len(range(options.prune_every, min(options.stop_at, options.epochs) + 1, options.prune_every))
    if steps == 0:
        raise ValueError(
            f"prune_every={options.prune_every} and stop_at={options.stop_at} leave no pruning step in "
            f"{options.epochs} epochs; allowed: prune_every <= min(stop_at, epochs)."
        )
    dense = create_model(record["name"], **record["kwargs"]).to(example_inputs.device)
    prunable = FRS(dense, options.prune_every, 1, options.stop_at, example_inputs=example_inputs).prunable(dense)
    per_step = options.channels_per_step or max(1, round(FRS_DEFAULT_FRACTION * prunable / steps))
    if per_step * steps > prunable:
        raise ValueError(
            f"channels_per_step={per_step} over {steps} pruning steps removes {per_step * steps} channels, but "
            f"{options.model} has {prunable} prunable; allowed: channels_per_step <= {prunable // steps}."
        )
    return FRS(model, options.prune_every, per_step, options.stop_at, example_inputs=example_inputs)


def _check_resumable(options: TrainOptions, run_dir: Path) -> None:
    if not (run_dir / CHECKPOINT).is_file():
        raise ValueError(f"cannot resume: {run_dir / CHECKPOINT} does not exist; allowed: a run folder with a checkpoint.")
    saved = json.loads((run_dir / CONFIG).read_text())["options"]
    for key, value in dataclasses.asdict(options).items():
        if key not in ("device", "workers") and saved.get(key) != value:
            raise ValueError(
                f"option {key}={value!r} differs from the run's saved {saved.get(key)!r}; "
                "allowed: the options the run was started with."
            )


def _restore(setup: Setup, state: dict[str, Any]) -> None:
    setup.model.load_state_dict(state["model"])
    setup.optimizer.load_state_dict(state["optimizer"])
    setup.scheduler.load_state_dict(state["scheduler"])
    if setup.sparsifier is not None:
        setup.sparsifier.load_state_dict(state["sparsifier"])
    if setup.structured is not None:
        setup.structured.load_state_dict(state["structured"])
    torch.set_rng_state(state["rng"])
    setup.start_epoch = int(state["epoch"])
    setup.history = list(state["history"])


def _checkpoint_state(setup: Setup, epoch: int) -> dict[str, Any]:
    return {
        "epoch": epoch,
        "model": setup.model.state_dict(),
        "optimizer": setup.optimizer.state_dict(),
        "scheduler": setup.scheduler.state_dict(),
        "sparsifier": None if setup.sparsifier is None else setup.sparsifier.state_dict(),
        "structured": None if setup.structured is None else setup.structured.state_dict(),
        "shapes": layer_shapes(setup.model) if isinstance(setup.structured, FRS) else None,
        "rng": torch.get_rng_state(),
        "history": setup.history,
    }


@torch.no_grad()
def evaluate(model: nn.Module, loader: BatchLoader) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` (in eval mode) over one pass of ``loader``."""
    loss, correct = 0.0, 0
    with eval_mode(model):
        for x, y in loader.batches(0):
            logits = model(x)
            loss += F.cross_entropy(logits, y, reduction="sum").item()
            correct += int((logits.argmax(1) == y).sum())
    n = loader.samples_per_rank
    return loss / n, correct / n


def _progress(batches: Iterable, total: int, enabled: bool, label: str) -> Iterable:
    if not enabled:
        return batches
    from tqdm import tqdm

    return tqdm(batches, total=total, desc=label, leave=False)


def _share_buffers(model: nn.Module, ranks: Distributed) -> None:
    """Give every rank rank 0's buffers (batch-norm running statistics), so evaluation agrees."""
    if ranks.world_size > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def _mean_over_ranks(value: torch.Tensor, ranks: Distributed) -> float:
    if ranks.world_size > 1:
        dist.all_reduce(value)
        value = value / ranks.world_size
    return value.item()


def fit(setup: Setup, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train from ``setup.start_epoch`` to the end, checkpointing every epoch; return the final metrics."""
    options, ranks, sparsifier, structured = setup.options, setup.ranks, setup.sparsifier, setup.structured
    gdp = structured if isinstance(structured, GDP) else None
    run_dir = options.run_dir
    writer = _tensorboard(run_dir) if ranks.main else None
    show_progress = ranks.main and sys.stderr.isatty()
    record = model_record(options, setup.data.num_classes)
    dense_flops = count_flops(create_model(record["name"], **record["kwargs"]), setup.example_inputs[:1].cpu())
    for epoch in range(setup.start_epoch, options.epochs):
        start = time.perf_counter()
        model = setup.model
        net = DistributedDataParallel(model) if ranks.world_size > 1 else model
        params = list(model.parameters())  # clipped: the model's own, not GDP's gates
        model.train()
        loss_sum = torch.zeros((), device=setup.device)
        label = f"epoch {epoch + 1}/{options.epochs}"
        for x, y in _progress(setup.train_loader.batches(epoch), len(setup.train_loader), show_progress, label):
            loss = F.cross_entropy(net(x), y)
            objective = loss + gdp.penalty() if gdp is not None else loss
            setup.optimizer.zero_grad(set_to_none=True)
            objective.backward()
            nn.utils.clip_grad_norm_(params, options.clip)
            setup.optimizer.step()
            setup.scheduler.step()
            if sparsifier is not None:
                sparsifier.step()
            if gdp is not None:
                gdp.step()
            loss_sum += loss.detach()
        train_loss = _mean_over_ranks(loss_sum / len(setup.train_loader), ranks)
        if isinstance(structured, FRS) and structured.should_prune(epoch + 1):
            _frs_prune(setup, structured)
        train_time = time.perf_counter() - start
        _share_buffers(setup.model, ranks)
        test_loss, test_acc = evaluate(setup.model, setup.test_loader)
        record = {
            "epoch": epoch + 1,
            "train_loss": train_loss,
            "test_loss": test_loss,
            "test_acc": test_acc,
            "lr": setup.scheduler.get_last_lr()[0],
            "train_time": train_time,
            "epoch_time": time.perf_counter() - start,
        }
        if sparsifier is not None:
            record["sparsity"] = sparsifier.sparsity()
            if sparsifier.config.scope != "layer":
                record["threshold"] = sparsifier.threshold
        if gdp is not None:
            record["flops_ratio"] = gdp.flops_ratio(hard=True)
        elif structured is not None:
            record["flops_ratio"] = count_flops(setup.model, setup.example_inputs[:1]) / dense_flops
        setup.history.append(record)
        if ranks.main:
            save_checkpoint(run_dir / CHECKPOINT, _checkpoint_state(setup, epoch + 1))
            _write_metrics(run_dir / METRICS, setup.history)
            log(format_record(record, options.epochs))
            if writer is not None:
                for key, value in record.items():
                    writer.add_scalar(key, value, epoch + 1)
    if writer is not None:
        writer.close()
    return _finish(setup, dense_flops, log)


def _frs_prune(setup: Setup, frs: FRS) -> None:
    """Remove the lowest-relevance channels for real; optimizer and LR schedule follow the new model.

    Scores come from the whole training set, unshuffled and unaugmented, so every rank of a
    distributed run removes the same channels.
    """
    data, options = setup.data, setup.options
    scoring = BatchLoader(
        data.x_train[: options.limit], data.y_train[: options.limit], EVAL_BATCH_SIZE, data.mean, data.std,
        shuffle=False, device=setup.device,
    )
    setup.model, setup.optimizer = frs.prune(setup.model, scoring.batches(0), setup.optimizer)
    schedule = setup.scheduler.state_dict()
    setup.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(setup.optimizer, T_max=schedule["T_max"])
    setup.scheduler.load_state_dict(schedule)


def format_record(record: dict[str, Any], epochs: int) -> str:
    """One line per epoch: the numbers a user watches."""
    parts = [
        f"epoch {record['epoch']}/{epochs}",
        f"train loss {record['train_loss']:.4f}",
        f"test loss {record['test_loss']:.4f}",
        f"test acc {record['test_acc']:.2%}",
    ]
    if "sparsity" in record:
        parts.append(f"sparsity {record['sparsity']:.2%}")
    if "threshold" in record:
        parts.append(f"threshold {record['threshold']:.4g}")
    if "flops_ratio" in record:
        parts.append(f"FLOPs {record['flops_ratio']:.1%} of dense")
    parts += [f"lr {record['lr']:.4g}", f"{record['epoch_time']:.1f} s"]
    return "  ".join(parts)


def _write_metrics(path: Path, history: list[dict[str, Any]]) -> None:
    text = "".join(json.dumps(record) + "\n" for record in history)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _tensorboard(run_dir: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


def _finish(setup: Setup, dense_flops: int, log: Callable[[str], None]) -> dict[str, Any]:
    """Finalize the sparse or compact model; rank 0 writes the weights, config, report and plots."""
    options, run_dir = setup.options, setup.options.run_dir
    model = setup.model
    if setup.sparsifier is not None:
        model = setup.sparsifier.finalize()
    elif isinstance(setup.structured, GDP):
        model = setup.structured.finalize()
    test_loss, test_acc = evaluate(model, setup.test_loader)
    report = sparsity_report(model)
    final = {
        "test_loss": test_loss,
        "test_acc": test_acc,
        "sparsity": report.sparsity,
        "epochs": options.epochs,
        "flops": count_flops(model, setup.example_inputs[:1], skip_zeros=True),
        "dense_flops": dense_flops,
        "params": sum(p.numel() for p in model.parameters()),
        "nonzero_params": sum(int(torch.count_nonzero(p)) for p in model.parameters()),
    }
    if setup.ranks.main:
        from safetensors.torch import save_file

        state = {key: value.detach().contiguous().cpu() for key, value in model.state_dict().items()}
        atomic_write(run_dir / MODEL, lambda tmp: save_file(state, tmp))
        config = json.loads((run_dir / CONFIG).read_text())
        config.update(method=options.method, sparsity=options.sparsity, metrics=final)
        if setup.structured is not None:
            config["shapes"] = layer_shapes(model)
        write_json(run_dir / CONFIG, config)
        header = (
            f"# {options.model} · {options.method} · target sparsity {options.sparsity:.2%}\n\n"
            f"test accuracy {test_acc:.2%}, sparsity of prunable weights {report.sparsity:.2%}\n\n"
        )
        atomic_write(run_dir / REPORT, lambda tmp: Path(tmp).write_text(header + report.to_markdown() + "\n"))
        plot_training(setup.history, run_dir / "training.png")
        plot_layer_sparsity(report, run_dir / "layers.png")
        log(
            f"final: test acc {test_acc:.2%}  sparsity {report.sparsity:.2%}  "
            f"FLOPs {final['flops'] / dense_flops:.1%} of dense  saved to {run_dir}"
        )
    return final


def train(options: TrainOptions, resume: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume) a whole training run; return its final metrics."""
    return fit(prepare(options, resume), log)
