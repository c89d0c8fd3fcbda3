"""Channel surgery: the compacted model equals the masked one, shrinks, trains, rebuilds from
its widths, and bad requests fail with the model untouched; in tiny transformers only MLP units
form groups (attention is never cut), GPT-2's Conv1D layers are cut, and token ids in a dict trace."""

import copy
import json
import re

import pytest
import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from sparsetrain.measure import count_flops_params
from sparsetrain.models import create_model, rebuild
from sparsetrain.structured import channel_groups, layer_shapes, remove_channels, remove_channels_

CASES = {
    "resnet20": {"width": 0.5},
    "resnet56": {"width": 0.25},
    "mobilenetv1": {"width": 0.25},
    "densenet40": {"growth_rate": 6},
    "vgg16": {},
}


def masked(model: nn.Module, drop: dict[str, list[int]], x: torch.Tensor) -> nn.Module:
    """A copy of ``model`` whose dropped channels output exactly 0 everywhere: every layer writing
    them (per Torch-Pruning's dependency graph) gets zero filters and every batch norm zero scale and shift."""
    model = copy.deepcopy(model)
    graph = tp.DependencyGraph().build_dependency(model, x, verbose=False)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, indices in drop.items():
            layer = modules[name]
            group = graph.get_pruning_group(layer, graph.get_pruner_of_module(layer).prune_out_channels, indices)
            for item in group:
                target, idxs = item.dep.target.module, item.idxs
                if isinstance(target, nn.BatchNorm2d):
                    target.weight[idxs] = 0
                    target.bias[idxs] = 0
                elif isinstance(target, (nn.Conv2d, nn.Linear)) and graph.is_out_channel_pruning_fn(item.dep.handler):
                    target.weight[idxs] = 0
                    if target.bias is not None:
                        target.bias[idxs] = 0
    return model


@pytest.fixture(scope="module", params=list(CASES))
def case(request, randomize_batch_norms):
    """(name, model, drop, compact, x): channels of several groups dropped, each named through one of
    its writers; the input model is checked to be untouched."""
    name = request.param
    torch.manual_seed(0)
    model = create_model(name, **CASES[name])
    randomize_batch_norms(model)
    x = torch.randn(2, 3, 32, 32)
    gen = torch.Generator().manual_seed(1)
    groups = channel_groups(model, x)
    drop = {}
    for group in groups[:: max(1, len(groups) // 5)]:
        writers = [n for n in group.layers if dict(model.named_modules())[n].groups == 1]
        writer = writers[int(torch.randint(len(writers), (1,), generator=gen))]
        count = int(torch.randint(1, group.channels, (1,), generator=gen))
        drop[writer] = torch.randperm(group.channels, generator=gen)[:count].tolist()
    before = copy.deepcopy(model.state_dict())
    compact = remove_channels(model, drop, x)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and model.training
    return name, model, drop, compact, x


def assert_same_output(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))


def test_compact_equals_masked(case):
    _, model, drop, compact, x = case
    reference = masked(model, drop, x).eval()
    with torch.no_grad():
        assert_same_output(compact.eval()(x), reference(x))


def test_counts_drop(case):
    _, model, _, compact, x = case
    flops, params = count_flops_params(model, x)
    small_flops, small_params = count_flops_params(compact, x)
    assert small_params < params and small_flops < flops


def test_compact_trains(case):
    _, _, _, compact, x = case
    compact = copy.deepcopy(compact).train()
    before = [p.detach().clone() for p in compact.parameters()]
    optimizer = torch.optim.SGD(compact.parameters(), lr=0.01)
    loss = F.cross_entropy(compact(x), torch.tensor([0, 1]))
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(a, p) for a, p in zip(before, compact.parameters()))


def test_rebuild_from_shapes(case):
    name, _, _, compact, x = case
    shapes = json.loads(json.dumps(layer_shapes(compact)))
    rebuilt = rebuild(name, CASES[name], shapes)
    rebuilt.load_state_dict(compact.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), compact.eval()(x))


