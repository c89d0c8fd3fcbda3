"""Model zoo: every registered model runs forward/backward; counts, widths and errors are exact."""

import json

import pytest
import torch
from torch import nn

from sparsetrain.models import create_model, input_size, list_models, model_spec, register_model

CIFAR_MODELS = ["densenet40", "mobilenetv1", "resnet110", "resnet20", "resnet20_feather",
                "resnet32", "resnet44", "resnet56", "vgg16", "vit-micro", "vit-tiny"]
IMAGENET_MODELS = ["resnet18", "resnet34", "resnet50"]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def num_classes(name: str) -> int:
    return model_spec(name).defaults["num_classes"]


def test_list_models_is_sorted_and_complete() -> None:
    assert list_models() == sorted(CIFAR_MODELS + IMAGENET_MODELS)


@pytest.mark.parametrize("name", CIFAR_MODELS)
def test_cifar_input_size(name: str) -> None:
    assert input_size(name) == (3, 32, 32)
    assert num_classes(name) == 10


@pytest.mark.parametrize("name", IMAGENET_MODELS)
def test_imagenet_input_size(name: str) -> None:
    assert input_size(name) == (3, 224, 224)
    assert num_classes(name) == 1000


@pytest.mark.parametrize("name", list_models())
def test_forward_backward(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=7)
    channels, height, width = input_size(name)
    side = min(height, 64)  # ImageNet ResNets accept 64x64; keeps the backward pass cheap
    out = model(torch.randn(2, channels, side, side))
    assert out.shape == (2, 7)
    out.square().mean().backward()
    for param_name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), param_name
    assert model.fc.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", IMAGENET_MODELS)
def test_declared_input_size_forward(name: str) -> None:
    model = create_model(name).eval()
    with torch.no_grad():
        out = model(torch.randn(2, *input_size(name)))
    assert out.shape == (2, 1000)


# Hand counts. ResNet-20 (16/32/64, projection shortcuts): stem conv 3*16*9 + BN 32 = 464;
# stage 1: 3 blocks * 2 * (16*16*9 + 32) = 14016; stage 2: first block 16*32*9 + 32*32*9
# + 1x1 shortcut 16*32 + 3 BN * 64 = 14528, then 2 blocks * 2 * (32*32*9 + 64) = 37120;
# stage 3: 32*64*9 + 64*64*9 + 32*64 + 3 * 128 = 57728, then 2 * 2 * (64*64*9 + 128) = 147968;
# fc 64*10 + 10 = 650; total 272474.
# MobileNetV1: stem 3*32*9 + 64 = 928; each block C->C' adds 9C + 2C (depthwise + BN)
# and C*C' + 2C' (pointwise + BN); fc 1024*10 + 10; total 3217226.
# VGG-16-BN (bias-free convs): conv weights 14710464, BN 8448, fc 512*10 + 10; total 14724042.
# ViT-Tiny (width 192, depth 12, MLP 768, 10 classes): per block 2 LN * 384 + qkv 192*576 + 576
# + proj 192*192 + 192 + fc1 192*768 + 768 + fc2 768*192 + 192 = 444864, 12 blocks 5338368;
# patch embedding 3*16*192 + 192 = 9408, class token 192, positions 65*192 = 12480, final LN 384,
# head 192*10 + 10 = 1930; total 5362762.
# ImageNet ResNets: the published counts of the reference models.
@pytest.mark.parametrize("name, expected", [
    ("resnet20", 272_474),
    ("mobilenetv1", 3_217_226),
    ("vgg16", 14_724_042),
    ("vit-tiny", 5_362_762),
    ("resnet18", 11_689_512),
    ("resnet50", 25_557_032),
])
def test_parameter_count(name: str, expected: int) -> None:
    assert n_params(create_model(name)) == expected


def test_resnet20_feather_doubles_widths() -> None:
    model = create_model("resnet20_feather")
    assert model.conv1.out_channels == 32
    stages = (model.layer1, model.layer2, model.layer3)
    assert [stage[0].conv2.out_channels for stage in stages] == [32, 64, 128]
    assert model.fc.in_features == 128


def test_densenet40_channels() -> None:
    # 2k = 48 stem; blocks add 6 * 24; transitions halve: 48 -> 192 -> 96 -> 240 -> 120 -> 264.
    model = create_model("densenet40")
    assert model.conv1.out_channels == 48
    assert model.fc.in_features == 264
    assert create_model("densenet40", growth_rate=12).fc.in_features == 132


