"""FRS: gradual channel pruning while training with feature relevance scores.

Aketi, Roy, Raghunathan and Roy, "Gradual Channel Pruning While Training Using Feature
Relevance Scores for Convolutional Neural Networks", IEEE Access 2020.

Feature relevance score of channel k of a post-ReLU activation (one "layer"), over a set of
labelled batches with classes c = 1..K:

    r_nk   = LRP alpha-beta (2, 1) relevance of the true class of sample n at channel k,
             averaged over spatial positions (:mod:`sparsetrain.structured.relevance`)
    m_ck   = mean of r_nk over the samples n of class c
    w_c    = sigmoid(1 / (acc_c / max_c' acc_c'))           (hard classes weigh more)
    s_k    = | mean_c w_c m_ck |,   score_k = s_k / ||s||_2  (within the layer)

Classes without a sample in the batches are left out of the mean. acc_c = 0 gives w_c = 1
(the limit); if every class has accuracy 0, all weights are sigmoid(1).

Candidates and coupling: a channel is a candidate when it has a post-ReLU activation, that
is a ReLU module fed by its Conv/Linear layer through batch norms and residual adds only
(:func:`~sparsetrain.structured.relevance.activation_sources`). Channels are pruned per
coupled group of :func:`~sparsetrain.structured.surgery.channel_groups` (a residual stream,
or a pointwise convolution with the depthwise one reading it); a group channel's score is
the *mean* of the scores of the group's activations at that channel (each already
L2-normalised in its layer), so a stream channel is judged over its whole depth. Each
pruning step removes the ``channels_per_step`` lowest-scoring group channels across all
groups (ties: earlier group, lower index first), always leaving at least one channel per
group; the classifier's outputs are never candidates. Channels are removed for real with
:func:`~sparsetrain.structured.surgery.remove_channels_`, in place (the public code only zeroes
them).

In place: the model object keeps its identity, its resized layers get new parameters and the
bound optimizer is re-pointed at them, so it still holds exactly the live parameters, with
its state (momentum, Adam moments) sliced to the survivors. ``step()`` returns True after a
pruning step, so a wrapper such as DDP can be rebuilt. Under torch.distributed rank 0 scores
and selects, and broadcasts its choice: every rank removes the same channels.

Schedule, in optimizer steps t counted from 1 (``step()`` advances t, then prunes when due):
pruning happens after steps prune_every, 2 prune_every, ... up to and including ``stop_at``
(ints are steps, floats fractions of ``total_steps``). Defaults are the public code's for CIFAR
ResNets, as fractions of its 200 epochs: every 21/200 of training until 150/200, removing 30 % of
the prunable channels in all unless ``channels_per_step`` is given (the public code: 120).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..modes import eval_mode
from ..report import count_flops, output_width
from ..schedules import resolve_step, validate_total_steps
from ..structured.relevance import activation_sources, relevance_and_logits
from ..structured.surgery import ChannelGroup, channel_groups, layer_shapes, remove_channels_, resize_
from .protocol import Method
from .registry import Context, MethodSpec, register_method

DEFAULT_FRACTION = 0.3  # of the prunable channels, removed over the schedule when channels_per_step is unset


def _step_value(name: str, value: object) -> int | float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}={value!r} is not allowed; allowed: an int number of steps >= 1 or a float fraction of training in (0, 1].")
    if isinstance(value, int) and value < 1 or isinstance(value, float) and not 0.0 < value <= 1.0:
        raise ValueError(f"{name}={value!r} is not allowed; allowed: an int number of steps >= 1 or a float fraction of training in (0, 1].")
    return value


@dataclass(frozen=True)
class FRSOptions:
    """``prune_every`` and ``stop_at``: int steps or float fractions of training;
    ``channels_per_step``: None for 30 % of the prunable channels spread over the steps;
    ``num_classes``: None for the width of the model's output."""

    prune_every: int | float = 21 / 200
    channels_per_step: int | None = None
    stop_at: int | float = 150 / 200
    num_classes: int | None = None

    def __post_init__(self) -> None:
        _step_value("prune_every", self.prune_every)
        _step_value("stop_at", self.stop_at)
        for name in ("channels_per_step", "num_classes"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}={value!r} is not allowed; allowed: an int >= 1.")


