"""GDP on the models users bring: tiny BERT (dict inputs), ViT, Llama and GPT-2 (transformers' Conv1D)
built from configs, CNNs written with F.relu (plain and residual) and Hugging Face's ResNet. Each trains
a few steps in the README's bare loop, lands on its FLOPs target, and finalizes to a compact model
that computes what the gated one computed and runs on new inputs; in a transformer only MLP hidden
units are gated and removed, never a channel of attention or of the residual stream. A model whose
gated channels are mixed on the way, or that has nothing GDP can gate, is refused at create(). A
compact transformer goes through save_pretrained and comes back, with its own width in every layer,
through st.load_compact (or plain from_pretrained when every MLP kept the same width)."""

import copy
import re
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from user_models import ResidualCNN, bare_loop, logits

import sparsetrain as st
from sparsetrain.calls import call_model
from sparsetrain.measure import output_width
from sparsetrain.methods import GDP
from sparsetrain.structured.surgery import ChannelGroup, layer_shapes, resize_

transformers = pytest.importorskip("transformers")

STEPS, TARGET, CLASSES, VOCAB = 6, 0.7, 3, 64


class PlainCNN(nn.Module):
    """Convolutions, batch norms and F.relu, as users write them."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        return self.fc(F.relu(self.bn2(self.conv2(x))).mean((2, 3)))


def build(name: str) -> nn.Module:
    """A fresh tiny model (seeded) by name."""
    torch.manual_seed(0)
    t = transformers
    text = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                max_position_embeddings=32)
    builders = {
        "plain-cnn": PlainCNN,
        "residual-cnn": ResidualCNN,
        "bert": lambda: t.BertForSequenceClassification(t.BertConfig(**text, num_labels=CLASSES)),
        "vit": lambda: t.ViTForImageClassification(t.ViTConfig(image_size=16, patch_size=4, hidden_size=32,
                                                                num_hidden_layers=2, num_attention_heads=2,
                                                                intermediate_size=128, num_labels=CLASSES)),
        "llama": lambda: t.LlamaForCausalLM(t.LlamaConfig(**text, num_key_value_heads=1)),
        "gpt2": lambda: t.GPT2LMHeadModel(t.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=32,
                                                       bos_token_id=0, eos_token_id=0)),
        "hf-resnet": lambda: t.ResNetForImageClassification(t.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16],
                                                                           depths=[1, 1], layer_type="basic",
                                                                           num_labels=10)),
    }
    return builders[name]()


TRANSFORMERS = ("bert", "vit", "llama", "gpt2")
MODELS = ["plain-cnn", "residual-cnn", "hf-resnet", *TRANSFORMERS]


def batch(name: str, seed: int) -> tuple[torch.Tensor | dict[str, torch.Tensor], torch.Tensor]:
    """Inputs and labels: BERT's as a dict with an attention mask, a language model's token ids with
    one label per token, else 16x16 (ResNet: 32x32) images."""
    gen = torch.Generator().manual_seed(seed)
    if name == "bert":
        ids = torch.randint(0, VOCAB, (4, 8), generator=gen)
        mask = torch.ones_like(ids)
        mask[0, 6:] = 0  # one padded sequence
        return {"input_ids": ids, "attention_mask": mask}, torch.randint(0, CLASSES, (4,), generator=gen)
    if name in ("llama", "gpt2"):
        return torch.randint(0, VOCAB, (4, 8), generator=gen), torch.randint(0, VOCAB, (4, 8), generator=gen)
    size = 32 if name == "hf-resnet" else 16
    return torch.randn(4, 3, size, size, generator=gen), torch.randint(0, 10 if name == "hf-resnet" else CLASSES, (4,),
                                                                        generator=gen)


def flops(model: nn.Module, inputs: torch.Tensor | dict[str, torch.Tensor]) -> int:
    """FLOPs of one eval forward pass, attention by its math path (as sparsetrain counts them)."""
    model.eval()
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        call_model(model, inputs)
    return counter.get_total_flops()


def shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Parameter shapes by plain name (a parametrized weight under its own name)."""
    return {n.replace(".parametrizations.weight.original", ".weight"): tuple(p.shape) for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", MODELS)
def test_gdp_trains_lands_on_target_and_compact_equals_gated(name):
    model = build(name)
    example = batch(name, 100)[0]
    dense = copy.deepcopy(model)
    # prune_end=0.5: the pruning window ends at step 3 of 6, where the safeguard meets the target;
    # tolerance 0.1: a channel of these tiny models costs up to a few % of their FLOPs
    method = st.create(model, "gdp", total_steps=STEPS, example_inputs=example, flops_target=TARGET, prune_end=0.5,
                       tolerance=0.1)
    groups = method.groups
    bare_loop(model, method, [batch(name, step) for step in range(STEPS)])
    assert method.holding
    hard = method.flops_ratio(hard=True)
    assert TARGET * (1 - method.tolerance) <= hard <= TARGET
    kept = method.kept_channels()
    assert sum(kept.values()) < sum(g.channels for g in groups)  # channels are removed
    before = shapes(model)
    model.eval()
    with torch.no_grad():
        gated = logits(model, example)
    compact = method.finalize().eval()
    assert compact is model and not any(hasattr(m, "parametrizations") for m in compact.modules())
    with torch.no_grad():
        # The compact model multiplies the folded weights W * g (the product the gated forward pass
        # computes) and drops terms that were exactly 0; float32 sums over fewer terms in another
        # order differ at the rounding level (~1e-7 relative), far below 1e-5 of the largest logit.
        torch.testing.assert_close(logits(compact, example), gated, rtol=1e-5, atol=1e-5 * float(gated.abs().max()))
        fresh = logits(compact, batch(name, 99)[0])
    assert fresh.shape[0] == 4 and bool(torch.isfinite(fresh).all())
    modules = dict(compact.named_modules())
    assert {g.root: output_width(modules[g.root]) for g in groups} == kept
    assert flops(compact, example) / flops(dense, example) == pytest.approx(hard, rel=1e-9)
    if name in TRANSFORMERS:
        assert all(re.search(r"\.(mlp|intermediate)\.", g.root) or g.root == "bert.pooler.dense" for g in groups), groups
        assert sum(".mlp." in g.root or ".intermediate." in g.root for g in groups) == 2  # one MLP per layer
        changed = {n for n, shape in shapes(compact).items() if before[n] != shape}
        cut = {f"{layer}.{p}" for g in groups for layer in (*g.layers, *g.readers) for p in ("weight", "bias")}
        assert changed and changed <= cut  # nothing but the gated MLPs' (and BERT pooler's) layers shrank
        assert not any(re.search(r"attn|attention|embed|norm", n) for n in changed), changed


def test_gpt2_mlp_gates_read_conv1d_weights_along_their_input_rows():
    """transformers' Conv1D stores (in, out): c_proj's gate scales rows of its weight, and
    finalize() cuts c_fc's columns, its bias, c_proj's rows and updates the width its forward reads."""
    model = build("gpt2")
    x = batch("gpt2", 0)[0]
    method = GDP(model, 0.5, 10, x)
    mlp = model.transformer.h[0].mlp
    roots = [g.root for g in method.groups]
    assert sorted(roots) == ["transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc"]
    offset = sum(g.channels for g in method.groups[:roots.index("transformer.h.0.mlp.c_fc")])
    with torch.no_grad():
        method.gates[offset:offset + 128] = 0.5
        method.gates[offset + 3] = 0
    gate = 0.25 / (0.25 + method.eps)
    original = mlp.c_proj.parametrizations.weight.original
    expected = original.detach().clone() * gate
    expected[3] = 0
    torch.testing.assert_close(mlp.c_proj.weight, expected)
    method.finalize()
    assert mlp.c_fc.weight.shape == (32, 127) and mlp.c_fc.bias.shape == (127,) and mlp.c_fc.nf == 127
    assert mlp.c_proj.weight.shape == (127, 32) and mlp.c_proj.nx == 127
    assert bool(torch.isfinite(logits(model, batch("gpt2", 1)[0])).all())


class CenteredCNN(nn.Module):
    """conv1's channels are centred by their mean across channels before conv2 reads them: removing
    one changes the others, and a mean is channel-wise elsewhere (pooling), so only running the
    model finds it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = x - x.mean(1, keepdim=True)
        return self.fc(F.relu(self.conv2(x)).mean((2, 3)))


class AttentionOnly(nn.Module):
    """Embeddings, one attention layer and a head: no MLP, so no unit GDP may gate."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.q, self.k, self.v, self.o = (nn.Linear(16, 16) for _ in range(4))
        self.head = nn.Linear(16, CLASSES)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        q, k, v = (p(h).unflatten(-1, (2, 8)).transpose(1, 2) for p in (self.q, self.k, self.v))
        h = h + self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))
        return self.head(h.mean(1))


