"""LRP alpha-beta (alpha = 2, beta = 1) relevance with the public FRS code's conventions (one-hot start,
biases take none) against values computed by hand."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsetrain.models import create_model
from sparsetrain.structured.relevance import Activation, channel_relevance, input_relevance, post_relu_activations


def _set(layer: nn.Module, weight, bias=None) -> nn.Module:
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight, dtype=torch.float32).view_as(layer.weight))
        if bias is not None:
            layer.bias.copy_(torch.tensor(bias, dtype=torch.float32))
    return layer


def _identity_bn(bn: nn.Module, gamma, beta) -> nn.Module:
    """Batch norm computing gamma * x + beta in eval mode (eps 0, mean 0, variance 1)."""
    bn.eps = 0.0
    bn.running_mean.zero_()
    bn.running_var.fill_(1.0)
    return _set(bn, gamma, beta)


class MLP(nn.Module):
    def __init__(self, bn: bool = False) -> None:
        super().__init__()
        self.fc1 = _set(nn.Linear(2, 2), [[1, 2], [3, -1]], [0.5, -1])
        self.bn = _identity_bn(nn.BatchNorm1d(2), [2, 0.5], [1, 0]) if bn else nn.Identity()
        self.relu = nn.ReLU()
        self.fc2 = _set(nn.Linear(2, 3), [[1, -1], [2, 1], [-1, 0.5]], [1, 0, -0.5])

    def forward(self, x):
        return self.fc2(self.relu(self.bn(self.fc1(x))))


X = torch.tensor([[2.0, -1.0]])


def test_linear_relu_linear_by_hand():
    # Hidden pre-activations 2 - 2 + 0.5 = 0.5 and 6 + 1 - 1 = 6. Relevance starts as the one-hot
    # of class 2 (R = 1), whatever its logit; biases take none.
    # fc2, output 2: contributions -0.5, 3; z+ = 3, z- = -0.5.
    r_hidden = [-1 * (-0.5 / -0.5) * 1, 2 * (3 / 3) * 1]  # [-1, 2], as the public FRS code gives
    # fc1, unit 0 (R = -1): contributions 2, -2; z+ = 2, z- = -2.
    # fc1, unit 1 (R = 2): contributions 6, 1; z+ = 7, z- = 0 (nothing negative).
    r_input = [2 * (2 / 2) * -1 + 2 * (6 / 7) * 2, -1 * (-2 / -2) * -1 + 2 * (1 / 7) * 2]
    model, y = MLP(), torch.tensor([2])
    relevance = channel_relevance(model, X, y)
    assert list(relevance) == ["relu"]
    torch.testing.assert_close(relevance["relu"], torch.tensor([[-1.0, 2.0]]), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(relevance["relu"], torch.tensor([r_hidden]), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(input_relevance(model, X, y), torch.tensor([r_input]), rtol=1e-6, atol=1e-6)


def test_batch_norm_passes_relevance_through():
    # BN maps the pre-activations 0.5, 6 to 2 * 0.5 + 1 = 2 and 0.5 * 6 = 3.
    # fc2, output 0 (R = 1): contributions 2, -3; z+ = 2, z- = -3.
    r_hidden = [2 * (2 / 2) * 1, -1 * (-3 / -3) * 1]  # [2, -1]
    # fc1 sees those relevances unchanged at its outputs, with its own (pre-BN) contributions.
    r_input = [2 * (2 / 2) * 2 + 2 * (6 / 7) * -1, -1 * (-2 / -2) * 2 + 2 * (1 / 7) * -1]
    model, y = MLP(bn=True), torch.tensor([0])
    relevance = channel_relevance(model, X, y)
    torch.testing.assert_close(relevance["relu"], torch.tensor([r_hidden]), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(input_relevance(model, X, y), torch.tensor([r_input]), rtol=1e-6, atol=1e-6)


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = _set(nn.Conv2d(1, 2, (1, 2)), [[1, 2], [-1, 1]], [0.5, 0])
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = _set(nn.Linear(2, 2), [[1, -1], [-2, 1]], [0, 1])

    def forward(self, x):
        return self.fc(self.pool(self.relu(self.conv(x))).flatten(1))


def test_conv_pool_linear_by_hand():
    # Input row [2, -1, 3]. Channel 0 (w [1, 2], b 0.5): 0.5, 5.5; channel 1 (w [-1, 1]): -3 -> 0, 4.
    # Pooled [3, 2]; class 0 starts with R = 1. fc, output 0: contributions 3, -2; z+ = 3, z- = -2.
    r_pooled = [2 * (3 / 3) * 1, -1 * (-2 / -2) * 1]  # [2, -1]
    # Average pooling shares in proportion to the activations.
    r_act = [[0.5 / 6 * r_pooled[0], 5.5 / 6 * r_pooled[0]], [0.0, 4 / 4 * r_pooled[1]]]
    # Conv (its bias takes nothing), channel 0 at position 0: contributions 2, -2, z+ = 2, z- = -2;
    # position 1: contributions -1, 6, z+ = 6, z- = -1; channel 1 at position 1: 1, 3, z+ = 4.
    r_input = [
        2 * (2 / 2) * r_act[0][0],
        -1 * (-2 / -2) * r_act[0][0] - 1 * (-1 / -1) * r_act[0][1] + 2 * (1 / 4) * r_act[1][1],
        2 * (6 / 6) * r_act[0][1] + 2 * (3 / 4) * r_act[1][1],
    ]
    model, x, y = ConvNet(), torch.tensor([[[[2.0, -1.0, 3.0]]]]), torch.tensor([0])
    relevance = channel_relevance(model, x, y)
    expected = torch.tensor([[sum(r_act[0]) / 2, sum(r_act[1]) / 2]])  # spatial means [1, -0.5]
    torch.testing.assert_close(relevance["relu"], expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(input_relevance(model, x, y), torch.tensor([[[r_input]]]), rtol=1e-6, atol=1e-6)


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc_u = _set(nn.Linear(1, 2, bias=False), [[2], [1]])
        self.fc_v = _set(nn.Linear(1, 2, bias=False), [[1], [3]])
        self.relu_u, self.relu_v = nn.ReLU(), nn.ReLU()
        self.fc = _set(nn.Linear(2, 2), [[1, -1], [0.5, 0.5]], [0, 0])

    def forward(self, x):
        return self.fc(self.relu_u(self.fc_u(x)) + self.relu_v(self.fc_v(x)))


def test_residual_add_splits_in_proportion():
    # u = [2, 1], v = [1, 3], sum [3, 4]; class 0 (R = 1, its logit is -1): contributions 3, -4.
    r_sum = [2 * (3 / 3) * 1, -1 * (-4 / -4) * 1]  # [2, -1]
    relevance = channel_relevance(Residual(), torch.tensor([[1.0]]), torch.tensor([0]))
    torch.testing.assert_close(relevance["relu_u"], torch.tensor([[2 / 3 * r_sum[0], 1 / 4 * r_sum[1]]]))
    torch.testing.assert_close(relevance["relu_v"], torch.tensor([[1 / 3 * r_sum[0], 3 / 4 * r_sum[1]]]))


def test_resnet_sources_shapes_and_no_side_effects():
    torch.manual_seed(0)
    model = create_model("resnet20", width=0.25)
    x, y = torch.randn(3, 3, 32, 32), torch.tensor([0, 4, 9])
    activations = post_relu_activations(model, x)
    assert len(activations) == 19  # stem + 2 per block; the classifier has no ReLU after it
    assert activations["relu"] == Activation(("conv1",), after_add=False)
    assert activations["layer1.0.relu1"] == Activation(("layer1.0.conv1",), after_add=False)
    assert activations["layer1.0.relu2"] == Activation(("layer1.0.conv2",), after_add=True)
    assert activations["layer2.0.relu2"] == Activation(("layer2.0.conv2", "layer2.0.shortcut.0"), after_add=True)
    relevance = channel_relevance(model, x, y)
    assert list(relevance) == list(activations)
    assert relevance["layer3.2.relu2"].shape == (3, 16)
    assert model.training and all(p.grad is None for p in model.parameters())
    assert all(torch.isfinite(r).all() for r in relevance.values())


class _WithLayerNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 2)
        self.norm = nn.LayerNorm(2)

    def forward(self, x):
        return self.norm(self.fc(x))


def test_unsupported_models_are_rejected():
    with pytest.raises(ValueError, match="layer 'norm' \\(LayerNorm\\) has parameters but no relevance rule"):
        channel_relevance(_WithLayerNorm(), X, torch.tensor([0]))


class Hidden(nn.Module):
    """fc1 -> ReLU -> fc2 -> ReLU -> fc3 with the ReLUs written in one of the ways users write them."""

    def __init__(self, style: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.fc3 = nn.Linear(3, 6), nn.Linear(6, 6), nn.Linear(6, 3)
        self.style = style
        if style == "modules":
            self.relu1, self.relu2 = nn.ReLU(), nn.ReLU()
        elif style == "one in-place module":
            self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        if self.style == "modules":
            return self.fc3(self.relu2(self.fc2(self.relu1(self.fc1(x)))))
        if self.style == "one in-place module":
            return self.fc3(self.relu(self.fc2(self.relu(self.fc1(x)))))
        return self.fc3(self.fc2(F.relu(self.fc1(x))).relu_())


def test_relus_as_functions_in_place_or_one_module_called_twice_give_the_same_relevance():
    x, y = torch.randn(5, 3, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 0, 1])
    reference = channel_relevance(Hidden("modules"), x, y)
    assert list(reference) == ["relu1", "relu2"] and all(r.abs().sum() > 0 for r in reference.values())
    for style, names in (("one in-place module", ["relu", "relu#2"]), ("functions", ["relu()", "relu()#2"])):
        model = Hidden(style)
        assert post_relu_activations(model, x) == {
            names[0]: Activation(("fc1",), after_add=False), names[1]: Activation(("fc2",), after_add=False)
        }
        relevance = channel_relevance(model, x, y)
        assert list(relevance) == names
        for ours, theirs in zip(relevance.values(), reference.values()):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


class Outputs(nn.Module):
    """MLP's logits inside the containers models return."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.mlp, self.kind = MLP(), kind

    def forward(self, x):
        logits = self.mlp(x)
        return {
            "object": SimpleNamespace(loss=None, logits=logits),
            "tuple": (logits, x),
            "mapping": {"hidden": x, "logits": logits},
            "nothing": (None, "logits"),
        }[self.kind]


def test_the_logits_are_found_in_an_output_object_a_tuple_or_a_mapping():
    expected = torch.tensor([[-1.0, 2.0]])  # as in test_linear_relu_linear_by_hand
    for kind in ("object", "tuple", "mapping"):
        relevance = channel_relevance(Outputs(kind), X, torch.tensor([2]))
        torch.testing.assert_close(relevance["mlp.relu"], expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="the model's output is a tuple without a tensor; allowed: logits, an output "
                                         "object with .logits, or a tuple or mapping whose first tensor is the logits."):
        channel_relevance(Outputs("nothing"), X, torch.tensor([2]))


def test_logits_not_written_by_a_layer_still_start_from_the_one_hot():
    # A view after the classifier: the start is g = one-hot / z at the logits, the same relevance.
    model = nn.Sequential(MLP(), nn.Flatten())
    relevance = channel_relevance(model, X, torch.tensor([2]))
    torch.testing.assert_close(relevance["0.relu"], torch.tensor([[-1.0, 2.0]]), rtol=1e-6, atol=1e-6)
