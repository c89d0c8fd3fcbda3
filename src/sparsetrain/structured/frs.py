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
:func:`~sparsetrain.structured.surgery.remove_channels` (the public code only zeroes them).

Schedule: epochs are counted from 1 (``should_prune(epoch)`` is asked after epoch ``epoch``
has been trained); pruning happens after epochs prune_every, 2 prune_every, ... up to and
including ``stop_at``. Defaults are those of the public code for CIFAR ResNets over 200
epochs: every 21 epochs, 120 channels per step, until epoch 150 (so after 21, ..., 147).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..modes import eval_mode
from ..report import output_width
from .relevance import activation_sources, relevance_and_logits
from .surgery import ChannelGroup, channel_groups, remove_channels


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} is not allowed; allowed: an int >= 1.")
    return value


@dataclass(frozen=True)
class PruneSchedule:
    """Prune after epochs prune_every, 2 prune_every, ... <= stop_at (epochs counted from 1)."""

    prune_every: int = 21
    channels_per_step: int = 120
    stop_at: int = 150

    def __post_init__(self) -> None:
        for name in ("prune_every", "channels_per_step", "stop_at"):
            _positive_int(name, getattr(self, name))
        if self.stop_at < self.prune_every:
            raise ValueError(
                f"stop_at={self.stop_at} comes before the first pruning epoch prune_every={self.prune_every}; "
                "allowed: stop_at >= prune_every."
            )

    def due(self, epoch: int) -> bool:
        """Whether the schedule prunes after epoch ``epoch`` (1-based)."""
        return epoch % self.prune_every == 0 and 0 < epoch <= self.stop_at

    def step_of(self, epoch: int) -> int:
        """How many pruning steps the schedule has made once epoch ``epoch`` is done."""
        return min(epoch, self.stop_at) // self.prune_every


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


