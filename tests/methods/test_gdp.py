"""GDP: the bilinear FLOPs model, gate sharing, gated model == compact model, exact resume,
bad targets, and a real run on the bundled sample landing on its FLOPs target."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from sparsetrain.data import BatchLoader, load_dataset
from sparsetrain.measure import count_flops_params
from sparsetrain.methods import GDP
from sparsetrain.models import create_model

CASES = {
    "resnet20": {"width": 0.25},
    "resnet56": {"width": 0.25},
    "mobilenetv1": {"width": 0.25},
    "densenet40": {"growth_rate": 6},
    "vgg16": {},
}


def random_gates(gdp: GDP, seed: int = 0) -> None:
    """About a third of the gates exactly zero (one kept per group), the rest of varied size and sign."""
    gen = torch.Generator().manual_seed(seed)
    values = (torch.rand(gdp.size, generator=gen) * 2 + 0.05) * torch.sign(torch.randn(gdp.size, generator=gen))
    values[torch.rand(gdp.size, generator=gen) < 0.35] = 0
    offset = 0
    for group in gdp.groups:
        values[offset] = 1.0
        offset += group.channels
    with torch.no_grad():
        gdp.gates.copy_(values)


class TwoConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        return self.fc(x.mean((2, 3)))


def test_bilinear_flops_by_hand():
    """F = f1 * a/4 + f2 * (a/4)(b/6) + f3 * b/6 with a, b the gate sums of conv1's and conv2's channels."""
    model = TwoConvNet()
    x = torch.randn(1, 3, 8, 8)
    gdp = GDP(model, 0.5, 10, x, eps_start=0.5)
    f1, f2, f3 = 2 * 64 * 4 * 27, 2 * 16 * 6 * 36, 2 * 6 * 2
    assert gdp.dense_flops == f1 + f2 + f3 == count_flops_params(model, x)[0]
    assert sorted(g.root for g in gdp.groups) == ["conv1", "conv2"]
    with torch.no_grad():
        gdp.gates.copy_(torch.tensor([1.0, 0.5, 0.0, 2.0, 1.0, 0.0, 0.0, 3.0, 0.5, 1.0]))
    sums = {g.root: float(v.sum()) for g, v in zip(gdp.groups, gdp.gate_values().detach().split([g.channels for g in gdp.groups]))}
    a, b = sums["conv1"], sums["conv2"]
    expected = f1 * a / 4 + f2 * (a / 4) * (b / 6) + f3 * b / 6
    assert gdp.flops().item() == pytest.approx(expected, rel=1e-6)
    assert gdp.flops_ratio() == pytest.approx(expected / gdp.dense_flops, rel=1e-6)
    alive = {g.root: int(n.sum()) for g, n in zip(gdp.groups, (gdp.gates != 0).split([g.channels for g in gdp.groups]))}
    a, b = alive["conv1"], alive["conv2"]
    assert gdp.flops_ratio(hard=True) == pytest.approx((f1 * a / 4 + f2 * a / 4 * b / 6 + f3 * b / 6) / gdp.dense_flops)
    assert gdp.kept_channels() == alive
    assert gdp.penalty().item() == pytest.approx(gdp.lam * expected / gdp.dense_flops, rel=1e-6)


def test_penalty_gradient_is_divided_by_the_fan_of_each_group():
    """ResNet-20's stage-1 stream is written by conv1 and three conv2s and read by three conv1s,
    layer2.0.conv1 and the shortcut (fan 9); a block's inner channels have fan 2 (one writer, one reader)."""
    gdp = GDP(create_model("resnet20", width=0.25), 0.5, 10, torch.randn(1, 3, 32, 32))
    gdp.lam = 3.0
    (flops_grad,) = torch.autograd.grad(gdp.flops(), gdp.gates)
    (penalty_grad,) = torch.autograd.grad(gdp.penalty(), gdp.gates)
    assert gdp.penalty().item() == pytest.approx(3.0 * gdp.flops_ratio(), rel=1e-6)
    offset = 0
    for group in gdp.groups:
        fan = {"conv1": 9, "layer1.0.conv1": 2}.get(group.root)
        if fan is not None:
            got = penalty_grad[offset:offset + group.channels]
            torch.testing.assert_close(got, 3.0 * flops_grad[offset:offset + group.channels] / gdp.dense_flops / fan)
        offset += group.channels


