"""The training loop as a library function: the seed papers' CIFAR recipe with any method.

Every method is driven through the protocol of :mod:`sparsetrain.methods` and nothing else:
``create`` before the optimizer, ``bind``, ``before_optimizer_step`` and ``step`` around each
optimizer step, ``finalize`` at the end, ``state_dict`` in every checkpoint.

Under ``torchrun`` the run is data-parallel (DDP, or FSDP2's ``fully_shard`` with ``fsdp``: every
Linear and Conv2d layer and the root sharded after ``create()``, checkpoints and the final model
gathered whole, so a run folder reads the same either way): the method keeps every rank's thresholds,
masks and removed channels the same, the DDP wrapper is rebuilt when ``step()`` reports new
shapes, and only rank 0 writes files.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..data import BatchLoader, ImageDataset, load_dataset
from ..inference import load_model_state
from ..measure import count_flops, param_counts
from ..methods import Method, create, method_options, method_spec
from ..models import create_model
from ..modes import eval_mode
from ..prunable import is_sharded
from ..report import sparsity_report
from .checkpoint import first_non_finite
from .folder import CHECKPOINT, CONFIG, LAYERS_PLOT, REPORT, TRAINING_PLOT, RunFolder, changed_shapes
from .options import TrainOptions, resolve_device

EVAL_BATCH_SIZE = 256


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
        """Join the torchrun job, if any; each rank on its own GPU (LOCAL_RANK) under CUDA."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size == 1:
            return Distributed()
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return Distributed(dist.get_rank(), dist.get_world_size())


@dataclass
class Setup:
    """Everything a run needs, built and validated before the first step."""

    options: TrainOptions
    folder: RunFolder
    device: torch.device
    ranks: Distributed
    data: ImageDataset
    train_loader: BatchLoader
    test_loader: BatchLoader
    scoring: BatchLoader
    model: nn.Module
    method: Method
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    example_inputs: torch.Tensor
    start_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    notice: str | None = None  # said once when fitting starts


def method_title(name: str, given: dict[str, Any]) -> str:
    """The method and the value of its target option, e.g. "feather · sparsity 0.9", "sr-ste · nm 2:4"."""
    target = method_spec(name).target
    if target is None:
        return name
    value = getattr(method_options(name, **given), target)
    shown = format(value, "g") if isinstance(value, (int, float)) else str(value)  # an N:M pattern as "2:4"
    return f"{name} · {target} {shown}"


def model_record(options: TrainOptions, num_classes: int) -> dict[str, Any]:
    """The model's constructor call, enough to rebuild it: {"name": ..., "kwargs": {...}}."""
    return {"name": options.model, "kwargs": {**options.model_args, "num_classes": num_classes}}


def prepare(options: TrainOptions, resume: bool = False) -> Setup:
    """Validate inputs, build data, model, method, optimizer and schedule; create or reopen the run folder.

    Every usage error (bad option, missing data, existing run folder, a folder another process
    trains in) is a ValueError raised here, before anything is written. From here the run folder
    is locked (rank 0) until :func:`fit` ends.
    """
    folder = RunFolder(options.run_dir)
    if resume:
        _check_resumable(options, folder)
    elif folder.exists():
        raise ValueError(f"run folder {folder.path} already exists; allowed: --resume to continue it, or a new --name.")
    device = resolve_device(options.device)
    if options.workers:
        torch.set_num_threads(options.workers)
    data = load_dataset(options.dataset, options.data_dir)
    ranks = Distributed.from_environment(device)
    if ranks.world_size > 1 and device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())  # this rank's GPU
    if resume and ranks.main:
        folder.lock()  # before anything in the folder is read or removed
    try:
        return _prepare(options, folder, device, ranks, data, resume)
    except BaseException:
        folder.unlock()
        raise


