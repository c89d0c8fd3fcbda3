"""FRS on the models users bring: CNNs written with F.relu (plain and residual), a CNN whose one in-place
ReLU module is called three times and Hugging Face's ResNet prune in the README's bare loop and run
afterwards; transformers and a CNN without ReLUs are refused at create() naming the layer."""

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsetrain as st
from sparsetrain.calls import logits_of
from sparsetrain.methods.frs import candidates
from sparsetrain.structured.relevance import post_relu_activations
from sparsetrain.structured.surgery import channel_groups

transformers = pytest.importorskip("transformers")


class PlainCNN(nn.Module):
    """ReLUs as functions only: F.relu, torch.relu and F.relu in place (after a conv without batch norm)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.conv3 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(torch.relu(self.bn2(self.conv2(x))), 2)
        x = F.relu(self.conv3(x), inplace=True)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + (x if self.shortcut is None else self.shortcut(x)))


class ResidualCNN(nn.Module):
    """F.relu everywhere; the residual adds couple the stem with block1 and block2 with its shortcut."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.block1, self.block2 = Block(8, 8, 1), Block(8, 16, 2)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.block1(F.relu(self.bn(self.conv(x)))))
        return self.fc(x.mean((2, 3)))


class SharedReLUCNN(nn.Module):
    """torchvision's style: one nn.ReLU(inplace=True) called three times, the residual added in place."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv3, self.bn3 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        out = self.bn3(self.conv3(self.relu(self.bn2(self.conv2(x)))))
        out += x
        out = self.relu(out)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


def hf_resnet() -> nn.Module:
    config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic",
                                       num_labels=10)
    return transformers.ResNetForImageClassification(config)


HF_STAGE = "resnet.encoder.stages.{}.layers.0"
# case: (model, its ReLUs in forward order, the ReLUs scoring a residual stream). A stream is scored only at
# its block outputs (the ReLU after each add), never at the stem's ReLU, which is then not scored at all.
WORKING = {
    "plain F.relu": (PlainCNN, ["relu()", "relu()#2", "relu()#3"], []),
    "residual F.relu": (ResidualCNN, ["relu()", "block1.relu()", "block1.relu()#2", "block2.relu()", "block2.relu()#2"],
                        ["block1.relu()#2", "block2.relu()#2"]),
    "shared in-place nn.ReLU": (SharedReLUCNN, ["relu", "relu#2", "relu#3"], ["relu#3"]),
    "Hugging Face ResNet": (
        hf_resnet,
        ["resnet.embedder.embedder.activation"] + [
            name for stage in (0, 1)
            for name in (f"{HF_STAGE.format(stage)}.layer.0.activation", f"{HF_STAGE.format(stage)}.activation")
        ],
        [f"{HF_STAGE.format(0)}.activation", f"{HF_STAGE.format(1)}.activation"],
    ),
}


def _batches(count: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, 16, 16, generator=gen), torch.randint(0, 10, (8,), generator=gen)) for _ in range(count)]


def _width(model: nn.Module, example: torch.Tensor) -> int:
    return sum(group.channels for group in channel_groups(model, example))


@pytest.mark.parametrize("case", list(WORKING))
def test_frs_prunes_a_user_model_in_the_bare_loop_and_it_runs(case):
    build, names, _ = WORKING[case]
    torch.manual_seed(0)
    model = build()
    batches = _batches(4)
    example = batches[0][0][:2]
    assert list(post_relu_activations(model, example)) == names
    width = _width(model, example)
    method = st.create(model, "frs", total_steps=4, example_inputs=example, data=batches[:2], prune_every=2, stop_at=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    method.bind(optimizer)
    pruned = []
    for x, y in batches:
        loss = F.cross_entropy(logits_of(model(x)), y)
        optimizer.zero_grad()
        loss.backward()
        method.before_optimizer_step()
        optimizer.step()
        pruned.append(method.step())
    assert pruned == [False, True, False, True]
    compact = method.finalize()

    # Channels were removed for real, each from its whole coupled group, and FLOPs dropped.
    removed = method.channels_removed
    assert compact is model and removed > 0 and method.prunes_done == 2
    assert width - _width(compact, example) == removed
    assert method.metrics()["flops_ratio"] < 1.0
    with torch.no_grad():
        out = logits_of(compact.eval()(torch.randn(3, 3, 20, 20, generator=torch.Generator().manual_seed(5))))
    assert out.shape == (3, 10) and torch.isfinite(out).all()


@pytest.mark.parametrize("case", list(WORKING))
def test_every_relu_after_a_layer_scores_and_a_stream_only_at_its_block_outputs(case):
    build, names, streams = WORKING[case]
    torch.manual_seed(0)
    found = candidates(build(), torch.zeros(2, 3, 16, 16))
    assert sorted(c.activations for c in found if len(c.group.layers) > 1) == [(name,) for name in streams]
    assert sorted(name for c in found for name in c.activations) == sorted(names[1:] if streams else names)
    assert {c.pool for c in found} == {"conv"}


def _tiny_transformers() -> dict[str, tuple[nn.Module, torch.Tensor, str]]:
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    bert = transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32, num_labels=10))
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
    vit = transformers.ViTForImageClassification(transformers.ViTConfig(
        image_size=16, patch_size=4, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        num_labels=10))
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=32))
    return {
        "bert": (bert, ids, "layer 'bert.embeddings.word_embeddings' (Embedding)"),
        "gpt2": (gpt2, ids, "layer 'transformer.wte' (Embedding)"),
        "vit": (vit, torch.zeros(2, 3, 16, 16), "layer 'vit.embeddings' (ViTEmbeddings)"),
        "llama": (llama, ids, "layer 'model.embed_tokens' (Embedding)"),
    }


@pytest.mark.parametrize("name", ["bert", "gpt2", "vit", "llama"])
def test_transformers_are_refused_at_create_naming_the_layer(name):
    torch.manual_seed(0)
    model, example, layer = _tiny_transformers()[name]
    message = (f"{layer} has parameters but no relevance rule; allowed: Linear, Conv1d/2d/3d and BatchNorm1d/2d/3d "
               "with parameters, any parameter-free module.")
    with pytest.raises(ValueError, match=re.escape(message)):
        st.create(model, "frs", total_steps=10, example_inputs=example, data=[])


class NoReLUCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.silu(self.bn1(self.conv1(x)))
        return self.fc(torch.tanh(self.conv2(x)).mean((2, 3)))


def test_a_cnn_without_relus_is_refused_at_create_naming_its_first_prunable_layer():
    model = NoReLUCNN()
    message = ("FRS has no channel of NoReLUCNN to score: no ReLU follows layer 'conv1' or any other prunable layer "
               "through batch norms and residual adds; allowed: models whose hidden Conv/Linear layers feed a ReLU "
               "(nn.ReLU, F.relu or torch.relu, in place or not).")
    with pytest.raises(ValueError, match=re.escape(message)):
        st.create(model, "frs", total_steps=10, example_inputs=torch.zeros(2, 3, 16, 16), data=_batches(1))
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())  # nothing left attached