class FRS:
    """Gradual channel pruning with feature relevance scores, during training.

    Typical use (epochs counted from 1)::

        frs = FRS(model, example_inputs=x[:2])
        for epoch in range(1, epochs + 1):
            train_one_epoch(model, optimizer)
            if frs.should_prune(epoch):
                model, optimizer = frs.prune(model, loader.batches(epoch), optimizer)
                scheduler.optimizer = optimizer  # an LR scheduler must follow the new optimizer

    Defaults are the public code's for CIFAR ResNets over 200 epochs (every 21 epochs, 120
    channels per step, until epoch 150). ``example_inputs`` (a small batch on the model's
    device) is used to trace the model; ``num_classes`` defaults to the width of the model's
    output. ``frs.model`` is the model
    last pruned (or given), the one :meth:`scores` uses.
    """

    def __init__(
        self,
        model: nn.Module,
        prune_every: int = 21,
        channels_per_step: int = 120,
        stop_at: int = 150,
        *,
        example_inputs: Tensor,
        num_classes: int | None = None,
    ) -> None:
        self.schedule = PruneSchedule(prune_every, channels_per_step, stop_at)
        if not isinstance(example_inputs, Tensor):
            raise ValueError(f"example_inputs={example_inputs!r} is not allowed; allowed: a tensor batch the model accepts.")
        self.example_inputs = example_inputs
        if num_classes is None:
            with torch.no_grad(), eval_mode(model):
                num_classes = int(model(example_inputs).shape[-1])
        self.num_classes = _positive_int("num_classes", num_classes)
        self.model = model
        self.prunes_done = 0
        self.channels_removed = 0
        self.removals: list[dict[str, list[int]]] = []

    # -- scores ------------------------------------------------------------------------

    def scores(self, loader_batches: Iterable[tuple[Tensor, Tensor]],
               class_accuracy: Tensor | None = None) -> dict[str, Tensor]:
        """Feature relevance scores of :attr:`model` on ``loader_batches``: for each post-ReLU
        activation (ReLU module name) a float64 vector (C,), non-negative with L2 norm 1
        (all zeros if the layer has no relevance at all).

        ``class_accuracy`` (K,) defaults to the accuracy per class of the model (eval mode) on
        the same batches.
        """
        return self._scores(self.model, loader_batches, class_accuracy)

    def _scores(self, model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]],
                class_accuracy: Tensor | None) -> dict[str, Tensor]:
        k = self.num_classes
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
            raise ValueError("loader_batches yielded no samples; allowed: at least one labelled batch.")
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

    # -- candidates --------------------------------------------------------------------

    def _candidates(self, model: nn.Module) -> list[_Candidate]:
        """Prunable groups that have at least one post-ReLU activation of their own width."""
        sources = activation_sources(model, self.example_inputs)
        widths = {name: output_width(model.get_submodule(name)) for name in {s for v in sources.values() for s in v}}
        candidates = []
        for group in channel_groups(model, self.example_inputs):
            writers = set(group.layers)
            activations = tuple(
                act for act, layers in sources.items()
                if writers.intersection(layers) and all(widths[s] == group.channels for s in layers)
            )
            if activations and group.channels > 1:
                candidates.append(_Candidate(group, activations))
        return candidates

    def prunable(self, model: nn.Module | None = None) -> int:
        """How many channels can still be pruned: group channels minus one per candidate group."""
        return sum(c.group.channels - 1 for c in self._candidates(self.model if model is None else model))

    @staticmethod
    def _select(scores: Mapping[str, Tensor], candidates: list[_Candidate], count: int) -> dict[str, list[int]]:
        """The ``count`` lowest-scoring group channels, as {root layer: sorted channel indices}."""
        group_scores = [torch.stack([scores[a] for a in c.activations]).mean(0) for c in candidates]
        flat = torch.cat(group_scores)
        owner = torch.cat([torch.full((len(s),), i) for i, s in enumerate(group_scores)])
        channel = torch.cat([torch.arange(len(s)) for s in group_scores])
        left = [c.group.channels for c in candidates]
        chosen: dict[str, list[int]] = {}
        for index in torch.argsort(flat, stable=True).tolist():
            if count == 0:
                break
            i = int(owner[index])
            if left[i] > 1:
                left[i] -= 1
                chosen.setdefault(candidates[i].group.root, []).append(int(channel[index]))
                count -= 1
        return {root: sorted(indices) for root, indices in chosen.items()}

    # -- the schedule ------------------------------------------------------------------

    def should_prune(self, epoch: int) -> bool:
        """True after epochs prune_every, 2 prune_every, ... <= stop_at (1-based), unless that
        step was already made (so a resumed run does not prune twice)."""
        return self.schedule.due(epoch) and self.prunes_done < self.schedule.step_of(epoch)

    def prune(self, model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]],
              optimizer: torch.optim.Optimizer) -> tuple[nn.Module, torch.optim.Optimizer]:
        """Score ``model`` on ``batches``, remove the ``channels_per_step`` lowest channels and
        return (compact model, optimizer rebuilt for it).

        The optimizer is rebuilt with the same class, defaults and param-group options (the
        parameters are matched by name), and its per-parameter state (momentum, Adam moments)
        is carried over at the surviving indices. Neither ``model`` nor ``optimizer`` is
        changed; if fewer channels are prunable than requested, or the optimizer holds tensors
        that are not the model's parameters, ``ValueError`` is raised before any work.
        """
        count = self.schedule.channels_per_step
        _parameter_names(optimizer, model)
        candidates = self._candidates(model)
        available = sum(c.group.channels - 1 for c in candidates)
        if count > available:
            raise ValueError(
                f"channels_per_step={count} exceeds the {available} channels still prunable in "
                f"{type(model).__name__}; allowed: at most {available} (every group keeps one channel)."
            )
        drop = self._select(self._scores(model, batches, None), candidates, count)
        compact = remove_channels(model, drop, self.example_inputs)
        new_optimizer = rebuild_optimizer(optimizer, model, compact, surviving_indices(model, drop, self.example_inputs))
        self.model = compact
        self.prunes_done += 1
        self.channels_removed += count
        self.removals.append(drop)
        return compact, new_optimizer

    # -- state -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The schedule position (JSON-ready): pruning steps made, channels removed and each
        step's removals ({root layer: channel indices} of the model at that step).

        To resume, the caller also saves the compact model's weights with its widths
        (:func:`~sparsetrain.structured.surgery.layer_shapes`, rebuilt with
        :func:`~sparsetrain.structured.surgery.rebuild`) and the optimizer returned by the last
        :meth:`prune`, then builds ``FRS(rebuilt_model, ...)`` with the same settings and calls
        :meth:`load_state_dict`.
        """
        return {
            "prune_every": self.schedule.prune_every,
            "channels_per_step": self.schedule.channels_per_step,
            "stop_at": self.schedule.stop_at,
            "prunes_done": self.prunes_done,
            "channels_removed": self.channels_removed,
            "removals": [{root: list(indices) for root, indices in drop.items()} for drop in self.removals],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the schedule position saved by :meth:`state_dict` (same settings required)."""
        expected = set(self.state_dict())
        if set(state) != expected:
            raise ValueError(f"FRS state has keys {sorted(state)}; allowed: exactly {sorted(expected)}.")
        for name in ("prune_every", "channels_per_step", "stop_at"):
            if state[name] != getattr(self.schedule, name):
                raise ValueError(
                    f"the saved FRS state has {name}={state[name]!r} but this FRS has {getattr(self.schedule, name)!r}; "
                    "allowed: the settings of the run being resumed."
                )
        removals = [{str(root): [int(i) for i in indices] for root, indices in drop.items()} for drop in state["removals"]]
        if len(removals) != state["prunes_done"] or sum(sum(map(len, d.values())) for d in removals) != state["channels_removed"]:
            raise ValueError("the saved FRS state is inconsistent: prunes_done and channels_removed must match removals.")
        self.prunes_done = int(state["prunes_done"])
        self.channels_removed = int(state["channels_removed"])
        self.removals = removals


