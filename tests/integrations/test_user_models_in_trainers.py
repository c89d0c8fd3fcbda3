"""The models users bring, inside the trainers: tiny BERT, GPT-2 and ViT built from configs through
``SparsifyCallback`` in ``transformers.Trainer``, and CNNs written with ``F.relu`` (plain, residual)
through Lightning's ``Sparsify``. Each run stops at a checkpoint written mid-schedule and is finalized
there. On the finalized model the method's promise holds (round(s N) zeros over its layers; at most
N non-zeros in every group of M along each layer's input dimension; GDP's compact model computes what
the gated one did; FRS removed channels), the model runs on new inputs, what the defaults leave dense
is dense, ``save_pretrained``/``from_pretrained`` keeps the zeros and the logits, and
``sparsetrain.load_finalized`` of the checkpoint gives the logits of the model finalized there."""

import re

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from hf_trainer import StopAt
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
    ViTConfig,
    ViTForImageClassification,
)
from user_models import PlainCNN, ResidualCNN

import sparsetrain as st
from sparsetrain.calls import call_model, logits_of
from sparsetrain.integrations.hf import STATE_FILE, SparsifyCallback
from sparsetrain.integrations.lightning import Sparsify

VOCAB, CLASSES, LENGTH, SPARSITY = 64, 3, 8, 0.8
STEPS, STOP = 4, 2  # the Trainer's schedule, and the step whose checkpoint it stops at
GDP_OPTIONS = {"flops_target": 0.7, "prune_end": 0.5, "tolerance": 0.1}  # pruning ends at STOP
PRESETS = [("feather", {"sparsity": SPARSITY}), ("sr-ste", {"nm": "2:4"})]


def zeros(weight: torch.Tensor) -> int:
    return int((weight == 0).sum())


def assert_exact(layers: list[nn.Module], sparsity: float) -> None:
    """round(s N) zeros over the N weights of ``layers``."""
    total = sum(layer.weight.numel() for layer in layers)
    assert sum(zeros(layer.weight) for layer in layers) == round(sparsity * total)


def input_groups(layer: nn.Module, m: int = 4) -> torch.Tensor:
    """The layer's weight as groups of m consecutive entries along its input dimension (the last
    dimension of the result): dimension 0 of transformers' Conv1D weight (in, out), else dimension 1
    of (out, in, *kernel)."""
    weight = layer.weight.detach()
    weight = weight.t() if type(layer).__name__ == "Conv1D" else weight.movedim(1, -1)
    return weight.reshape(*weight.shape[:-1], weight.shape[-1] // m, m)


def logits(model: nn.Module, inputs: torch.Tensor | dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's logits on ``inputs`` in eval mode."""
    model.eval()
    with torch.no_grad():
        return logits_of(call_model(model, inputs))


# -- Hugging Face Trainer --------------------------------------------------------------------------


def bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=2, intermediate_size=64,
                                                    max_position_embeddings=32, num_labels=CLASSES))


def gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=32,
                                      bos_token_id=0, eos_token_id=0))


def vit() -> ViTForImageClassification:
    torch.manual_seed(0)
    return ViTForImageClassification(ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2,
                                               num_attention_heads=2, intermediate_size=64, num_labels=CLASSES))


