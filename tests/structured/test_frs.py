"""FRS: score formula, channel selection, real removal, optimizer carry-over and schedule."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsetrain.models import create_model
from sparsetrain.structured.frs import FRS, PruneSchedule, class_weights, layer_scores
from sparsetrain.structured.relevance import channel_relevance
from sparsetrain.structured.surgery import channel_groups, layer_shapes, rebuild

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
    frs = FRS(model, example_inputs=EXAMPLE)
    # The default class accuracy is measured on the same batches, in eval mode.
    y = torch.cat([labels for _, labels in batches])
    model.eval()
    with torch.no_grad():
        hits = torch.cat([(model(x).argmax(1) == labels) for x, labels in batches]).double()
    model.train()
    present = torch.bincount(y, minlength=10) > 0
    accuracy = torch.zeros(10, dtype=torch.float64)
    accuracy[present] = torch.stack([hits[y == c].mean() for c in range(10) if present[c]])
    scores = frs.scores(batches)
    torch.testing.assert_close(scores, frs.scores(batches, class_accuracy=accuracy))

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
def test_prune_removes_channels_for_real_and_carries_the_optimizer(name, kwargs):
    torch.manual_seed(0)
    model = create_model(name, **kwargs)
    batches = _batches(2)
    optimizer = _sgd(model)
    for x, y in batches:
        _step(model, optimizer, x, y)
    _distinct_weights(model)  # so that surviving entries can be found by value below
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    frs = FRS(model, prune_every=1, channels_per_step=10, stop_at=3, example_inputs=EXAMPLE)
    compact, new_optimizer = frs.prune(model, batches, optimizer)

    # Exactly channels_per_step group channels are gone; the input model is untouched.
    (drop,) = frs.removals
    assert sum(map(len, drop.values())) == 10 and frs.channels_removed == 10 and frs.model is compact
    widths = lambda m: sum(g.channels for g in channel_groups(m, EXAMPLE))  # noqa: E731
    assert widths(model) - widths(compact) == 10
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())

    # Same function as the original with those channels zeroed (eval mode).
    x = batches[0][0]
    zeroed = _zero_channels(model, drop, EXAMPLE).eval()
    with torch.no_grad():
        torch.testing.assert_close(compact.eval()(x), zeroed(x), rtol=1e-5, atol=1e-5)

    # Same optimizer settings; momentum gathered at the surviving entries of each weight.
    assert [g["weight_decay"] for g in new_optimizer.param_groups] == [5e-4, 0.0]
    assert all(g["momentum"] == 0.9 and g["lr"] == 0.05 for g in new_optimizer.param_groups)
    old_params = dict(model.named_parameters())
    shrunk = 0
    for pname, param in compact.named_parameters():
        old = old_params[pname]
        if param.ndim > 1:
            index = _flat_indices(old.detach(), param.detach())
            old_buffer = optimizer.state[old]["momentum_buffer"]
            assert old_buffer.shape == old.shape
            torch.testing.assert_close(new_optimizer.state[param]["momentum_buffer"],
                                       old_buffer.flatten()[index].view(param.shape), rtol=0, atol=0)
            shrunk += param.shape != old.shape
    assert shrunk > 0

    # Training goes on with the compact model and the rebuilt optimizer.
    weight = next(compact.parameters()).detach().clone()
    assert math.isfinite(_step(compact, new_optimizer, *batches[1]))
    assert not torch.equal(weight, next(compact.parameters()))

    # The compact model rebuilds from its widths (what a checkpoint stores) and loads strictly.
    rebuilt = rebuild(name, kwargs, layer_shapes(compact))
    rebuilt.load_state_dict(compact.state_dict())


def test_too_many_channels_is_an_error_and_changes_nothing():
    torch.manual_seed(0)
    model = create_model("resnet20", width=0.25)
    batches = _batches(1)
    prunable = FRS(model, example_inputs=EXAMPLE).prunable()
    # Groups: 3 residual streams (4, 8, 16 channels) and 9 inner block widths (3 x 4, 8, 16).
    assert prunable == (4 + 8 + 16 + 3 * (4 + 8 + 16)) - 12
    frs = FRS(model, prune_every=1, channels_per_step=prunable + 1, stop_at=1, example_inputs=EXAMPLE)
    before = copy.deepcopy(model.state_dict())
    optimizer = _sgd(model)
    with pytest.raises(ValueError, match=f"channels_per_step={prunable + 1} exceeds the {prunable} channels"):
        frs.prune(model, batches, optimizer)
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())
    assert frs.prunes_done == 0 and frs.model is model

    # Pruning everything prunable leaves exactly one channel in every group.
    frs = FRS(model, prune_every=1, channels_per_step=prunable, stop_at=1, example_inputs=EXAMPLE)
    compact, _ = frs.prune(model, batches, optimizer)
    assert frs.prunable() == 0
    assert all(g.channels == 1 for g in channel_groups(compact, EXAMPLE))


def test_schedule_defaults_and_validation():
    frs = FRS(create_model("resnet20", width=0.25), example_inputs=EXAMPLE)
    assert frs.schedule == PruneSchedule(21, 120, 150)
    assert [e for e in range(1, 201) if frs.should_prune(e)] == [21, 42, 63, 84, 105, 126, 147]
    for bad in ({"prune_every": 0}, {"channels_per_step": 2.5}, {"prune_every": 10, "stop_at": 5}):
        with pytest.raises(ValueError, match="allowed"):
            PruneSchedule(**bad)


def test_state_dict_resumes_the_schedule():
    torch.manual_seed(0)
    model = create_model("resnet20", width=0.25)
    frs = FRS(model, prune_every=2, channels_per_step=3, stop_at=6, example_inputs=EXAMPLE)
    assert frs.should_prune(2)
    compact, _ = frs.prune(model, _batches(1), _sgd(model))
    assert not frs.should_prune(2) and frs.should_prune(4)
    state = json.loads(json.dumps(frs.state_dict()))
    assert state["prunes_done"] == 1 and state["channels_removed"] == 3

    resumed = FRS(compact, prune_every=2, channels_per_step=3, stop_at=6, example_inputs=EXAMPLE)
    resumed.load_state_dict(state)
    assert resumed.state_dict() == frs.state_dict()
    assert [e for e in range(1, 10) if resumed.should_prune(e)] == [4, 6]
    other = FRS(compact, prune_every=3, channels_per_step=3, stop_at=6, example_inputs=EXAMPLE)
    with pytest.raises(ValueError, match="prune_every=2"):
        other.load_state_dict(state)
