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

Relevance (:mod:`sparsetrain.structured.relevance`) follows the public code
(purdue-nrl/Gradual-Channel-Pruning-using-FRS): it starts from the one-hot of the true label, biases
take none, and it is scored on augmented training batches. Two numerical quirks of the public code
are left out: its 1e-9 stabiliser (``lrp_eps=1e-9`` reproduces it) and its per-class divisor
n_c + number of batches in the ResNet code (we divide by n_c, which the formula above states).

Candidates, as the public code scores them (except that its VGG-16 leaves conv1 and conv2 alone;
we score every layer): every post-ReLU activation fed by a channel group's
layers through batch norms and residual adds
(:func:`~sparsetrain.structured.relevance.post_relu_activations`: ``nn.ReLU`` modules and
``F.relu`` / ``torch.relu`` calls, in place or not, a module called several times once per
call), one *entry* per channel per activation. A model with no such activation, or with a
layer relevance has no rule for (LayerNorm, attention, embeddings), is refused at construction
naming the layer. A residual stream is scored at its block outputs (the ReLU after each add), never at
the stem; a group read by a depthwise convolution at both activations. Each pruning step makes
the public code's pick: the ``channels_per_step`` lowest entries over all convolutional groups,
and separately (as the public VGG code does for its hidden Linear neurons) the
``linear_per_step`` lowest entries over groups written by Linear layers; ties: earlier group,
earlier activation, lower channel first; no group loses its last channel. A group scored at one
activation (a block's inner channels, a plain convolution) loses exactly its picked channels.
The public code only masks, so it can drop a stream channel in one block and keep it in the
next; we remove channels for real, and a stream channel exists in every block of its stage. Our
rule: a group scored at K activations with S picked entries loses round(S / K) whole channels
(half up), those with the lowest mean score over its K activations. Channels are removed with
:func:`~sparsetrain.structured.surgery.remove_channels_`; the classifier's outputs are never
candidates.

In place: the model object keeps its identity, its resized layers get new parameters and the
bound optimizer is re-pointed at them, so it still holds exactly the live parameters, with
its state (momentum, Adam moments) sliced to the survivors. ``step()`` returns True after a
pruning step, so a wrapper such as DDP can be rebuilt. Under torch.distributed rank 0 scores
and selects, and broadcasts its choice: every rank removes the same channels.

Schedule, in optimizer steps t counted from 1 (``step()`` advances t, then prunes when due):
pruning happens after steps prune_every, 2 prune_every, ... up to and including ``stop_at``
(ints are steps, floats fractions of ``total_steps``). Defaults are the public code's for CIFAR
ResNets, as fractions of its 200 epochs: every 21/200 of training until 150/200, picking 30 % of
the prunable entries of each pool in all unless ``channels_per_step`` / ``linear_per_step`` are
given (the public code: 120 for ResNets; 200 and 22 for VGG-16).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..calls import logits_of
from ..declare import Declared, Flag, option
from ..measure import count_flops, output_width
from ..modes import eval_mode
from ..schedules import resolve_step, validate_total_steps
from ..structured.relevance import post_relu_activations, relevance_and_logits
from ..structured.surgery import ChannelGroup, channel_groups, layer_shapes, remove_channels_, resize_
from .protocol import Method, check_finite
from .registry import Context, MethodSpec, register_method

DEFAULT_FRACTION = 0.3  # of the prunable entries of each pool, picked over the schedule when no count is given
POOLS = ("conv", "linear")


@dataclass(frozen=True)
class FRSOptions(Declared):
    """FRS's options (the maths and the schedule: the module docstring)."""

    prune_every: int | float = option(21 / 200, "steps between pruning steps", kind=float, unit="steps", low=1,
                                      flag=Flag(epochs=True, help="epochs between pruning steps"))
    channels_per_step: int | None = option(None, "entries picked per pruning step among the convolutional groups "
                                           "(None: 30 % of the pool over the steps)", kind=int, low=1, optional=True)
    stop_at: int | float = option(150 / 200, "the last step that prunes", kind=float, unit="steps", low=1,
                                  flag=Flag(epochs=True, help="the last epoch that prunes"))
    num_classes: int | None = option(None, "classes (None: the width of the model's output)", kind=int, low=1,
                                     optional=True)
    linear_per_step: int | None = option(None, "entries picked per pruning step among the groups Linear layers write "
                                         "(None: 30 % of the pool over the steps)", kind=int, low=0, optional=True)
    lrp_eps: float = option(0.0, "stabiliser of the alpha-beta rule (0: exact; the public code: 1e-9)", low=0.0,
                            high=1e-3, high_open=True)


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
class Candidate:
    """A coupled group, the activations scoring it (one entry per channel each) and its pool:
    "linear" when Linear layers write it, else "conv"."""

    group: ChannelGroup
    activations: tuple[str, ...]
    pool: str

    @property
    def entries(self) -> int:
        """Entries that may still be picked: every group keeps one channel."""
        return (self.group.channels - 1) * len(self.activations)


def feature_relevance_scores(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    num_classes: int,
    class_accuracy: Tensor | None = None,
    lrp_eps: float = 0.0,
) -> dict[str, Tensor]:
    """Feature relevance scores of ``model`` on ``batches``: for each post-ReLU activation (by
    ReLU name) a float64 vector (C,), non-negative with L2 norm 1 (all zeros if the layer has
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
        relevance, logits = relevance_and_logits(model, x, y, lrp_eps)
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


def candidates(model: nn.Module, example_inputs: Tensor) -> list[Candidate]:
    """Prunable groups with the post-ReLU activations of their own width that score them; a
    residual stream (a group with an activation after an add) only at those, never the stem."""
    activations = post_relu_activations(model, example_inputs)
    sources = {s for a in activations.values() for s in a.sources}
    widths = {name: output_width(model.get_submodule(name)) for name in sources}
    found = []
    for group in channel_groups(model, example_inputs):
        writers = set(group.layers)
        own = [
            name for name, a in activations.items()
            if writers.intersection(a.sources) and all(widths[s] == group.channels for s in a.sources)
        ]
        if any(activations[name].after_add for name in own):
            own = [name for name in own if activations[name].after_add]
        if own and group.channels > 1:
            linear = all(isinstance(model.get_submodule(layer), nn.Linear) for layer in group.layers)
            found.append(Candidate(group, tuple(own), "linear" if linear else "conv"))
    return found


def _pool_entries(found: list[Candidate]) -> dict[str, int]:
    """Entries that can still be picked, per pool."""
    return {pool: sum(c.entries for c in found if c.pool == pool) for pool in POOLS}


def _nothing_to_score(model: nn.Module, example_inputs: Tensor) -> str:
    """The refusal of a model without candidates, naming its first prunable layer (in module order)."""
    roots = {group.root for group in channel_groups(model, example_inputs)}
    first = next((name for name, _ in model.named_modules() if name in roots), None)
    layers = f"layer {first!r} or any other prunable layer" if first else "any prunable layer (it has none)"
    return (
        f"FRS has no channel of {type(model).__name__} to score: no ReLU follows {layers} through batch norms and "
        "residual adds; allowed: models whose hidden Conv/Linear layers feed a ReLU (nn.ReLU, F.relu or torch.relu, "
        "in place or not)."
    )


def pick_entries(scores: Mapping[str, Tensor], found: list[Candidate], count: int) -> list[int]:
    """How many entries of each candidate are among the ``count`` lowest entries of ``found``
    (ties: earlier candidate, earlier activation, lower channel), none past a candidate's
    ``entries``."""
    values = torch.cat([scores[a] for c in found for a in c.activations])
    owner = torch.cat([torch.full((len(scores[a]),), i) for i, c in enumerate(found) for a in c.activations]).tolist()
    left = [c.entries for c in found]
    picked = [0] * len(found)
    taken = 0
    for index in torch.argsort(values, stable=True).tolist():
        if taken == count:
            break
        i = owner[index]
        if left[i]:
            left[i] -= 1
            picked[i] += 1
            taken += 1
    return picked


def channels_to_remove(scores: Mapping[str, Tensor], candidate: Candidate, picked: int) -> list[int]:
    """round(picked / K) channels (half up) of a candidate scored at K activations: those with
    the lowest mean score (ties: lower index), sorted."""
    k = len(candidate.activations)
    mean = torch.stack([scores[a] for a in candidate.activations]).mean(0)
    return sorted(torch.argsort(mean, stable=True)[: (2 * picked + k) // (2 * k)].tolist())


def select(scores: Mapping[str, Tensor], found: list[Candidate], counts: Mapping[str, int]) -> dict[str, list[int]]:
    """The channels a pruning step removes, {group root: channel indices}: in each pool the
    ``counts[pool]`` lowest entries are picked, then each group loses its share of whole channels."""
    drop: dict[str, list[int]] = {}
    for pool in POOLS:
        members = [c for c in found if c.pool == pool]
        if not members or not counts[pool]:
            continue
        for candidate, picked in zip(members, pick_entries(scores, members, counts[pool])):
            channels = channels_to_remove(scores, candidate, picked)
            if channels:
                drop[candidate.group.root] = channels
    return drop


def _rank0_choice(drop: dict[str, list[int]], found: list[Candidate]) -> dict[str, list[int]]:
    """Under torch.distributed, every rank takes rank 0's choice (sent as a mask over the
    concatenated channels of ``found``, which all ranks trace alike)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return drop
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    masks = [torch.zeros(c.group.channels, dtype=torch.uint8, device=device) for c in found]
    for mask, c in zip(masks, found):
        mask[drop.get(c.group.root, [])] = 1
    flat = torch.cat(masks)
    dist.broadcast(flat, src=0)
    chosen = {}
    for c, part in zip(found, flat.split([c.group.channels for c in found])):
        indices = part.nonzero().flatten().tolist()
        if indices:
            chosen[c.group.root] = indices
    return chosen