def hf_inputs(name: str, count: int, seed: int) -> dict[str, torch.Tensor]:
    """A batch of named inputs: token ids (BERT's with an attention mask, one sequence padded) or images."""
    gen = torch.Generator().manual_seed(seed)
    if name == "vit":
        return {"pixel_values": torch.randn(count, 3, 16, 16, generator=gen)}
    ids = torch.randint(1, VOCAB, (count, LENGTH), generator=gen)
    if name == "gpt2":
        return {"input_ids": ids}
    mask = torch.ones_like(ids)
    mask[0, LENGTH - 2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def hf_samples(name: str, count: int = 32) -> list[dict]:
    """Training samples: labelled by the first token (BERT) or by index (ViT); GPT-2 predicts its tokens."""
    inputs = hf_inputs(name, count, seed=0)
    rows = [{key: value[i] for key, value in inputs.items()} for i in range(count)]
    for i, row in enumerate(rows):
        if name == "gpt2":  # the Trainer's causal LM loss shifts them by one
            row["labels"] = row["input_ids"]
        else:
            row["labels"] = int(row["input_ids"][0]) % CLASSES if name == "bert" else i % CLASSES
    return rows


# model, the class of the layers every preset prunes by default, the layers of a prunable type left dense
HF_MODELS = {
    "bert": (bert, nn.Linear, []),  # all 14 Linear layers, the pooler and the classifier included
    "gpt2": (gpt2, "Conv1D", ["lm_head"]),  # the output embedding, tied to transformer.wte
    "vit": (vit, nn.Linear, ["vit.embeddings.patch_embeddings.projection"]),  # inside the input embedding
}


def of_type(module: nn.Module, kind: type | str) -> bool:
    return type(module).__name__ == kind if isinstance(kind, str) else type(module) is kind


def arguments(out, **kwargs) -> TrainingArguments:
    options = dict(output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=8, learning_rate=1e-3,
                   save_strategy="steps", save_steps=STOP, report_to=[], use_cpu=True, seed=0, logging_steps=STOP,
                   dataloader_num_workers=0, disable_tqdm=True)
    return TrainingArguments(**{**options, **kwargs})


class LogitsAtTrainEnd(TrainerCallback):
    """The model's logits on ``inputs`` when training ends; listed before SparsifyCallback, it runs
    before finalize(): the gated (or masked) model's."""

    def __init__(self, inputs: dict[str, torch.Tensor]) -> None:
        self.inputs, self.logits = inputs, None

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.logits = logits(model, self.inputs)


def assert_runs(model: nn.Module, inputs: dict[str, torch.Tensor] | torch.Tensor, rows: int) -> torch.Tensor:
    out = logits(model, inputs)
    assert out.shape[0] == rows and bool(torch.isfinite(out).all())
    return out


@pytest.mark.slow
@pytest.mark.parametrize("method, options", PRESETS)
@pytest.mark.parametrize("model_name", list(HF_MODELS))
def test_presets_in_the_trainer_keep_their_promise_through_save_pretrained_and_load_finalized(
        tmp_path, model_name, method, options):
    build, kind, dense = HF_MODELS[model_name]
    model, callback = build(), SparsifyCallback(method, **options)
    Trainer(model=model, args=arguments(tmp_path / "run"), train_dataset=hf_samples(model_name),
            callbacks=[callback, StopAt(STOP)]).train()  # checkpoint-2 written, then finalized at step 2
    names = callback.method.names
    assert callback.method.step_count == STOP
    assert names == [name for name, module in model.named_modules() if of_type(module, kind)]
    assert not any("parametrizations" in name for name in model.state_dict())
    layers = [model.get_submodule(name) for name in names]
    if method == "feather":  # the cubic schedule reaches s_f at half of max_steps
        assert_exact(layers, SPARSITY)
    else:  # every layer's input (32, 64 or 128) splits into groups of 4: exactly 2 of each are pruned
        assert callback.method.dense_layers == []
        for name, layer in zip(names, layers):
            assert int((input_groups(layer) != 0).sum(-1).max()) <= 2, name
        assert_exact(layers, 0.5)
        if model_name == "gpt2":  # along the stored (in, out) weight's output dimension the pattern fails
            c_fc = model.transformer.h[0].mlp.c_fc.weight.detach()
            assert int((c_fc.reshape(32, -1, 4) != 0).sum(-1).max()) > 2
    for name in dense:
        assert zeros(model.get_submodule(name).weight) == 0
    if model_name == "gpt2":
        assert model.lm_head.weight is model.transformer.wte.weight
    new = hf_inputs(model_name, 4, seed=1)
    expected = assert_runs(model, new, 4)

    model.save_pretrained(tmp_path / "saved")
    back = type(model).from_pretrained(tmp_path / "saved")
    for name in [*names, *dense]:
        assert torch.equal(back.get_submodule(name).weight, model.get_submodule(name).weight), name
    if model_name == "gpt2":
        assert back.lm_head.weight is back.transformer.wte.weight
    torch.testing.assert_close(logits(back, new), expected, rtol=0, atol=1e-6)  # the same weights and graph

    loaded = st.load_finalized(build(), tmp_path / "run" / f"checkpoint-{STOP}", **options)
    assert not any("parametrizations" in name for name in loaded.state_dict())
    for name in names:
        assert torch.equal(loaded.get_submodule(name).weight, model.get_submodule(name).weight), name
    torch.testing.assert_close(logits(loaded, new), expected, rtol=0, atol=1e-6)


GDP_ROOTS = {  # the layers whose output units GDP gates in these models: the MLPs (and BERT's pooler)
    "bert": ["bert.pooler.dense", "bert.encoder.layer.0.intermediate.dense", "bert.encoder.layer.1.intermediate.dense"],
    "gpt2": ["transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc"],
    "vit": ["vit.layers.0.mlp.fc1", "vit.layers.1.mlp.fc1"],
}


@pytest.mark.slow
@pytest.mark.parametrize("model_name", list(HF_MODELS))
def test_gdp_in_the_trainer_compacts_the_mlps_and_load_finalized_gives_the_same_model(tmp_path, model_name):
    """BERT's example inputs are a dict with an attention mask, GPT-2's and ViT's a tensor."""
    build = HF_MODELS[model_name][0]
    example = hf_inputs(model_name, 2, seed=2)
    example = example if model_name == "bert" else next(iter(example.values()))
    new = hf_inputs(model_name, 4, seed=1)
    model, gated = build(), LogitsAtTrainEnd(new)
    callback = SparsifyCallback("gdp", example_inputs=example, **GDP_OPTIONS)
    before = {name: tuple(p.shape) for name, p in build().named_parameters()}
    Trainer(model=model, args=arguments(tmp_path / "run"), train_dataset=hf_samples(model_name),
            callbacks=[gated, callback, StopAt(STOP)]).train()
    method = callback.method
    assert sorted(g.root for g in method.groups) == sorted(GDP_ROOTS[model_name])
    target, tolerance = GDP_OPTIONS["flops_target"], GDP_OPTIONS["tolerance"]
    assert target * (1 - tolerance) <= method.metrics()["flops_ratio"] <= target
    after = {name: tuple(p.shape) for name, p in model.named_parameters()}
    assert before.keys() == after.keys() and not any(hasattr(m, "parametrizations") for m in model.modules())
    changed = {name for name in after if after[name] != before[name]}
    cut = {f"{layer}.{p}" for g in method.groups for layer in (*g.layers, *g.readers) for p in ("weight", "bias")}
    assert changed and changed <= cut  # only gated layers and their readers shrank: attention is whole
    compact = assert_runs(model, new, 4)
    # the compact model multiplies the folded weights W * g the gated forward computed, without the
    # terms that were exactly 0: float32 sums in another order, ~1e-7 relative
    torch.testing.assert_close(compact, gated.logits, rtol=1e-5, atol=1e-5 * float(gated.logits.abs().max()))

    loaded = st.load_finalized(build(), tmp_path / "run" / f"checkpoint-{STOP}", example_inputs=example, **GDP_OPTIONS)
    assert {name: tuple(p.shape) for name, p in loaded.named_parameters()} == after
    torch.testing.assert_close(logits(loaded, new), compact, rtol=0, atol=1e-6)  # the same weights and graph

    model.save_pretrained(tmp_path / "compact")  # the MLPs' widths differ: load_compact rebuilds them
    reloaded = st.load_compact(type(model), tmp_path / "compact")
    assert {name: tuple(p.shape) for name, p in reloaded.named_parameters()} == after
    torch.testing.assert_close(logits(reloaded, new), compact, rtol=0, atol=1e-6)  # the same weights and graph


@pytest.mark.slow
def test_load_best_model_at_end_finalizes_the_best_checkpoint_with_its_own_method_state(tmp_path):
    """The Trainer loads the best checkpoint's weights (step 2 here) just before training ends; they
    are finalized with the method's state of step 2, not of the last step: round(s N) zeros, and the
    model load_finalized makes of checkpoint-2."""
    scores = iter([1.0, 0.0])  # the first evaluation (step 2) is the best

    def score(prediction) -> dict[str, float]:
        return {"score": next(scores)}

    model, callback = bert(), SparsifyCallback("feather", sparsity=SPARSITY)
    args = arguments(tmp_path, eval_strategy="steps", eval_steps=STOP, load_best_model_at_end=True,
                     metric_for_best_model="score", greater_is_better=True)
    trainer = Trainer(model=model, args=args, train_dataset=hf_samples("bert"), eval_dataset=hf_samples("bert", 8),
                      compute_metrics=score, callbacks=[callback])
    trainer.train()
    assert trainer.state.best_model_checkpoint == str(tmp_path / f"checkpoint-{STOP}")
    assert_exact([model.get_submodule(name) for name in callback.method.names], SPARSITY)
    loaded = st.load_finalized(bert(), tmp_path / f"checkpoint-{STOP}", sparsity=SPARSITY)
    for name in callback.method.names:
        assert torch.equal(loaded.get_submodule(name).weight, model.get_submodule(name).weight), name
    new = hf_inputs("bert", 4, seed=1)
    torch.testing.assert_close(logits(loaded, new), assert_runs(model, new, 4), rtol=0, atol=1e-6)


def test_a_best_checkpoint_without_the_method_state_is_refused_naming_the_file(tmp_path):
    callback = SparsifyCallback("feather", sparsity=SPARSITY)
    args = arguments(tmp_path, eval_strategy="steps", eval_steps=STOP, load_best_model_at_end=True)
    callback.on_init_end(args, TrainerState(), TrainerControl(), model=bert())  # what Trainer() does
    state = TrainerState(best_model_checkpoint=str(tmp_path / "checkpoint-2"))
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'checkpoint-2' / STATE_FILE} does not exist; allowed: "
                                                   "a checkpoint in output_dir saved by a run with the same "
                                                   "SparsifyCallback.")):
        callback.on_train_end(args, state, TrainerControl())


