"""FRS: score formula, channel selection, real removal in place, optimizer carry-over and schedule."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsetrain.methods.frs import (
    FRS,
    FRSOptions,
    PruneSchedule,
    candidates,
    class_weights,
    feature_relevance_scores,
    layer_scores,
    select,
)
from sparsetrain.models import create_model, rebuild
from sparsetrain.structured.relevance import channel_relevance
from sparsetrain.structured.surgery import channel_groups, layer_shapes

EXAMPLE = torch.zeros(2, 3, 16, 16)  # small images keep the tests fast; the models pool adaptively




def _batches(count: int, size: int = 8, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 3, 16, 16, generator=gen), torch.randint(0, 10, (size,), generator=gen))
            for _ in range(count)]


def _sgd(model: nn.Module) -> torch.optim.SGD:
    """The training recipe's optimizer: weight decay on weights only, momentum 0.9."""
    return torch.optim.SGD([
        {"params": [p for p in model.parameters() if p.ndim > 1], "weight_decay": 5e-4},
        {"params": [p for p in model.parameters() if p.ndim <= 1], "weight_decay": 0.0},
    ], lr=0.05, momentum=0.9)


def _step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    model.train()
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()


def test_class_weights_by_hand():
    # acc / max acc = 0.5, 1, 0.25, 0 -> sigmoid(2), sigmoid(1), sigmoid(4), sigmoid(inf) = 1.
    weights = class_weights(torch.tensor([0.4, 0.8, 0.2, 0.0]))
    expected = [1 / (1 + math.exp(-2)), 1 / (1 + math.exp(-1)), 1 / (1 + math.exp(-4)), 1.0]
    torch.testing.assert_close(weights, torch.tensor(expected, dtype=torch.float64))
    torch.testing.assert_close(class_weights(torch.zeros(3)), torch.full((3,), 1 / (1 + math.exp(-1)), dtype=torch.float64))


def test_layer_scores_by_hand():
    # Class means (2 classes x 3 channels), weights 0.5 and 1: mean over classes
    # [(0.5 + 3) / 2, (-1 + 0) / 2, (0 + 4) / 2] = [1.75, -0.5, 2], absolute, L2-normalised.
    scores = layer_scores(torch.tensor([[1.0, -2.0, 0.0], [3.0, 0.0, 4.0]]), torch.tensor([0.5, 1.0]))
    norm = math.sqrt(1.75**2 + 0.5**2 + 2**2)
    torch.testing.assert_close(scores, torch.tensor([1.75 / norm, 0.5 / norm, 2 / norm], dtype=torch.float64))
    assert layer_scores(torch.zeros(2, 3), torch.ones(2)).eq(0).all()


def test_scores_are_class_weighted_relevance_normalised_per_layer():
    torch.manual_seed(0)
    model = create_model("resnet20", width=0.25)
    batches = _batches(2)
    frs = FRS(model, 100, EXAMPLE, batches)
    # The default class accuracy is measured on the same batches, in eval mode.
    y = torch.cat([labels for _, labels in batches])
    model.eval()
    with torch.no_grad():
        hits = torch.cat([(model(x).argmax(1) == labels) for x, labels in batches]).double()
    model.train()
    present = torch.bincount(y, minlength=10) > 0
    accuracy = torch.zeros(10, dtype=torch.float64)
    accuracy[present] = torch.stack([hits[y == c].mean() for c in range(10) if present[c]])
    scores = frs.scores()
    torch.testing.assert_close(scores, feature_relevance_scores(model, batches, 10, class_accuracy=accuracy))

    per_batch = [channel_relevance(model, x, labels) for x, labels in batches]
    weights = class_weights(accuracy[present])
    assert list(scores) == list(per_batch[0]) and len(scores) == 19
    for name in scores:
        r = torch.cat([relevance[name] for relevance in per_batch]).double()
        means = torch.stack([r[y == c].mean(0) for c in range(10) if present[c]])
        expected = (weights.view(-1, 1) * means).mean(0).abs()
        torch.testing.assert_close(scores[name], expected / expected.norm())
        assert scores[name].min() >= 0 and math.isclose(scores[name].norm().item(), 1.0, rel_tol=1e-9)