def test_rebuild_rejects_unknown_layers_and_sizes():
    with pytest.raises(ValueError, match="shapes name layer 'layer9.conv'"):
        rebuild("resnet20", {}, {"layer9.conv": {"in_channels": 3, "out_channels": 4, "groups": 1}})
    with pytest.raises(ValueError, match="shape .* of layer 'bn1' is not allowed"):
        rebuild("resnet20", {}, {"bn1": {"num_features": 0}})


def test_resnet20_groups():
    model = create_model("resnet20", width=0.5)
    groups = {g.root: g for g in channel_groups(model, torch.randn(1, 3, 32, 32))}
    assert len(groups) == 3 + 9  # three residual streams, one inner group per block; no classifier
    stream = groups["conv1"]
    assert stream.channels == 8
    assert set(stream.layers) == {"conv1", "layer1.0.conv2", "layer1.1.conv2", "layer1.2.conv2"}
    assert set(stream.readers) == {"layer1.0.conv1", "layer1.1.conv1", "layer1.2.conv1", "layer2.0.conv1", "layer2.0.shortcut.0"}
    last = groups["layer3.0.conv2"]
    assert "layer3.0.shortcut.0" in last.layers and "fc" in last.readers
    assert groups["layer2.1.conv1"].layers == ("layer2.1.conv1",) and groups["layer2.1.conv1"].readers == ("layer2.1.conv2",)


def test_densenet_concatenation_offsets():
    """Dropping channel 2 of the first dense layer's conv2 removes input 12 + 2 of every later reader in the block."""
    model = create_model("densenet40", growth_rate=6)
    x = torch.randn(1, 3, 32, 32)
    compact = remove_channels(model, {"features.0.conv2": [2]}, x)
    for later in range(1, 6):
        old, new = model.features[later].conv1.weight, compact.features[later].conv1.weight
        kept = [c for c in range(old.shape[1]) if c != 12 + 2]
        assert torch.equal(new, old[:, kept])
    assert compact.features[0].conv2.out_channels == 5


def test_count_flops_params_by_hand():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 8 * 8, 2))
    flops, params = count_flops_params(model, torch.randn(1, 3, 8, 8))
    assert flops == 2 * 8 * 8 * 4 * 3 * 9 + 2 * 256 * 2
    assert params == 4 * 27 + 4 + 256 * 2 + 2


class GroupedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.fc = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.grouped(torch.relu(self.conv(x))).mean((2, 3)))


@pytest.mark.parametrize(
    "drop, message",
    [
        ({"layer9.conv": [0]}, "unknown layer 'layer9.conv'"),
        ({"bn1": [0]}, "layer 'bn1' is a BatchNorm2d"),
        ({"layer1.0.conv1": [8]}, "channel index 8 of layer 'layer1.0.conv1' is out of range"),
        ({"layer1.0.conv1": [-1]}, "channel index -1 of layer 'layer1.0.conv1' is out of range"),
        ({"layer1.0.conv1": list(range(8))}, "removing 8 of the 8 channels of layer 'layer1.0.conv1'"),
        ({"conv1": [0, 1, 2, 3], "layer1.1.conv2": [4, 5, 6, 7]}, "removing 8 of the 8 channels of layer 'conv1'"),
        ({"fc": [0]}, "layer 'fc' is the network's output layer"),
    ],
)
def test_bad_requests_leave_model_untouched(drop, message):
    model = create_model("resnet20", width=0.5).train()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        remove_channels(model, drop, torch.randn(1, 3, 32, 32))
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_unsupported_layer_is_named():
    model = GroupedNet()
    with pytest.raises(ValueError, match="coupled to layer 'grouped', which surgery cannot cut"):
        remove_channels(model, {"conv": [0]}, torch.randn(1, 3, 8, 8))
    assert channel_groups(model, torch.randn(1, 3, 8, 8)) == []