def _prepare(options: TrainOptions, folder: RunFolder, device: torch.device, ranks: Distributed, data: ImageDataset,
             resume: bool) -> Setup:
    restart = resume and not folder.has_checkpoint()
    if resume and ranks.main:
        folder.remove_leftovers()
        if restart:
            folder.check_start_over()
    state = folder.load_checkpoint(device) if resume and not restart else None
    torch.manual_seed(options.seed)
    record = model_record(options, data.num_classes)
    model = create_model(record["name"], **record["kwargs"]).to(device)
    x_train, y_train = data.x_train[: options.limit], data.y_train[: options.limit]
    train_loader = BatchLoader(
        x_train, y_train, options.batch_size, data.mean, data.std, augment=True, seed=options.seed,
        rank=ranks.rank, world_size=ranks.world_size, device=device,
    )
    test_loader = BatchLoader(data.x_test, data.y_test, EVAL_BATCH_SIZE, data.mean, data.std, shuffle=False, device=device)
    # Methods that score the model (FRS) see the training set augmented as in training, fresh each epoch.
    scoring = BatchLoader(x_train, y_train, EVAL_BATCH_SIZE, data.mean, data.std, shuffle=False, augment=True,
                          seed=options.seed, device=device)
    total_steps = options.epochs * len(train_loader)
    example_inputs = data.x_test[:2].float().to(device)  # shape and device are what tracing needs
    method_options = options.method_options(len(train_loader))
    method = create(model, options.method, total_steps=total_steps, example_inputs=example_inputs, data=scoring,
                    **method_options)
    if options.fsdp:
        _shard(model, ranks)
    optimizer = make_optimizer(model, options)
    method.bind(optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_factor, options, len(train_loader)))
    setup = Setup(options, folder, device, ranks, data, train_loader, test_loader, scoring, model, method, optimizer,
                  scheduler, example_inputs)
    if state is not None:
        _restore(setup, state)
    elif ranks.main:
        if restart:  # stopped before its first checkpoint: only config.json and TensorBoard events to remove
            folder.start_over()
            setup.notice = f"{folder.path} has no checkpoint yet (stopped before its first epoch ended): starting the run over"
        folder.create({
            "options": options.record(),
            "model": record,
            "method": {"name": options.method, "options": method_options},
            "total_steps": total_steps,
        })
    return setup


def _shard(model: nn.Module, ranks: Distributed) -> None:
    """FSDP2 over the torchrun job: every Linear and Conv2d layer sharded, then the root."""
    from torch.distributed.fsdp import fully_shard

    if ranks.world_size < 2:
        raise ValueError("--fsdp shards the model across torchrun's processes; allowed: torchrun with 2 or more "
                         "processes, or no --fsdp.")
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            fully_shard(module)
    fully_shard(model)


def make_optimizer(model: nn.Module, options: TrainOptions) -> torch.optim.SGD:
    """SGD with weight decay on conv/linear weights only (none on 1-D parameters: batch norms,
    biases, GDP's gates)."""
    groups = [
        {"params": [p for p in model.parameters() if p.ndim > 1], "weight_decay": options.wd},
        {"params": [p for p in model.parameters() if p.ndim <= 1], "weight_decay": 0.0},
    ]
    return torch.optim.SGD(groups, lr=options.lr, momentum=options.momentum)


def lr_factor(options: TrainOptions, steps_per_epoch: int, step: int) -> float:
    """The learning rate at optimizer step t as a fraction of ``lr``: a linear warm-up over the
    first ``warmup`` epochs, (t + 1) / W, times the schedule: cosine, (1 + cos(pi t / T)) / 2 over
    all T steps, or multistep, gamma^(milestones passed), milestones in epochs."""
    total = options.epochs * steps_per_epoch
    warmup = options.warmup * steps_per_epoch
    factor = min(1.0, (step + 1) / warmup) if warmup else 1.0
    if options.lr_schedule == "cosine":
        return factor * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
    return factor * options.gamma ** sum(step >= m * steps_per_epoch for m in options.milestones)


def _check_resumable(options: TrainOptions, folder: RunFolder) -> None:
    """A run folder (config.json at least) whose saved options are these, except where it lies
    (``out``, ``name``: a moved or renamed folder is the same run) and how it runs."""
    if not folder.has_config():
        raise ValueError(f"cannot resume {folder.path}: it has no {CONFIG}; allowed: a run folder.")
    saved = folder.saved_options()
    given = options.record()
    for key in {**given, **saved}:  # a key absent on one side reads as None there
        value = given.get(key)
        if key not in ("device", "workers", "out", "name") and saved.get(key) != value:
            raise ValueError(
                f"option {key}={value!r} differs from the run's saved {saved.get(key)!r}; "
                "allowed: the options the run was started with."
            )


