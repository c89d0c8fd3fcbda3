"""The models users bring: user-written CNNs (F.relu, a residual, an in-place ReLU module called
several times) and tiny Hugging Face transformers built from configs (BERT, GPT-2, ViT, Llama,
ResNet). Every unstructured and N:M preset trains on each in the bare loop, finalizes to a model
that runs, keeps its promise (round(s N) zeros; at most N non-zeros per group of M along each
layer's input dimension) and leaves dense what the default exclusions name. Also: the layer
filters (exclude, types) everywhere options are given, and every method's sparsity() and
metrics() before and after finalize()."""

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from user_models import InplaceCNN, PlainCNN, ResidualCNN, bare_loop, logits

import sparsetrain as st
from sparsetrain.methods import method_spec
from sparsetrain.methods.unstructured import NMOptions, UnstructuredOptions, nm_presets
from sparsetrain.models import create_model
from sparsetrain.nm import to_groups
from sparsetrain.prunable import EMBEDDING, out_in, stores_transposed

transformers = pytest.importorskip("transformers")

PRESETS = [name for name in st.list_methods() if method_spec(name).options in (UnstructuredOptions, NMOptions)]
SPARSITY, STEPS, CLASSES, VOCAB = 0.8, 3, 3, 64


def build(name: str) -> nn.Module:
    """A fresh tiny model (seeded) by name."""
    torch.manual_seed(0)
    if name in ("plain-cnn", "residual-cnn", "inplace-cnn"):
        return {"plain-cnn": PlainCNN, "residual-cnn": ResidualCNN, "inplace-cnn": InplaceCNN}[name]()
    t = transformers
    text = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                max_position_embeddings=32)
    builders = {
        "bert": lambda: t.BertForSequenceClassification(t.BertConfig(**text, num_labels=CLASSES)),
        "gpt2": lambda: t.GPT2LMHeadModel(t.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=32,
                                                       bos_token_id=0, eos_token_id=0)),
        "vit": lambda: t.ViTForImageClassification(t.ViTConfig(image_size=16, patch_size=4, hidden_size=32,
                                                                num_hidden_layers=2, num_attention_heads=2,
                                                                intermediate_size=64, num_labels=CLASSES)),
        "llama": lambda: t.LlamaForCausalLM(t.LlamaConfig(**text, num_key_value_heads=2)),
        "hf-resnet": lambda: t.ResNetForImageClassification(t.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16],
                                                                           depths=[1, 1], layer_type="basic",
                                                                           num_labels=CLASSES)),
    }
    return builders[name]()


MODELS = ["plain-cnn", "residual-cnn", "inplace-cnn", "bert", "gpt2", "vit", "llama", "hf-resnet"]
TEXT = ("bert", "gpt2", "llama")
LANGUAGE = ("gpt2", "llama")  # one label per token
# The layers of a prunable type each model leaves dense by default (embeddings aside), and why.
DEFAULT_DENSE = {
    "gpt2": {"lm_head": "the output embedding (get_output_embeddings())"},
    "llama": {"lm_head": "the output embedding (get_output_embeddings())"},
    "vit": {"vit.embeddings.patch_embeddings.projection":
            "inside the input embedding 'vit.embeddings.patch_embeddings' (get_input_embeddings())"},
}