class PreNormBlock(nn.Module):
    """A residual stream normalized by F.layer_norm without parameters, and one MLP on it."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.fc1, self.fc2, self.head = nn.Linear(8, 16), nn.Linear(16, 32), nn.Linear(32, 16), nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        h = h + self.fc2(F.gelu(self.fc1(F.layer_norm(h, (16,)))))
        return self.head(F.layer_norm(h, (16,)))


def test_a_stream_normalized_across_its_features_is_left_ungated():
    """The residual stream passes a layer norm (an operation, no module with parameters to refuse):
    its group is left out, and only the MLP's hidden units are gated."""
    model = PreNormBlock()
    method = st.create(model, "gdp", total_steps=10, example_inputs=torch.randn(4, 8))
    assert [(g.root, g.channels, g.readers) for g in method.groups] == [("fc1", 32, ("fc2",))]


def test_channels_mixed_on_the_way_are_refused_at_create_naming_the_layer():
    model = CenteredCNN()
    message = ("GDP cannot gate the channels of layer 'conv1' (read by conv2): removing one changes what the model "
               "computes with its gate at zero, so something between these layers mixes channels; allowed: models "
               "whose gated channels reach the next layers through channel-wise operations.")
    with pytest.raises(ValueError, match=re.escape(message)):
        st.create(model, "gdp", total_steps=10, example_inputs=torch.randn(2, 3, 8, 8))
    assert not any(hasattr(m, "parametrizations") for m in model.modules())  # the model is left as it was