def _restore(setup: Setup, state: Any) -> None:
    """The protocol's resume order: the method first (it may resize the model), then the model,
    optimizer and schedule. A checkpoint that does not fit this run is a ValueError naming what."""
    where = setup.folder.file(CHECKPOINT)
    missing = sorted(CHECKPOINT_KEYS - set(state)) if isinstance(state, dict) else sorted(CHECKPOINT_KEYS)
    if missing:
        raise ValueError(f"{where} has no {missing[0]!r}; allowed: a checkpoint sparsetrain wrote.")
    epoch, rng, history = state["epoch"], state["rng"], state["history"]
    if isinstance(epoch, bool) or not isinstance(epoch, int) or not 0 <= epoch <= setup.options.epochs:
        raise ValueError(f"{where} is at epoch {epoch!r}; allowed: 0 to the run's {setup.options.epochs} epochs.")
    if not isinstance(rng, torch.Tensor) or rng.dtype != torch.uint8 or not isinstance(history, list):
        raise ValueError(f"{where} holds an rng state or history of the wrong type; allowed: a checkpoint sparsetrain wrote.")
    if not isinstance(state["model"], dict) or not isinstance(state["method"], dict):
        raise ValueError(f"{where} holds no model or method state; allowed: a checkpoint sparsetrain wrote.")
    bad = first_non_finite(state["model"])
    if bad is not None:
        raise ValueError(f"the checkpoint's {bad} holds NaN or infinite values; allowed: a checkpoint of finite weights.")
    parts = [("method", setup.method.load_state_dict), ("model", partial(load_model_state, setup.model)),
             ("optimizer", setup.optimizer.load_state_dict), ("scheduler", setup.scheduler.load_state_dict)]
    if setup.options.fsdp:  # model and optimizer into the shards together; the method then reads its ties off the weights
        parts = [("model", partial(_set_whole_states, setup, optimizer_state=state["optimizer"])),
                 ("method", setup.method.load_state_dict), ("scheduler", setup.scheduler.load_state_dict)]
    for key, load in parts:
        try:
            load(state[key])
        except (KeyError, IndexError, TypeError, AttributeError, RuntimeError, ValueError) as error:
            detail = str(error).strip().splitlines()
            raise ValueError(f"the {key} state in {where} does not fit this run ({detail[-1] if detail else type(error).__name__}).") from None
    torch.set_rng_state(rng.cpu())
    setup.start_epoch = epoch
    setup.history = list(history)


CHECKPOINT_KEYS = frozenset({"epoch", "model", "optimizer", "scheduler", "method", "rng", "history"})


def _diverged(step: int, loss: torch.Tensor, model: nn.Module) -> str:
    """The one line a non-finite loss ends the run with."""
    bad = first_non_finite(model.state_dict())
    where = f"{bad} holds NaN or infinite values" if bad else "every weight is still finite"
    return (f"step {step}: the loss is {loss.item()} ({where}); allowed: a finite loss (lower the learning rate "
            "or clip gradients); the last good checkpoint is kept.")


def _whole_states(setup: Setup) -> tuple[dict[str, Any], dict[str, Any]]:
    """The model's and optimizer's states; under FSDP gathered whole on every rank (every rank calls)."""
    if not setup.options.fsdp:
        return setup.model.state_dict(), setup.optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(setup.model, setup.optimizer, options=StateDictOptions(full_state_dict=True))


def _set_whole_states(setup: Setup, model_state: dict[str, Any], optimizer_state: dict[str, Any]) -> None:
    """Load whole model and optimizer states (of :func:`_whole_states`, read by every rank) into the shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(setup.model, setup.optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state,
                   options=StateDictOptions(full_state_dict=True))


def _whole_tensors(tree: Any) -> Any:
    """``tree`` (dicts and lists) with every DTensor gathered whole (every rank calls)."""
    if is_sharded(tree):
        return tree.full_tensor()
    if isinstance(tree, dict):
        return {key: _whole_tensors(value) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_whole_tensors(value) for value in tree)
    return tree


def _checkpoint_state(setup: Setup, epoch: int) -> dict[str, Any]:
    model, optimizer = _whole_states(setup)
    return {
        "epoch": epoch,
        "model": model,
        "optimizer": optimizer,
        "scheduler": setup.scheduler.state_dict(),
        "method": _whole_tensors(setup.method.state_dict()) if setup.options.fsdp else setup.method.state_dict(),
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


def _wrap(model: nn.Module, ranks: Distributed, fsdp: bool) -> nn.Module:
    return DistributedDataParallel(model) if ranks.world_size > 1 and not fsdp else model


def fit(setup: Setup, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train from ``setup.start_epoch`` to the end, checkpointing every epoch; return the final
    metrics. The run folder's lock is released however it ends."""
    try:
        return _fit(setup, log)
    finally:
        setup.folder.unlock()