def batch(name: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and labels for model ``name``: token ids or 16x16 images."""
    gen = torch.Generator().manual_seed(seed)
    if name in LANGUAGE:
        return torch.randint(0, VOCAB, (4, 8), generator=gen), torch.randint(0, VOCAB, (4, 8), generator=gen)
    if name in TEXT:
        return torch.randint(0, VOCAB, (4, 8), generator=gen), torch.randint(0, CLASSES, (4,), generator=gen)
    return torch.randn(4, 3, 16, 16, generator=gen), torch.randint(0, CLASSES, (4,), generator=gen)


def runs_on_new_inputs(model: nn.Module, name: str) -> None:
    model.eval()
    with torch.no_grad():
        out = logits(model, batch(name, 99)[0])
    assert out.shape[0] == 4 and bool(torch.isfinite(out).all())


def zeros(weight: torch.Tensor) -> int:
    return int((weight == 0).sum())


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("method_name", PRESETS)
def test_every_preset_works_on_the_models_users_bring(method_name, model_name):
    model = build(model_name)
    nm = method_name in nm_presets()
    method = st.create(model, method_name, total_steps=STEPS, **({} if nm else {"sparsity": SPARSITY}))
    bare_loop(model, method, [batch(model_name, step) for step in range(STEPS)])
    names, size, excluded = list(method.names), method.numel(), dict(method.excluded)
    dense_layers = set(method.dense_layers)
    final = method.finalize()
    runs_on_new_inputs(final, model_name)
    layers = {name: final.get_submodule(name) for name in names}
    if nm:
        grouped = [name for name in names if name not in dense_layers]
        assert grouped, "every model has layers with groups of 4 along the input"
        for name in grouped:
            view = out_in(layers[name].weight.detach(), stores_transposed(layers[name]))
            assert int((to_groups(view, 4) != 0).sum(-1).max()) <= 2, name
        report = st.sparsity_report(final, nm=(2, 4))
        assert [(r.name, r.pattern) for r in report.layers] == [(n, None if n in dense_layers else True) for n in names]
    else:
        assert sum(zeros(module.weight) for module in layers.values()) == round(SPARSITY * size)
    assert method.sparsity() == sum(zeros(module.weight) for module in layers.values()) / size
    assert {n: why for n, why in excluded.items() if why != EMBEDDING} == DEFAULT_DENSE.get(model_name, {})
    for name in DEFAULT_DENSE.get(model_name, {}):
        assert zeros(final.get_submodule(name).weight) == 0  # left dense
    if model_name == "gpt2":  # the head stays tied to the token embedding, which stays dense
        assert final.lm_head.weight is final.transformer.wte.weight
        assert {"transformer.wte", "transformer.wpe"} <= {n for n, why in excluded.items() if why == EMBEDDING}
        assert all(type(layers[n]).__name__ == "Conv1D" for n in names) and len(names) == 8


def test_gpt2_head_tied_to_the_embedding_is_refused_when_exclude_would_prune_it():
    model = build("gpt2")
    message = ("layer 'transformer.wte' (Embedding) shares a weight with prunable layer 'lm_head' but is not pruned "
               "itself; allowed: exclude 'lm_head' too")
    with pytest.raises(ValueError, match=re.escape(message)):
        st.create(model, "feather", total_steps=2, exclude=[])
    assert not any(hasattr(module, "parametrizations") for module in model.modules())
    method = st.create(model, "feather", total_steps=2, exclude=["lm_head"])  # the patch embedding and head named
    assert "lm_head" not in method.names and len(method.names) == 8


def test_an_explicit_exclude_replaces_the_defaults():
    model = build("vit")
    method = st.create(model, "feather", total_steps=2, exclude=["classifier"])
    assert method.names[0] == "vit.embeddings.patch_embeddings.projection" and "classifier" not in method.names
    assert ("classifier", "matches exclude pattern 'classifier'") in method.excluded


@pytest.mark.parametrize("model_name, exclude", [("plain-cnn", ["fc", "clasifier"]), ("bert", ["clasifier"])])
def test_an_exclude_pattern_that_matches_no_module_is_an_error_naming_it(model_name, exclude):
    model = build(model_name)
    with pytest.raises(ValueError, match=r"exclude pattern 'clasifier' matches no module of \w+; allowed: glob "
                                         r"patterns on module names, e.g. of its layers \["):
        st.create(model, "feather", total_steps=2, exclude=exclude)
    assert not any(hasattr(module, "parametrizations") for module in model.modules())
    with pytest.raises(ValueError, match="exclude pattern 'fc.wieght' matches no module"):
        st.sparsity_report(build("plain-cnn"), exclude=["fc.wieght"])


@pytest.mark.parametrize("types", [["Conv1D"], ("transformers.pytorch_utils.Conv1D",), [transformers.pytorch_utils.Conv1D]])
def test_types_as_class_names_or_classes_through_create(types):
    model = build("gpt2")
    method = st.create(model, "feather", total_steps=2, sparsity=0.5, types=types)
    assert len(method.names) == 8 and all(n.startswith("transformer.h.") for n in method.names)
    bert = st.create(build("bert"), "sr-ste", total_steps=2, types=["Linear"], exclude=["classifier", "bert.pooler.*"])
    assert len(bert.names) == 12 and "classifier" not in bert.names


@pytest.mark.parametrize("bad", ["Linear", [], [5], [nn.ReLU(inplace=True)], [""]])
def test_types_must_be_a_list_of_classes_or_class_names(bad):
    with pytest.raises(ValueError, match=r"types=.* is not allowed; allowed: a list of layer classes or class names, "
                                         r"e.g. \['Linear', 'Conv1D'\]\."):
        st.create(PlainCNN(), "feather", total_steps=2, types=bad)


def test_types_through_the_command_line_are_a_json_list_of_class_names():
    from sparsetrain.run.cli import build_parser, train_options

    args = vars(build_parser().parse_args(["train", "--method-arg", 'types=["Conv2d"]']))
    args.pop("command")
    options = train_options(args)[0].method_options(steps_per_epoch=10)
    assert options == {"types": ["Conv2d"]}
    method = st.create(PlainCNN(), "feather", total_steps=2, **options)
    assert method.names == ["conv1", "conv2"]


def test_types_through_the_hugging_face_callback(tmp_path):
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from sparsetrain.integrations.hf import SparsifyCallback

    with pytest.raises(ValueError, match=r"types='Conv1D' is not allowed"):
        SparsifyCallback("feather", types="Conv1D")
    callback, model = SparsifyCallback("feather", sparsity=0.5, types=["Conv1D"]), build("gpt2")
    arguments = TrainingArguments(output_dir=str(tmp_path), max_steps=4, use_cpu=True, report_to=[])
    callback.on_init_end(arguments, TrainerState(), TrainerControl(), model=model)  # what Trainer() does
    assert len(callback.method.names) == 8 and callback.method.total_steps == 4


def test_types_through_the_lightning_callback():
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    from sparsetrain.integrations.lightning import Sparsify

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = build("plain-cnn")

        def forward(self, x):
            return self.net(x)

        def training_step(self, data, index):
            return F.cross_entropy(self(data[0]), data[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    x, y = batch("plain-cnn", 0)
    module, callback = Module(), Sparsify("feather", sparsity=0.5, types=[nn.Conv2d])
    pl.Trainer(max_steps=2, callbacks=[callback], accelerator="cpu", logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False).fit(module, DataLoader(TensorDataset(x, y), 2))
    assert callback.method.names == ["net.conv1", "net.conv2"]
    conv = [module.net.conv1.weight, module.net.conv2.weight]
    assert sum(zeros(w) for w in conv) == round(0.5 * sum(w.numel() for w in conv)) and zeros(module.net.fc.weight) == 0


# -- every method answers sparsity() and metrics() before and after finalize() ------------------

EVERY = {"dense": {}, "feather": {"sparsity": 0.8}, "sr-ste": {}, "gdp": {"flops_target": 0.6, "prune_end": 0.5},
         "frs": {"prune_every": 2, "channels_per_step": 3, "stop_at": 4}}


@pytest.mark.parametrize("name", list(EVERY))
def test_sparsity_and_metrics_before_and_after_finalize(name, train):
    torch.manual_seed(0)
    model = create_model("resnet20", width=0.25)
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 3, 16, 16, generator=gen), torch.randint(0, 10, (8,), generator=gen)) for _ in range(4)]
    method = st.create(model, name, total_steps=4, example_inputs=data[0][0][:2], data=data[:2], **EVERY[name])
    keys = set(method.metrics())
    assert 0.0 <= method.sparsity() < 1.0
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    method.bind(optimizer)
    train(model, method, optimizer, data)
    trained, metrics = method.sparsity(), method.metrics()
    final = method.finalize()
    assert set(metrics) == keys and method.metrics() == pytest.approx(metrics)  # e.g. GDP's and FRS's FLOPs ratio
    if isinstance(method, st.Sparsifier):  # its own layers, exactly as trained
        weights = [final.get_submodule(layer).weight for layer in method.names]
        assert method.sparsity() == trained
    else:  # every Conv and Linear weight of the (compact) model: GDP's gated-off inputs are gone after finalize
        weights = [module.weight for _, module in st.find_prunable(final)]
    size = sum(w.numel() for w in weights)
    assert method.sparsity() == sum(zeros(w) for w in weights) / size
    if name == "dense":
        assert trained == 0.0
    elif name == "feather":
        assert trained == round(0.8 * size) / size
    elif name == "sr-ste":  # half of every layer with groups of 4 along its input
        grouped = sum(w.numel() for layer, w in zip(method.names, weights) if layer not in method.dense_layers)
        assert trained == grouped / 2 / size