@dataclass(frozen=True)
class PruneSchedule:
    """Prune after steps prune_every, 2 prune_every, ... <= stop_at (steps counted from 1)."""

    prune_every: int
    stop_at: int

    def __post_init__(self) -> None:
        if self.prune_every < 1 or self.stop_at < self.prune_every:
            raise ValueError(
                f"prune_every={self.prune_every} and stop_at={self.stop_at} (in steps) leave no pruning step; "
                "allowed: 1 <= prune_every <= stop_at."
            )

    @property
    def steps(self) -> int:
        """How many pruning steps the schedule makes."""
        return self.stop_at // self.prune_every

    def done_by(self, step: int) -> int:
        """How many pruning steps the schedule has made once step ``step`` is done."""
        return min(step, self.stop_at) // self.prune_every


def class_weights(accuracy: Tensor) -> Tensor:
    """w_c = sigmoid(1 / (acc_c / max acc)) per class; 1 where acc_c = 0, sigmoid(1) if all are 0."""
    accuracy = accuracy.double()
    best = accuracy.max()
    if best <= 0:
        return torch.full_like(accuracy, torch.sigmoid(torch.tensor(1.0, dtype=torch.float64)).item())
    return torch.sigmoid(best / accuracy)  # best / 0 = inf -> 1


def layer_scores(class_relevance: Tensor, weights: Tensor) -> Tensor:
    """|mean_c w_c m_ck| / ||.||_2 for per-class mean relevances ``class_relevance`` (K, C)."""
    score = (weights.view(-1, 1) * class_relevance.double()).mean(0).abs()
    norm = score.norm()
    return score / norm if norm > 0 else score


@dataclass(frozen=True)
class _Candidate:
    """A coupled group with a score vector: its root, size and the activations scoring it."""

    group: ChannelGroup
    activations: tuple[str, ...]


def feature_relevance_scores(
    model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], num_classes: int, class_accuracy: Tensor | None = None
) -> dict[str, Tensor]:
    """Feature relevance scores of ``model`` on ``batches``: for each post-ReLU activation (ReLU
    module name) a float64 vector (C,), non-negative with L2 norm 1 (all zeros if the layer has
    no relevance at all). ``class_accuracy`` (K,) defaults to the accuracy per class of the model
    (eval mode) on the same batches."""
    k = num_classes
    sums: dict[str, Tensor] = {}
    counts = torch.zeros(k, dtype=torch.float64)
    correct = torch.zeros(k, dtype=torch.float64)
    for x, y in batches:
        y = y.long()
        bad = y[(y < 0) | (y >= k)]
        if bad.numel():
            raise ValueError(f"label {int(bad[0])} is out of range; allowed: class indices 0 to {k - 1}.")
        relevance, logits = relevance_and_logits(model, x, y)
        onehot = nn.functional.one_hot(y, k).double()
        for name, r in relevance.items():
            sums[name] = sums.get(name, 0) + onehot.T @ r.double()
        counts += onehot.sum(0).cpu()
        correct += (onehot * (logits.argmax(1) == y).double().unsqueeze(1)).sum(0).cpu()
    if not counts.sum():
        raise ValueError("the scoring batches yielded no samples; allowed: at least one labelled batch.")
    present = counts > 0
    if class_accuracy is None:
        accuracy = correct[present] / counts[present]
    else:
        if class_accuracy.shape != (k,):
            raise ValueError(f"class_accuracy has shape {tuple(class_accuracy.shape)}; allowed: ({k},), one per class.")
        accuracy = class_accuracy.detach().double().cpu()[present]
    weights = class_weights(accuracy)
    return {
        name: layer_scores((total.cpu() / counts.unsqueeze(1).clamp(min=1))[present], weights)
        for name, total in sums.items()
    }