def _default_count(prunable: int, steps: int) -> int:
    """DEFAULT_FRACTION of a pool's prunable entries over the steps: at least 1 if any, else 0."""
    return max(1, round(DEFAULT_FRACTION * prunable / steps)) if prunable else 0


class FRS(Method):
    """Gradual channel pruning with feature relevance scores, during training, in place.

    ``data`` is a re-iterable of labelled batches the relevance is scored on (the public code:
    the augmented training set); ``example_inputs`` a small batch on the model's device to trace it.
    """

    name = "frs"
    removes_channels = True

    def __init__(
        self,
        model: nn.Module,
        total_steps: int,
        example_inputs: Tensor,
        data: Iterable[tuple[Tensor, Tensor]],
        **options: Any,
    ) -> None:
        super().__init__()
        self.options = FRSOptions(**options)
        prune_every, stop_at = self.options.prune_every, self.options.stop_at
        channels_per_step, linear_per_step = self.options.channels_per_step, self.options.linear_per_step
        num_classes = self.options.num_classes
        self.total_steps = validate_total_steps(total_steps)
        if not isinstance(example_inputs, Tensor):
            raise ValueError(f"example_inputs={example_inputs!r} is not allowed; allowed: a tensor batch the model accepts.")
        self.model = model
        self.example_inputs = example_inputs
        self.data = data
        self.schedule = PruneSchedule(  # fractions floor to whole steps, at least one
            max(1, resolve_step(prune_every, total_steps, "prune_every")),
            max(1, resolve_step(stop_at, total_steps, "stop_at")),
        )
        found = candidates(model, example_inputs)  # refuses a layer that relevance has no rule for
        if not found:
            raise ValueError(_nothing_to_score(model, example_inputs))
        with torch.no_grad(), eval_mode(model):
            self.num_classes = num_classes or int(logits_of(model(example_inputs)).shape[-1])
        self.dense_flops = count_flops(model, example_inputs[:1])
        prunable = _pool_entries(found)
        steps = self.schedule.steps
        given = {"conv": channels_per_step, "linear": linear_per_step}
        self.counts = {pool: _default_count(prunable[pool], steps) if given[pool] is None else given[pool] for pool in POOLS}
        for pool, name in (("conv", "channels_per_step"), ("linear", "linear_per_step")):
            if self.counts[pool] * steps > prunable[pool]:
                raise ValueError(
                    f"{name}={self.counts[pool]} over {steps} pruning steps picks {self.counts[pool] * steps} "
                    f"entries, but {type(model).__name__} has {prunable[pool]} prunable in its {pool} pool; "
                    f"allowed: {name} <= {prunable[pool] // steps}."
                )
        self._step = 0
        self.removals: list[dict[str, list[int]]] = []

    # -- reading the state -------------------------------------------------------------

    @property
    def channels_per_step(self) -> int:
        """Entries picked per pruning step among the convolutional groups."""
        return self.counts["conv"]

    @property
    def linear_per_step(self) -> int:
        """Entries picked per pruning step among the groups written by Linear layers."""
        return self.counts["linear"]

    @property
    def step_count(self) -> int:
        return self._step

    @property
    def prunes_done(self) -> int:
        return len(self.removals)

    @property
    def channels_removed(self) -> int:
        return sum(len(indices) for drop in self.removals for indices in drop.values())

    def prunable(self) -> dict[str, int]:
        """Entries that can still be picked, per pool ("conv", "linear")."""
        return _pool_entries(candidates(self.model, self.example_inputs))

    def scores(self, batches: Iterable[tuple[Tensor, Tensor]] | None = None) -> dict[str, Tensor]:
        """Feature relevance scores of the model on ``batches`` (default: ``data``)."""
        return feature_relevance_scores(
            self.model, self.data if batches is None else batches, self.num_classes, lrp_eps=self.options.lrp_eps
        )

    def metrics(self) -> dict[str, float]:
        return {"flops_ratio": count_flops(self.model, self.example_inputs[:1]) / self.dense_flops}

    # -- changing the state ------------------------------------------------------------

    def step(self) -> bool:
        """Advance t; after steps prune_every, 2 prune_every, ... <= stop_at remove the channels
        of the lowest-scoring entries in place. True when a pruning step was made. The optimizer
        must be bound: pruning re-points it at the new parameters."""
        self._check_attached()
        if self.optimizer is None:
            raise RuntimeError("FRS re-points the optimizer at the parameters it prunes, so it needs one; "
                               "allowed: call bind(optimizer) before step().")
        self._step += 1
        if self.prunes_done >= self.schedule.done_by(self._step):
            return False
        self.prune()
        return True

    def prune(self) -> dict[str, list[int]]:
        """Score the model on ``data``, remove the channels of each pool's lowest entries in place
        (the optimizer's state follows, if bound); return the removed {group root: channel indices}.
        A NaN or infinite relevance score is a FloatingPointError naming its layer."""
        found = candidates(self.model, self.example_inputs)
        pools = _pool_entries(found)
        for pool, name in (("conv", "channels_per_step"), ("linear", "linear_per_step")):
            available = pools[pool]
            if self.counts[pool] > available:
                raise ValueError(
                    f"{name}={self.counts[pool]} exceeds the {available} entries still prunable in the {pool} pool "
                    f"of {type(self.model).__name__}; allowed: at most {available} (every group keeps one channel)."
                )
        rank0 = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
        drop: dict[str, list[int]] = {}
        if rank0:
            scores = self.scores()
            check_finite(list(scores.values()), list(scores), "layer", "relevance score", self._step)
            drop = select(scores, found, self.counts)
        drop = _rank0_choice(drop, found)
        if drop:
            remove_channels_(self.model, drop, self.example_inputs, self.optimizer)
        self.removals.append(drop)
        return drop

    # -- state -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The step, each pruning step's removals ({group root: channel indices} of the model at
        that step), the widths of the model now and the settings (JSON-ready)."""
        return {
            "method": self.name,
            "step": self._step,
            "removals": [{root: list(indices) for root, indices in drop.items()} for drop in self.removals],
            "shapes": layer_shapes(self.model),
            "settings": self._settings(),
        }

    def _settings(self) -> dict[str, Any]:
        """The schedule in steps, the entries picked per step, the scoring options and the training length."""
        return {
            "total_steps": self.total_steps, "prune_every": self.schedule.prune_every, "stop_at": self.schedule.stop_at,
            "channels_per_step": self.channels_per_step, "linear_per_step": self.linear_per_step,
            "num_classes": self.num_classes, "lrp_eps": self.options.lrp_eps,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the schedule position and give the model the saved widths, in place (its
        weights become zeros until the model's own state dict is loaded). A state of other settings
        is refused naming the setting."""
        self._check_attached()
        self._check_state(state)
        removals = [{str(root): [int(i) for i in indices] for root, indices in drop.items()} for drop in state["removals"]]
        resize_(self.model, state["shapes"], self.optimizer)
        self._step = int(state["step"])
        self.removals = removals


def _build(model: nn.Module, options: FRSOptions, context: Context) -> FRS:
    return FRS(model, context.total_steps, context.need_example_inputs("frs"), context.need_data("frs"), **options.values())


register_method(MethodSpec(
    "frs", FRSOptions, _build,
    "gradual channel pruning by feature relevance scores (LRP alpha-beta) at fixed intervals (IEEE Access 2020)",
    recipe="frs",
))