def surviving_indices(model: nn.Module, drop: Mapping[str, list[int]], example_inputs: Tensor) -> dict[str, Tensor]:
    """For each parameter of ``remove_channels(model, drop, ...)``, by name, the flat indices
    into the original parameter of its surviving entries (found by cutting a copy whose
    parameters hold their own flat indices, in float64 so indices stay exact)."""
    tagged = copy.deepcopy(model).double()
    with torch.no_grad():
        for param in tagged.parameters():
            param.copy_(torch.arange(param.numel(), dtype=torch.float64, device=param.device).view_as(param))
    cut = remove_channels(tagged, drop, example_inputs.double())
    return {name: param.detach().flatten().long() for name, param in cut.named_parameters()}


def _parameter_names(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[Tensor, str]:
    """The model's parameters by name; ``ValueError`` if the optimizer holds anything else."""
    names = {param: name for name, param in model.named_parameters()}
    for group in optimizer.param_groups:
        unknown = [p for p in group["params"] if p not in names]
        if unknown:
            raise ValueError(f"the optimizer holds a tensor of shape {tuple(unknown[0].shape)} that is not a parameter "
                             "of the model; allowed: an optimizer over the model's parameters only.")
    return names


def rebuild_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module, compact: nn.Module,
                      survivors: Mapping[str, Tensor]) -> torch.optim.Optimizer:
    """A new optimizer of the same class and settings over ``compact``'s parameters, with the
    state of each parameter of ``model`` gathered at ``survivors`` (flat indices by name)."""
    names = _parameter_names(optimizer, model)
    params = dict(compact.named_parameters())
    groups = []
    for group in optimizer.param_groups:
        groups.append({**{k: v for k, v in group.items() if k != "params"},
                       "params": [params[names[p]] for p in group["params"]]})
    state = optimizer.state_dict()
    order = [names[p] for group in optimizer.param_groups for p in group["params"]]
    old = dict(model.named_parameters())
    for index, per_param in list(state["state"].items()):
        name = order[index]
        state["state"][index] = {
            key: _gather(value, old[name].shape, survivors[name], params[name].shape) for key, value in per_param.items()
        }
    rebuilt = type(optimizer)(groups, **optimizer.defaults)
    rebuilt.load_state_dict(state)
    return rebuilt


def _gather(value: Any, shape: torch.Size, survivors: Tensor, new_shape: torch.Size) -> Any:
    """A parameter-shaped state tensor at the surviving indices; other tensors copied; the rest as is."""
    if not isinstance(value, Tensor):
        return value
    if value.shape == shape:
        return value.flatten()[survivors.to(value.device)].view(new_shape).clone()
    return value.clone()