def candidates(model: nn.Module, example_inputs: Tensor) -> list[_Candidate]:
    """Prunable groups that have at least one post-ReLU activation of their own width."""
    sources = activation_sources(model, example_inputs)
    widths = {name: output_width(model.get_submodule(name)) for name in {s for v in sources.values() for s in v}}
    found = []
    for group in channel_groups(model, example_inputs):
        writers = set(group.layers)
        activations = tuple(
            act for act, layers in sources.items()
            if writers.intersection(layers) and all(widths[s] == group.channels for s in layers)
        )
        if activations and group.channels > 1:
            found.append(_Candidate(group, activations))
    return found


def select_lowest(scores: Mapping[str, Tensor], found: list[_Candidate], count: int) -> list[int]:
    """The ``count`` lowest-scoring group channels (ties: earlier group, lower index first), each
    group keeping one, as flat indices into the concatenated channels of ``found``."""
    group_scores = [torch.stack([scores[a] for a in c.activations]).mean(0) for c in found]
    offsets = [0]
    for c in found:
        offsets.append(offsets[-1] + c.group.channels)
    left = [c.group.channels for c in found]
    owner = torch.cat([torch.full((len(s),), i) for i, s in enumerate(group_scores)]).tolist()
    chosen: list[int] = []
    for index in torch.argsort(torch.cat(group_scores), stable=True).tolist():
        if len(chosen) == count:
            break
        if left[owner[index]] > 1:
            left[owner[index]] -= 1
            chosen.append(index)
    return sorted(chosen)


def _as_drop(flat: list[int], found: list[_Candidate]) -> dict[str, list[int]]:
    """{root layer: channel indices} of flat indices into the concatenated candidate channels."""
    drop: dict[str, list[int]] = {}
    offset = 0
    for c in found:
        picked = [i - offset for i in flat if offset <= i < offset + c.group.channels]
        if picked:
            drop[c.group.root] = picked
        offset += c.group.channels
    return drop