def test_a_model_with_attention_only_is_refused_at_create():
    message = ("model AttentionOnly has no channel group GDP can gate; allowed: a model with regular convolutions whose "
               "channels are read by another convolution or linear layer, or a transformer's MLP.")
    with pytest.raises(ValueError, match=re.escape(message)):
        st.create(AttentionOnly(), "gdp", total_steps=10, example_inputs=torch.randint(0, VOCAB, (2, 8)))


@pytest.mark.parametrize("inputs", [[1, 2], {}, {"input_ids": [1, 2]}])
def test_example_inputs_must_be_a_tensor_or_a_dict_of_tensors(inputs):
    with pytest.raises(ValueError, match=re.escape(f"example_inputs={inputs!r} is not allowed; allowed: a tensor batch")):
        GDP(PlainCNN(), 0.5, 10, inputs)


def finalized_with_zero_gates(name: str, zeros: Callable[[ChannelGroup, int], int]) -> tuple[nn.Module, dict[str, int]]:
    """Tiny ``name`` under GDP with the first ``zeros(group, k)`` gates of its k-th group at exactly 0
    (as the proximal step leaves them), finalized, in eval mode; and the channels kept, by group root."""
    model = build(name)
    method = GDP(model, 0.5, 10, batch(name, 100)[0])
    with torch.no_grad():
        for k, (group, gates) in enumerate(zip(method.groups, method.gates.split([g.channels for g in method.groups]))):
            gates[:zeros(group, k)] = 0
    kept = method.kept_channels()
    return method.finalize().eval(), kept


def width_key(name: str) -> str:
    return "n_inner" if name == "gpt2" else "intermediate_size"


def assert_same_model(loaded: nn.Module, compact: nn.Module, name: str) -> None:
    assert not loaded.training and shapes(loaded) == shapes(compact)
    x = batch(name, 7)[0]
    with torch.no_grad():
        out = logits(loaded, x)
        # the same weights through the same code on the same inputs: equal bit for bit (tolerance 0)
        torch.testing.assert_close(out, logits(compact, x), rtol=0, atol=0)
    assert bool(torch.isfinite(out).all())