def test_gates_shared_by_readers_and_none_before_depthwise():
    resnet = create_model("resnet20", width=0.5)
    gdp = GDP(resnet, 0.5, 10, torch.randn(1, 3, 32, 32))
    stream = next(g for g in gdp.groups if g.root == "conv1")
    assert set(stream.readers) == {"layer1.0.conv1", "layer1.1.conv1", "layer1.2.conv1", "layer2.0.conv1", "layer2.0.shortcut.0"}
    gated = {name for name, m in resnet.named_modules() if parametrize.is_parametrized(m, "weight")}
    regular = {name for name, m in resnet.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert gated == regular - {"conv1"}  # every reader gated, never the input image
    mobilenet = create_model("mobilenetv1", width=0.25)
    GDP(mobilenet, 0.5, 10, torch.randn(1, 3, 32, 32))
    for name, module in mobilenet.named_modules():
        if isinstance(module, nn.Conv2d):
            assert parametrize.is_parametrized(module, "weight") == (module.groups == 1 and name != "conv1"), name


@pytest.mark.parametrize("name", list(CASES))
def test_gated_model_equals_compact_model(name, randomize_batch_norms):
    torch.manual_seed(0)
    model = create_model(name, **CASES[name])
    randomize_batch_norms(model)
    x = torch.randn(2, 3, 32, 32)
    dense_flops, dense_params = count_flops_params(model, x)
    before = copy.deepcopy(model.state_dict())
    gdp = GDP(model, 0.5, 10, x)
    assert gdp.dense_flops == dense_flops
    random_gates(gdp)
    gdp.eps = 0.3
    model.eval()
    with torch.no_grad():
        gated = model(x)
    original = {k.replace("parametrizations.weight.original", "weight"): v for k, v in model.state_dict().items()}
    assert all(torch.equal(before[k], original[k]) for k in before)  # the weights are untouched until finalize
    hard = gdp.flops_ratio(hard=True)
    compact = gdp.finalize().eval()
    assert compact is model
    with torch.no_grad():
        torch.testing.assert_close(compact(x), gated, rtol=1e-5, atol=1e-5 * float(gated.abs().max()))
    flops, params = count_flops_params(compact, x)
    assert flops / dense_flops == pytest.approx(hard, rel=1e-9)
    assert params < dense_params
    assert not any(parametrize.is_parametrized(m) for m in compact.modules())
    with pytest.raises(RuntimeError, match="finalized"):
        gdp.step()


def test_step_zeroes_small_gates_for_good_then_holds():
    """Target 0.6, t_end = 2: step 1 zeroes the three tiny gates (the reference 0.65 allows them),
    step 2 keeps them dead despite a nudge and the safeguard reaches the target, then GDP holds.
    (Channels of this tiny net cost 9-12 % of its FLOPs each, hence the wide tolerance.)"""
    model = TwoConvNet()
    gdp = GDP(model, 0.6, 4, torch.randn(1, 3, 8, 8), prune_end=0.5, tolerance=0.2)
    conv2 = [g.root for g in gdp.groups].index("conv2")
    start = sum(g.channels for g in gdp.groups[:conv2])
    tiny = [start, start + 1, start + 2]
    with torch.no_grad():
        gdp.gates[tiny] = 1e-4  # three of conv2's six gates under the threshold
    gdp.step()
    assert gdp.reference() == pytest.approx(0.65)
    assert (gdp.gates == 0).nonzero().flatten().tolist() == tiny and not gdp.holding
    with torch.no_grad():
        gdp.gates[tiny] = 0.5  # as optimizer momentum might
    gdp.step()
    assert (gdp.gates[tiny] == 0).all() and gdp.holding and gdp.forced > 0
    assert 0.6 * (1 - gdp.tolerance) <= gdp.flops_ratio(hard=True) <= 0.6
    assert gdp.penalty().item() == 0.0


@pytest.mark.parametrize("target", [0, 1, 1.5, -0.1, float("nan"), True, "0.5"])
def test_bad_flops_target(target):
    with pytest.raises(ValueError, match=f"flops_target={target!r} is not allowed"):
        GDP(TwoConvNet(), target, 10, torch.randn(1, 3, 8, 8))


def test_model_without_gateable_group():
    with pytest.raises(ValueError, match="no channel group GDP can gate"):
        GDP(nn.Sequential(nn.Flatten(), nn.Linear(12, 2)), 0.5, 10, torch.randn(1, 3, 2, 2))


def test_before_optimizer_step_adds_the_penalty_gradient():
    model = TwoConvNet()
    x = torch.randn(2, 3, 8, 8)
    gdp = GDP(model, 0.5, 10, x)
    loss = F.cross_entropy(model(x), torch.tensor([0, 1]))
    (loss_grad,) = torch.autograd.grad(loss, gdp.gates, retain_graph=True)
    (penalty_grad,) = torch.autograd.grad(gdp.penalty(), gdp.gates)
    loss.backward()
    gdp.before_optimizer_step()
    torch.testing.assert_close(gdp.gates.grad, loss_grad + penalty_grad)


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    model = create_model("resnet20", width=0.25)
    gdp = GDP(model, 0.5, 12, torch.zeros(1, 3, 32, 32), prune_end=0.75)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    gdp.bind(optimizer)
    return model, gdp, optimizer


def test_resume_mid_training_is_exact(make_batches, train):
    batches = make_batches(12, size=32)
    model, gdp, optimizer = _setup()
    train(model, gdp, optimizer, batches[:6])
    saved = (copy.deepcopy(model.state_dict()), copy.deepcopy(gdp.state_dict()), copy.deepcopy(optimizer.state_dict()))
    train(model, gdp, optimizer, batches[6:])

    resumed_model, resumed, resumed_optimizer = _setup(seed=1)
    resumed.load_state_dict(saved[1])
    resumed_model.load_state_dict(saved[0])
    resumed_optimizer.load_state_dict(saved[2])
    state = resumed.state_dict()
    assert torch.equal(resumed.gates, saved[0][next(k for k in saved[0] if k.endswith(".gates"))])
    assert torch.equal(state["last"], saved[1]["last"]) and state["lambda"] == saved[1]["lambda"]
    assert (state["eps"], state["step"]) == (saved[1]["eps"], 6) and state["eps"] == resumed.eps_at(6)
    train(resumed_model, resumed, resumed_optimizer, batches[6:])
    a, b = gdp.state_dict(), resumed.state_dict()
    assert torch.equal(gdp.gates, resumed.gates) and (a["lambda"], a["eps"], a["step"], a["holding"]) == (
        b["lambda"], b["eps"], b["step"], b["holding"])
    assert all(torch.equal(v, resumed_model.state_dict()[k]) for k, v in model.state_dict().items())


def test_load_state_of_other_model_is_refused():
    _, gdp, _ = _setup()
    other = GDP(create_model("resnet20", width=0.5), 0.5, 12, torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="allowed: a state of a GDP on the same model"):
        gdp.load_state_dict(other.state_dict())


@pytest.mark.slow
def test_run_on_bundled_sample_reaches_flops_target(train):
    """ResNet-20 (width 0.5) on 1,024 sample images, batch 32, 3 epochs (96 steps), target 50 %."""
    torch.manual_seed(0)
    data = load_dataset()
    loader = BatchLoader(data.x_train[:1024], data.y_train[:1024], 32, data.mean, data.std, augment=True, seed=0)
    model = create_model("resnet20", width=0.5)
    x = torch.zeros(1, 3, 32, 32)
    dense_flops = count_flops_params(model, x)[0]
    epochs, target = 3, 0.5
    gdp = GDP(model, target, epochs * len(loader), x)
    decay = [p for p in model.parameters() if p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.dim() <= 1]
    optimizer = torch.optim.SGD(
        [{"params": decay, "weight_decay": 5e-4}, {"params": no_decay, "weight_decay": 0}], lr=0.1, momentum=0.9)
    gdp.bind(optimizer)
    for epoch in range(epochs):
        train(model, gdp, optimizer, loader.batches(epoch))
    zeros = int((gdp.gates == 0).sum())
    assert gdp.holding and gdp.forced <= zeros // 4, (zeros, gdp.forced)  # lambda made most zeros
    compact = gdp.finalize()
    ratio = count_flops_params(compact, x)[0] / dense_flops
    assert abs(ratio / target - 1) <= 0.02, ratio  # GDP lands in [0.99, 1] x target on any trajectory