def _rank0_choice(flat: list[int], count: int) -> list[int]:
    """Under torch.distributed, every rank takes rank 0's choice."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return flat
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    values = torch.tensor(flat if dist.get_rank() == 0 else [0] * count, dtype=torch.int64, device=device)
    dist.broadcast(values, src=0)
    return values.tolist()


class FRS(Method):
    """Gradual channel pruning with feature relevance scores, during training, in place.

    ``data`` is a re-iterable of labelled batches the relevance is scored on (e.g. the training
    set, unaugmented); ``example_inputs`` a small batch on the model's device to trace it.
    """

    name = "frs"

    def __init__(
        self,
        model: nn.Module,
        total_steps: int,
        example_inputs: Tensor,
        data: Iterable[tuple[Tensor, Tensor]],
        *,
        prune_every: int | float = 21 / 200,
        channels_per_step: int | None = None,
        stop_at: int | float = 150 / 200,
        num_classes: int | None = None,
    ) -> None:
        super().__init__()
        self.options = FRSOptions(prune_every, channels_per_step, stop_at, num_classes)
        validate_total_steps(total_steps)
        if not isinstance(example_inputs, Tensor):
            raise ValueError(f"example_inputs={example_inputs!r} is not allowed; allowed: a tensor batch the model accepts.")
        self.model = model
        self.example_inputs = example_inputs
        self.data = data
        self.schedule = PruneSchedule(  # fractions floor to whole steps, at least one
            max(1, resolve_step(prune_every, total_steps, "prune_every")),
            max(1, resolve_step(stop_at, total_steps, "stop_at")),
        )
        with torch.no_grad(), eval_mode(model):
            self.num_classes = num_classes or int(model(example_inputs).shape[-1])
        self.dense_flops = count_flops(model, example_inputs[:1])
        prunable = self.prunable()
        steps = self.schedule.steps
        self.channels_per_step = channels_per_step or max(1, round(DEFAULT_FRACTION * prunable / steps))
        if self.channels_per_step * steps > prunable:
            raise ValueError(
                f"channels_per_step={self.channels_per_step} over {steps} pruning steps removes "
                f"{self.channels_per_step * steps} channels, but {type(model).__name__} has {prunable} prunable; "
                f"allowed: channels_per_step <= {prunable // steps}."
            )
        self._step = 0
        self.removals: list[dict[str, list[int]]] = []

    # -- reading the state -------------------------------------------------------------

    @property
    def step_count(self) -> int:
        return self._step

    @property
    def prunes_done(self) -> int:
        return len(self.removals)

    @property
    def channels_removed(self) -> int:
        return sum(len(indices) for drop in self.removals for indices in drop.values())

    def prunable(self) -> int:
        """How many channels can still be pruned: group channels minus one per candidate group."""
        return sum(c.group.channels - 1 for c in candidates(self.model, self.example_inputs))

    def scores(self, batches: Iterable[tuple[Tensor, Tensor]] | None = None) -> dict[str, Tensor]:
        """Feature relevance scores of the model on ``batches`` (default: ``data``)."""
        return feature_relevance_scores(self.model, self.data if batches is None else batches, self.num_classes)

    def metrics(self) -> dict[str, float]:
        return {"flops_ratio": count_flops(self.model, self.example_inputs[:1]) / self.dense_flops}

    # -- changing the state ------------------------------------------------------------

    def step(self) -> bool:
        """Advance t; after steps prune_every, 2 prune_every, ... <= stop_at remove the
        ``channels_per_step`` lowest-scoring channels in place. True when channels were removed."""
        self._check_attached()
        self._step += 1
        if self.prunes_done >= self.schedule.done_by(self._step):
            return False
        self.prune()
        return True

    def prune(self) -> dict[str, list[int]]:
        """Score the model on ``data``, remove the ``channels_per_step`` lowest channels in place
        (the optimizer's state follows); return the removed {root layer: channel indices}."""
        found = candidates(self.model, self.example_inputs)
        available = sum(c.group.channels - 1 for c in found)
        count = self.channels_per_step
        if count > available:
            raise ValueError(
                f"channels_per_step={count} exceeds the {available} channels still prunable in "
                f"{type(self.model).__name__}; allowed: at most {available} (every group keeps one channel)."
            )
        rank0 = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
        flat = select_lowest(self.scores(), found, count) if rank0 else []
        drop = _as_drop(_rank0_choice(flat, count), found)
        remove_channels_(self.model, drop, self.example_inputs, self.optimizer)
        self.removals.append(drop)
        return drop

    # -- state -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The step, each pruning step's removals ({root layer: channel indices} of the model at
        that step) and the widths of the model now (JSON-ready)."""
        return {
            "method": self.name,
            "step": self._step,
            "channels_per_step": self.channels_per_step,
            "removals": [{root: list(indices) for root, indices in drop.items()} for drop in self.removals],
            "shapes": layer_shapes(self.model),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the schedule position and give the model the saved widths, in place (its
        weights become zeros until the model's own state dict is loaded)."""
        self._check_attached()
        expected = set(self.state_dict())
        if set(state) != expected or state["method"] != self.name:
            raise ValueError(f"this state has keys {sorted(state)}; allowed: an FRS state with exactly {sorted(expected)}.")
        if state["channels_per_step"] != self.channels_per_step:
            raise ValueError(
                f"the saved FRS state has channels_per_step={state['channels_per_step']!r} but this FRS has "
                f"{self.channels_per_step!r}; allowed: the settings of the run being resumed."
            )
        removals = [{str(root): [int(i) for i in indices] for root, indices in drop.items()} for drop in state["removals"]]
        if len(removals) != self.schedule.done_by(int(state["step"])):
            raise ValueError(f"the saved FRS state made {len(removals)} pruning steps by step {state['step']}, "
                             f"but this schedule makes {self.schedule.done_by(int(state['step']))}; allowed: the same schedule.")
        resize_(self.model, state["shapes"], self.optimizer)
        self._step = int(state["step"])
        self.removals = removals


def _build(model: nn.Module, options: FRSOptions, context: Context) -> FRS:
    return FRS(
        model, context.total_steps, context.need_example_inputs("frs"), context.need_data("frs"),
        prune_every=options.prune_every, channels_per_step=options.channels_per_step,
        stop_at=options.stop_at, num_classes=options.num_classes,
    )


register_method(MethodSpec(
    "frs", FRSOptions, _build,
    "gradual channel pruning by feature relevance scores (LRP alpha-beta) at fixed intervals (IEEE Access 2020)",
    recipe="frs",
))