@pytest.mark.parametrize("width, stem, last", [(0.5, 8, 32), (0.3, 5, 19), (2.0, 32, 128)])
def test_resnet_width_multiplier(width: float, stem: int, last: int) -> None:
    model = create_model("resnet20", width=width)
    assert model.conv1.out_channels == stem
    assert model.layer3[-1].conv2.out_channels == last
    assert model.fc.in_features == last
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_mobilenet_width_multiplier() -> None:
    model = create_model("mobilenetv1", width=0.25)
    assert model.conv1.out_channels == 8
    assert model.features[0].conv_dw.groups == 8
    assert model.fc.in_features == 256


def test_unknown_model_names_value_and_known_models() -> None:
    with pytest.raises(ValueError) as info:
        create_model("resnet21")
    message = str(info.value)
    assert "'resnet21'" in message
    assert "known models: " + ", ".join(list_models()) in message
    with pytest.raises(ValueError, match="'resnet21'"):
        input_size("resnet21")


@pytest.mark.parametrize("name", list_models())
def test_unknown_kwarg_names_argument_and_allowed_ones(name: str) -> None:
    with pytest.raises(ValueError) as info:
        create_model(name, colour=3)
    message = str(info.value)
    assert "'colour'" in message and f"'{name}'" in message
    assert "allowed arguments: " + ", ".join(model_spec(name).defaults) in message


@pytest.mark.parametrize("kwargs, match", [
    ({"width": 0}, "width must be a positive finite number, got 0"),
    ({"width": -1.5}, "got -1.5"),
    ({"num_classes": 0}, "num_classes must be a positive integer, got 0"),
    ({"num_classes": 2.5}, "got 2.5"),
    ({"width": float("nan")}, "not JSON-serialisable"),
    ({"width": (1, 2)}, None),
])
def test_bad_argument_values_raise_value_error(kwargs: dict, match: str | None) -> None:
    with pytest.raises(ValueError, match=match):
        create_model("resnet20", **kwargs)


def test_non_json_value_is_rejected() -> None:
    with pytest.raises(ValueError, match="width=.*not JSON-serialisable"):
        create_model("resnet20", width=torch.tensor(1.0))


@pytest.mark.parametrize("name", list_models())
def test_defaults_round_trip_through_json(name: str) -> None:
    config = json.loads(json.dumps({"name": name, "kwargs": dict(model_spec(name).defaults)}))
    assert isinstance(create_model(config["name"], **config["kwargs"]), nn.Module)


@pytest.mark.parametrize("name", ["resnet20", "mobilenetv1", "densenet40", "vgg16"])
def test_same_seed_same_model(name: str) -> None:
    torch.manual_seed(3)
    first = create_model(name, num_classes=5).state_dict()
    torch.manual_seed(3)
    second = create_model(name, num_classes=5).state_dict()
    assert list(first) == list(second)
    for key in first:
        assert first[key].shape == second[key].shape
        assert torch.equal(first[key], second[key]), key


def test_init_is_kaiming_fan_out_and_bn_identity() -> None:
    torch.manual_seed(0)
    model = create_model("resnet56")
    conv = model.layer3[0].conv2  # 64 out channels, 3x3: fan_out = 576, std = sqrt(2 / 576)
    assert conv.weight.std().item() == pytest.approx((2 / 576) ** 0.5, rel=0.05)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            assert torch.equal(module.weight, torch.ones_like(module.weight))
            assert torch.equal(module.bias, torch.zeros_like(module.bias))


def test_register_model_rejects_duplicates_and_bad_factories() -> None:
    with pytest.raises(ValueError, match="'resnet20' is already registered"):
        register_model("resnet20")(lambda num_classes=10: nn.Linear(1, num_classes))
    with pytest.raises(ValueError, match="lacks the required 'num_classes'"):
        register_model("no_classes_model")(lambda width=1.0: nn.Linear(1, 1))
    with pytest.raises(ValueError, match="'hidden' of model 'no_default_model' has no default"):
        register_model("no_default_model")(lambda hidden, num_classes=10: nn.Linear(1, 1))
    assert "no_classes_model" not in list_models() and "no_default_model" not in list_models()