@pytest.mark.parametrize("name", TRANSFORMERS)
def test_a_compact_transformer_with_a_width_per_layer_round_trips_through_load_compact(name, tmp_path):
    compact, kept = finalized_with_zero_gates(name, lambda group, k: 3 + 4 * k)  # 3, 7 (BERT: 11) units out
    assert len(set(kept.values())) == len(kept)  # every group its own width
    assert getattr(compact.config, width_key(name)) == getattr(build(name).config, width_key(name))
    dense = layer_shapes(build(name))
    recorded = compact.config.sparsetrain_shapes
    assert recorded == {layer: sizes for layer, sizes in layer_shapes(compact).items() if dense[layer] != sizes}
    assert {root: recorded[root]["nf" if name == "gpt2" else "out_features"] for root in kept} == kept
    compact.save_pretrained(tmp_path)
    with pytest.raises(RuntimeError, match="mismatch"):  # what load_compact is for
        type(compact).from_pretrained(tmp_path)
    assert_same_model(st.load_compact(type(compact), tmp_path), compact, name)


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_mlps_that_kept_one_width_set_it_in_the_config_and_plain_from_pretrained_loads_them(name, tmp_path):
    mlp = re.compile(r"\.(mlp|intermediate)\.")
    compact, _ = finalized_with_zero_gates(name, lambda group, k: 5 if mlp.search(group.root) else 0)
    assert getattr(compact.config, width_key(name)) == 128 - 5 and not hasattr(compact.config, "sparsetrain_shapes")
    compact.save_pretrained(tmp_path)
    assert_same_model(type(compact).from_pretrained(tmp_path), compact, name)
    assert_same_model(st.load_compact(type(compact), tmp_path), compact, name)


def test_the_config_of_a_wrapped_transformer_follows_its_resized_layers():
    """Names are the transformer's own; a recorded shape that no longer differs is dropped when one
    width describes every layer again."""
    wrapper = nn.Module()
    wrapper.net = build("bert")  # as a LightningModule holds its model
    config = wrapper.net.config

    def narrow(layer: int) -> dict[str, dict[str, int]]:
        prefix = f"bert.encoder.layer.{layer}"
        return {f"{prefix}.intermediate.dense": {"in_features": 32, "out_features": 100},
                f"{prefix}.output.dense": {"in_features": 100, "out_features": 32}}

    resize_(wrapper, {f"net.{layer}": sizes for layer, sizes in narrow(0).items()})
    assert config.sparsetrain_shapes == narrow(0) and config.intermediate_size == 128
    resize_(wrapper, {f"net.{layer}": sizes for layer, sizes in narrow(1).items()})
    assert config.intermediate_size == 100 and not hasattr(config, "sparsetrain_shapes")


class MetaShyModel(nn.Module):
    """A model with a Hugging Face model's config and save_pretrained whose __init__ needs real
    tensors (as one reading a tensor's value with .item() does): it cannot be built on the meta device."""

    def __init__(self, config: transformers.PretrainedConfig) -> None:
        super().__init__()
        if torch.empty(()).is_meta:
            raise RuntimeError("MetaShyModel needs real tensors")
        self.config = config
        self.fc1, self.fc2 = nn.Linear(4, config.intermediate_size), nn.Linear(config.intermediate_size, 2)

    def save_pretrained(self, folder: str) -> None:
        self.config.save_pretrained(folder)


def test_a_model_that_cannot_be_built_on_the_meta_device_records_every_layer():
    model = MetaShyModel(transformers.PretrainedConfig(intermediate_size=8))
    resize_(model, {"fc1": {"in_features": 4, "out_features": 6}, "fc2": {"in_features": 6, "out_features": 2}})
    assert model.config.sparsetrain_shapes == layer_shapes(model) == {
        "fc1": {"in_features": 4, "out_features": 6}, "fc2": {"in_features": 6, "out_features": 2}}
    assert model.config.intermediate_size == 8


def test_load_compact_refuses_what_is_not_a_model_class_or_a_saved_folder(tmp_path):
    message = ("model_class=Linear(in_features=2, out_features=2, bias=True) is not allowed; allowed: a Hugging Face "
               "model class (one with a config_class), such as BertForSequenceClassification.")
    with pytest.raises(ValueError, match=re.escape(message)):
        st.load_compact(nn.Linear(2, 2), tmp_path)
    with pytest.raises(ValueError, match=re.escape("holds no config.json; allowed: a folder save_pretrained wrote.")):
        st.load_compact(transformers.BertForSequenceClassification, tmp_path)