# -- Lightning ---------------------------------------------------------------------------------------


CNNS = {"plain-cnn": (PlainCNN, "net.conv1"), "residual-cnn": (ResidualCNN, "net.stem")}  # and its 3-input conv


class Classifier(pl.LightningModule):
    def __init__(self, net: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = CNNS[net][0]()

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def images(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(count, 3, 8, 8, generator=gen), torch.randint(0, CLASSES, (count,), generator=gen)


def loader() -> DataLoader:
    """32 images in batches of 8: 4 optimizer steps an epoch."""
    return DataLoader(TensorDataset(*images(32, seed=0)), batch_size=8)


class StopAfterFirstEpoch(pl.Callback):
    def on_train_epoch_end(self, trainer, pl_module):
        trainer.should_stop = True


class LogitsAtFitEnd(pl.Callback):
    """The module's logits on ``inputs`` when fitting ends; listed before Sparsify, it runs before
    finalize(): the gated (or masked) model's."""

    def __init__(self, inputs: torch.Tensor) -> None:
        self.inputs, self.logits = inputs, None

    def on_fit_end(self, trainer, pl_module):
        self.logits = logits(pl_module, self.inputs)


def fit_and_stop_at_the_checkpoint(module: pl.LightningModule, callbacks: list[pl.Callback], folder) -> None:
    """Two epochs planned (8 steps); last.ckpt written after the first (step 4), where fit stops and finalizes."""
    saver = pl.callbacks.ModelCheckpoint(dirpath=folder, save_last=True)
    pl.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=True,
               enable_progress_bar=False, enable_model_summary=False,
               callbacks=[*callbacks, StopAfterFirstEpoch(), saver]).fit(module, loader())


LIGHTNING_METHODS = {
    "feather": {"sparsity": SPARSITY},
    "sr-ste": {"nm": "2:4"},
    "gdp": GDP_OPTIONS,
    "frs": {"prune_every": 2, "stop_at": 4, "channels_per_step": 3},  # removals at steps 2 and 4
}


@pytest.mark.parametrize("method", list(LIGHTNING_METHODS))
@pytest.mark.parametrize("net", list(CNNS))
def test_every_method_through_lightning_on_a_user_cnn_and_load_finalized_of_its_checkpoint(tmp_path, net, method):
    options = LIGHTNING_METHODS[method]
    new = images(4, seed=1)[0]
    module, callback, before_finalize = Classifier(net), Sparsify(method, **options), LogitsAtFitEnd(new)
    fit_and_stop_at_the_checkpoint(module, [before_finalize, callback], tmp_path)
    dense = Classifier(net)
    prunable = [name for name, m in module.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    finalized = assert_runs(module, new, 4)
    assert not any(hasattr(m, "parametrizations") for m in module.modules())
    if method in ("feather", "sr-ste"):
        assert callback.method.names == prunable and callback.method.step_count == 4
        layers = [module.get_submodule(name) for name in prunable]
        if method == "feather":  # the cubic schedule reaches s_f at half of the 8 steps
            assert_exact(layers, SPARSITY)
        else:  # the first convolution reads 3 channels: no groups of 4, left dense
            first = CNNS[net][1]
            assert callback.method.dense_layers == [first] and zeros(module.get_submodule(first).weight) == 0
            grouped = [layer for name, layer in zip(prunable, layers) if name != first]
            for layer in grouped:
                assert int((input_groups(layer) != 0).sum(-1).max()) <= 2
            assert_exact(grouped, 0.5)  # exactly 2 of every group of 4
        torch.testing.assert_close(finalized, before_finalize.logits, rtol=0, atol=0)  # finalize bakes the same weights
    else:
        widths = {name: module.get_submodule(name).out_channels for name in prunable[:-1]}
        dense_widths = {name: dense.get_submodule(name).out_channels for name in prunable[:-1]}
        assert sum(widths.values()) < sum(dense_widths.values())  # channels were removed
        assert sum(p.numel() for p in module.parameters()) < sum(p.numel() for p in dense.parameters())
        if method == "gdp":
            target, tolerance = options["flops_target"], options["tolerance"]
            assert target * (1 - tolerance) <= callback.method.metrics()["flops_ratio"] <= target
            assert {g.root: widths[g.root] for g in callback.method.groups} == callback.method.kept_channels()
            # the compact model multiplies the folded weights W * g; float32 sums in another order
            torch.testing.assert_close(finalized, before_finalize.logits, rtol=1e-5,
                                       atol=1e-5 * float(before_finalize.logits.abs().max()))
        else:  # FRS removed channels at its two events, in place: finalize changes nothing
            assert len(callback.method.removals) == 2 and callback.method.channels_removed > 0
            torch.testing.assert_close(finalized, before_finalize.logits, rtol=0, atol=0)

    loaded = st.load_finalized(Classifier(net), tmp_path / "last.ckpt", example_inputs=images(2, seed=2)[0], **options)
    assert {k: v.shape for k, v in loaded.state_dict().items()} == {k: v.shape for k, v in module.state_dict().items()}
    torch.testing.assert_close(logits(loaded, new), finalized, rtol=0, atol=1e-6)  # the same weights and graph


class TextClassifier(pl.LightningModule):
    """A Hugging Face model inside Lightning: dict batches, a forward taking named inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.model = bert()

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch["input_ids"], batch["attention_mask"]), batch["labels"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def test_lightning_takes_example_inputs_as_a_dict_of_named_tensors(tmp_path):
    example, new = hf_inputs("bert", 2, seed=2), hf_inputs("bert", 4, seed=1)
    module, callback = TextClassifier(), Sparsify("feather", sparsity=SPARSITY, example_inputs=example)
    samples = DataLoader(hf_samples("bert"), batch_size=8)
    saver = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)
    pl.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
               enable_model_summary=False, callbacks=[callback, StopAfterFirstEpoch(), saver]).fit(module, samples)
    assert len(callback.method.names) == 14  # every Linear layer of BERT
    assert_exact([module.get_submodule(name) for name in callback.method.names], SPARSITY)
    finalized = assert_runs(module, new, 4)
    loaded = st.load_finalized(TextClassifier(), tmp_path / "last.ckpt", sparsity=SPARSITY)
    torch.testing.assert_close(logits(loaded, new), finalized, rtol=0, atol=1e-6)