def _following_norm(model: nn.Module, layer: str) -> nn.Module:
    names = [name for name, _ in model.named_modules()]
    module = model.get_submodule(names[names.index(layer) + 1])
    assert isinstance(module, nn.BatchNorm2d)
    return module


def _zero_channels(model: nn.Module, drop: dict, example: torch.Tensor) -> nn.Module:
    """A copy of ``model`` whose dropped group channels output exactly 0 (conv rows and BN affine zeroed)."""
    zeroed = copy.deepcopy(model)
    groups = {g.root: g for g in channel_groups(model, example)}
    with torch.no_grad():
        for root, indices in drop.items():
            for layer in groups[root].layers:
                zeroed.get_submodule(layer).weight[indices] = 0
                norm = _following_norm(zeroed, layer)
                norm.weight[indices] = 0
                norm.bias[indices] = 0
    return zeroed


def _distinct_weights(model: nn.Module) -> None:
    """Give every Conv/Linear weight distinct values (a shuffled ramp with the weight's std)."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                w = module.weight
                ramp = torch.linspace(-1, 1, w.numel())[torch.randperm(w.numel(), generator=gen)]
                w.copy_(ramp.view_as(w) * w.std() * math.sqrt(3))


def _flat_indices(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """Where each entry of ``new`` sits in ``old`` (all of old's values are distinct)."""
    values, order = old.flatten().sort()
    assert values.unique().numel() == values.numel()
    position = torch.searchsorted(values, new.flatten())
    assert torch.equal(values[position], new.flatten())
    return order[position]


@pytest.mark.parametrize("name, kwargs", [("resnet20", {"width": 0.5}), ("mobilenetv1", {"width": 0.25})])
def test_prune_removes_channels_in_place_and_carries_the_optimizer(name, kwargs):
    torch.manual_seed(0)
    model = create_model(name, **kwargs)
    batches = _batches(2)
    optimizer = _sgd(model)
    for x, y in batches:
        _step(model, optimizer, x, y)
    _distinct_weights(model)  # so that surviving entries can be found by value below
    original = copy.deepcopy(model)
    old_params = {n: p for n, p in model.named_parameters()}
    old_buffers = {n: optimizer.state[p]["momentum_buffer"].clone() for n, p in old_params.items()}
    frs = FRS(model, 10, EXAMPLE, batches, prune_every=1, channels_per_step=10, stop_at=3)
    frs.bind(optimizer)
    expected = select(frs.scores(), candidates(model, EXAMPLE), {"conv": 10, "linear": 0})
    drop = frs.prune()

    # The channels of the 10 lowest entries are gone, from the same model object.
    removed = sum(map(len, drop.values()))
    assert drop == expected and 0 < removed <= 10 and frs.channels_removed == removed and frs.removals == [drop]
    widths = lambda m: sum(g.channels for g in channel_groups(m, EXAMPLE))  # noqa: E731
    assert widths(original) - widths(model) == removed

    # Same function as the original with those channels zeroed (eval mode).
    x = batches[0][0]
    zeroed = _zero_channels(original, drop, EXAMPLE).eval()
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), zeroed(x), rtol=1e-5, atol=1e-5)

    # The same optimizer holds exactly the live parameters; momentum gathered at the survivors.
    held = [p for g in optimizer.param_groups for p in g["params"]]
    assert {id(p) for p in held} == {id(p) for p in model.parameters()} and len(held) == len(old_params)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [5e-4, 0.0]
    shrunk = 0
    for pname, param in model.named_parameters():
        if param.ndim > 1:
            index = _flat_indices(original.get_parameter(pname).detach(), param.detach())
            torch.testing.assert_close(optimizer.state[param]["momentum_buffer"],
                                       old_buffers[pname].flatten()[index].view(param.shape), rtol=0, atol=0)
            shrunk += param is not old_params[pname]
    assert shrunk > 0

    # Training goes on with the same objects.
    weight = next(model.parameters()).detach().clone()
    assert math.isfinite(_step(model, optimizer, *batches[1]))
    assert not torch.equal(weight, next(model.parameters()))

    # The compact model rebuilds from its widths (what a run folder stores) and loads strictly.
    rebuilt = rebuild(name, kwargs, layer_shapes(model))
    rebuilt.load_state_dict(model.state_dict())