def _fit(setup: Setup, log: Callable[[str], None]) -> dict[str, Any]:
    options, ranks, method, model, optimizer = setup.options, setup.ranks, setup.method, setup.model, setup.optimizer
    writer = setup.folder.tensorboard() if ranks.main else None
    show_progress = ranks.main and sys.stderr.isatty()
    record = model_record(options, setup.data.num_classes)
    dense = create_model(record["name"], **record["kwargs"])  # the registered model, for FLOPs and widths
    net = _wrap(model, ranks, options.fsdp)
    if setup.notice:
        log(setup.notice)
    for epoch in range(setup.start_epoch, options.epochs):
        start = time.perf_counter()
        model.train()
        setup.scoring.set_epoch(epoch)
        loss_sum = torch.zeros((), device=setup.device)
        label = f"epoch {epoch + 1}/{options.epochs}"
        batches = _progress(setup.train_loader.batches(epoch), len(setup.train_loader), show_progress, label)
        for index, (x, y) in enumerate(batches):
            loss = F.cross_entropy(net(x), y, label_smoothing=options.label_smoothing)
            if not bool(torch.isfinite(loss)):  # stop here: the last checkpoint is the last good state
                raise FloatingPointError(_diverged(epoch * len(setup.train_loader) + index + 1, loss, model))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), options.clip)  # the loss's gradient only:
            method.before_optimizer_step()  # the method's own (GDP's penalty) is added unclipped
            optimizer.step()
            setup.scheduler.step()
            if method.step():  # parameter shapes changed: DDP must see the new ones
                net = _wrap(model, ranks, options.fsdp)
            loss_sum += loss.detach()
        train_loss = _mean_over_ranks(loss_sum / len(setup.train_loader), ranks)
        train_time = time.perf_counter() - start
        _share_buffers(model, ranks)
        test_loss, test_acc = evaluate(model, setup.test_loader)
        entry = {
            "epoch": epoch + 1,
            "train_loss": train_loss,
            "test_loss": test_loss,
            "test_acc": test_acc,
            "lr": setup.scheduler.get_last_lr()[0],
            "train_time": train_time,
            **method.metrics(),
            "epoch_time": time.perf_counter() - start,
        }
        setup.history.append(entry)
        state = _checkpoint_state(setup, epoch + 1) if ranks.main or options.fsdp else None  # FSDP: every rank gathers
        bad = first_non_finite(state["model"] if state is not None else model.state_dict())
        if bad is not None:
            raise FloatingPointError(f"epoch {epoch + 1}: {bad} holds NaN or infinite values; allowed: finite weights "
                                     "(lower the learning rate or clip gradients); the last good checkpoint is kept.")
        if ranks.main:
            setup.folder.save_checkpoint(state)
            setup.folder.write_metrics(setup.history)
            log(format_record(entry, options.epochs))
            if writer is not None:
                writer.add(entry, epoch + 1)
    if writer is not None:
        writer.close()
    return _finish(setup, dense, log)


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


def _finish(setup: Setup, dense: nn.Module, log: Callable[[str], None]) -> dict[str, Any]:
    """Finalize the method; rank 0 writes the plain weights, config, report and plots. ``dense``
    is the registered model the FLOPs and widths are compared with."""
    options, folder = setup.options, setup.folder
    dense_flops = count_flops(dense, setup.example_inputs[:1].cpu())
    model = setup.method.finalize()
    if options.fsdp:  # the finalized shards gathered into a plain model, on every rank
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        record = model_record(options, setup.data.num_classes)
        plain = create_model(record["name"], **record["kwargs"]).to(setup.device)
        plain.load_state_dict(get_model_state_dict(model, options=StateDictOptions(full_state_dict=True)))
        model = plain
    test_loss, test_acc = evaluate(model, setup.test_loader)
    report = sparsity_report(model)
    params, nonzero_params = param_counts(model)
    final = {
        "test_loss": test_loss,
        "test_acc": test_acc,
        "sparsity": report.sparsity,
        "epochs": options.epochs,
        "flops": count_flops(model, setup.example_inputs[:1], skip_zeros=True),
        "dense_flops": dense_flops,
        "params": params,
        "nonzero_params": nonzero_params,
    }
    if setup.ranks.main:
        folder.write_model(model)
        folder.update_config(metrics=final, shapes=changed_shapes(model, dense))
        title = f"# {options.model} · {method_title(options.method, options.method_options(len(setup.train_loader)))}"
        header = f"{title}\n\ntest accuracy {test_acc:.2%}, sparsity of prunable weights {report.sparsity:.2%}\n\n"
        folder.write_text(REPORT, header + report.to_markdown() + "\n")
        from .plots import plot_layer_sparsity, plot_training  # matplotlib: half a second to import, at the end only

        plot_training(setup.history, folder.file(TRAINING_PLOT))
        plot_layer_sparsity(report, folder.file(LAYERS_PLOT))
        log(
            f"final: test acc {test_acc:.2%}  sparsity {report.sparsity:.2%}  "
            f"FLOPs {final['flops'] / dense_flops:.1%} of dense  saved to {folder.path}"
        )
    return final


def train(options: TrainOptions, resume: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume) a whole training run; return its final metrics."""
    return fit(prepare(options, resume), log)