def tiny_transformer(name: str) -> nn.Module:
    """A tiny Hugging Face model built from a config (two layers, hidden size 32, MLP width 64)."""
    t = pytest.importorskip("transformers")
    torch.manual_seed(0)
    text = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                max_position_embeddings=32)
    return {
        "bert": lambda: t.BertForSequenceClassification(t.BertConfig(**text, num_labels=3)),
        "vit": lambda: t.ViTForImageClassification(t.ViTConfig(image_size=16, patch_size=4, hidden_size=32,
                                                                num_hidden_layers=2, num_attention_heads=2,
                                                                intermediate_size=64, num_labels=3)),
        "llama": lambda: t.LlamaForCausalLM(t.LlamaConfig(**text, num_key_value_heads=1)),
        "gpt2": lambda: t.GPT2LMHeadModel(t.GPT2Config(n_layer=2, n_embd=32, n_head=2, n_inner=64, vocab_size=64,
                                                       n_positions=32, bos_token_id=0, eos_token_id=0)),
    }[name]()


@pytest.mark.parametrize("name, mlp, attention", [
    ("vit", "vit.layers.{}.mlp.fc1", "vit.layers.0.attention.q_proj"),
    ("llama", "model.layers.{}.mlp.gate_proj", "model.layers.0.self_attn.k_proj"),  # rotary queries and keys
    ("gpt2", "transformer.h.{}.mlp.c_fc", "transformer.h.0.attn.c_attn"),
])
def test_attention_is_never_a_channel_group(name, mlp, attention):
    """Only MLP hidden units form groups; a projection feeding attention is refused naming the operation."""
    model = tiny_transformer(name)
    x = torch.randn(2, 3, 16, 16) if name == "vit" else torch.randint(0, 64, (2, 8))
    assert sorted(g.root for g in channel_groups(model, x)) == [mlp.format(0), mlp.format(1)]
    with pytest.raises(ValueError, match=rf"channels of layer '{re.escape(attention)}' are coupled to operation "
                                         r"'\w*Attention\w*', which surgery cannot cut"):
        remove_channels(model, {attention: [0]}, x)


def test_conv1d_mlp_cut_equals_masked():
    """GPT-2's c_fc (transformers' Conv1D, weight stored (in, out)): removing units equals zeroing their
    columns and biases (gelu(0) = 0), and the compact layers read their new widths."""
    model = tiny_transformer("gpt2").eval()
    x = torch.randint(0, 64, (2, 8))
    compact = remove_channels(model, {"transformer.h.1.mlp.c_fc": [0, 5]}, x).eval()
    reference = copy.deepcopy(model)
    with torch.no_grad():
        reference.transformer.h[1].mlp.c_fc.weight[:, [0, 5]] = 0
        reference.transformer.h[1].mlp.c_fc.bias[[0, 5]] = 0
        assert_same_output(compact(x).logits, reference(x).logits)
    mlp = compact.transformer.h[1].mlp
    assert (mlp.c_fc.weight.shape, mlp.c_fc.nf, mlp.c_proj.weight.shape, mlp.c_proj.nx) == ((32, 62), 62, (62, 32), 62)
    assert compact.transformer.h[0].mlp.c_fc.weight.shape == (32, 64)


def test_token_ids_in_a_dict_cut_in_place_with_the_optimizer_state():
    """BERT with {'input_ids', 'attention_mask'}: the ids stay integers while the surviving indices are
    traced, and the momentum of the cut layers is sliced like their weights."""
    model = tiny_transformer("bert")
    ids = torch.randint(0, 64, (2, 8))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    F.cross_entropy(model(**inputs).logits, torch.tensor([0, 1])).backward()
    optimizer.step()
    layer = model.bert.encoder.layer[0]
    momentum = optimizer.state[layer.intermediate.dense.weight]["momentum_buffer"].clone()
    remove_channels_(model, {"bert.encoder.layer.0.intermediate.dense": [1, 2]}, inputs, optimizer)
    kept = [i for i in range(64) if i not in (1, 2)]
    assert layer.intermediate.dense.weight.shape == (62, 32) and layer.output.dense.weight.shape == (32, 62)
    assert torch.equal(optimizer.state[layer.intermediate.dense.weight]["momentum_buffer"], momentum[kept])
    assert bool(torch.isfinite(model(**inputs).logits).all())