def test_too_many_channels_is_an_error_and_changes_nothing():
    torch.manual_seed(0)
    model = create_model("resnet20", width=0.25)
    batches = _batches(1)
    pools = FRS(model, 10, EXAMPLE, batches, prune_every=1, stop_at=1, channels_per_step=1).prunable()
    # Groups: 3 residual streams (4, 8, 16 channels), each scored at its 3 block outputs, and 9
    # inner block widths (3 x 4, 8, 16) scored once; every group keeps one channel.
    assert pools == {"conv": 3 * (3 + 7 + 15) + 3 * (3 + 7 + 15), "linear": 0}
    prunable = pools["conv"]
    with pytest.raises(ValueError, match=f"channels_per_step={prunable + 1} over 1 pruning steps picks {prunable + 1}"):
        FRS(model, 10, EXAMPLE, batches, prune_every=1, channels_per_step=prunable + 1, stop_at=1)

    # Pruning everything prunable leaves exactly one channel in every group; then nothing is left.
    frs = FRS(model, 10, EXAMPLE, batches, prune_every=1, channels_per_step=prunable, stop_at=1)
    frs.bind(_sgd(model))
    assert frs.step() is True
    assert frs.prunable() == {"conv": 0, "linear": 0}
    assert all(g.channels == 1 for g in channel_groups(model, EXAMPLE))
    before = copy.deepcopy(model.state_dict())
    assert frs.step() is False  # past stop_at
    with pytest.raises(ValueError, match=f"channels_per_step={prunable} exceeds the 0 entries still prunable"):
        frs.prune()
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())


def test_schedule_defaults_and_validation():
    frs = FRS(create_model("resnet20", width=0.25), 2000, EXAMPLE, _batches(1))
    assert frs.options == FRSOptions()
    # The public code's CIFAR schedule (every 21 of 200 epochs until 150) as fractions of training.
    assert frs.schedule == PruneSchedule(210, 1500)
    assert [t for t in range(1, 2001) if t % 210 == 0 and t <= 1500] == [210 * i for i in range(1, 8)]
    assert frs.schedule.steps == 7
    # 30 % of the prunable entries over the 7 steps; the model has no hidden Linear neurons.
    assert frs.channels_per_step == round(0.3 * frs.prunable()["conv"] / 7) and frs.linear_per_step == 0
    for bad in ({"prune_every": 0}, {"channels_per_step": 2.5}, {"stop_at": 1.5}, {"prune_every": True},
                {"linear_per_step": -1}, {"lrp_eps": -1.0}, {"lrp_eps": "1e-9"}):
        with pytest.raises(ValueError, match="allowed"):
            FRSOptions(**bad)
    with pytest.raises(ValueError, match="leave no pruning step"):
        FRS(create_model("resnet20", width=0.25), 100, EXAMPLE, _batches(1), prune_every=10, stop_at=5)


def test_state_dict_resumes_the_schedule_and_the_widths():
    torch.manual_seed(0)
    model = create_model("resnet20", width=0.25)
    settings = dict(prune_every=2, channels_per_step=3, stop_at=6)
    frs = FRS(model, 10, EXAMPLE, _batches(1), **settings)
    frs.bind(_sgd(model))
    assert [frs.step() for _ in range(3)] == [False, True, False]
    state = json.loads(json.dumps(frs.state_dict()))
    assert state["step"] == 3 and len(state["removals"]) == 1

    fresh = create_model("resnet20", width=0.25)
    resumed = FRS(fresh, 10, EXAMPLE, _batches(1), **settings)
    optimizer = _sgd(fresh)
    resumed.bind(optimizer)
    resumed.load_state_dict(state)
    assert layer_shapes(fresh) == layer_shapes(model)
    fresh.load_state_dict(model.state_dict())
    held = [p for g in optimizer.param_groups for p in g["params"]]
    assert {id(p) for p in held} == {id(p) for p in fresh.parameters()}
    assert resumed.state_dict() == frs.state_dict()
    assert [resumed.step() for _ in range(5)] == [True, False, True, False, False]
    other = FRS(create_model("resnet20", width=0.25), 10, EXAMPLE, _batches(1), prune_every=3, channels_per_step=3, stop_at=6)
    with pytest.raises(ValueError, match="the saved state has prune_every=2 but this frs has prune_every=3"):
        other.load_state_dict(state)
