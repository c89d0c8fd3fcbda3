"""The Hugging Face callback inside Trainer: a ViT from a small config ends at exactly round(s N)
zeros in the chosen layers; a BERT-style encoder resumed with resume_from_checkpoint ends identical.

(Resume is tested on BERT: with transformers 5.x a ViT checkpoint is saved under its legacy key names,
which Trainer._load_from_checkpoint does not map back, so the Trainer itself resumes a ViT from
its initial weights, with or without sparsetrain.)"""

import pytest
import torch
from hf_trainer import StopAt
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    ViTConfig,
    ViTForImageClassification,
)

from sparsetrain.data import load_dataset
from sparsetrain.data.augment import normalize
from sparsetrain.integrations.hf import STATE_FILE, SparsifyCallback

EXCLUDE = ["vit.embeddings.*", "classifier"]  # attention and MLP Linear layers only


def small_vit() -> ViTForImageClassification:
    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=64, num_labels=10)
    return ViTForImageClassification(config)


def sample(count: int = 128) -> list[dict]:
    data = load_dataset()
    images = normalize(data.x_train[:count], data.mean, data.std)
    return [{"pixel_values": image, "labels": int(label)} for image, label in zip(images, data.y_train[:count])]


def small_bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=32, num_labels=4)
    return BertForSequenceClassification(config)


def token_sample(count: int = 128, length: int = 16) -> list[dict]:
    """Random token sequences labelled by their first token (mod 4): learnable, reproducible."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 64, (count, length), generator=gen)
    return [{"input_ids": row, "attention_mask": torch.ones(length, dtype=torch.long), "labels": int(row[0] % 4)}
            for row in ids]


def arguments(out, **kwargs) -> TrainingArguments:
    options = dict(output_dir=str(out), max_steps=8, per_device_train_batch_size=32, learning_rate=1e-3,
                   save_strategy="steps", save_steps=4, report_to=[], use_cpu=True, seed=0, logging_steps=4,
                   dataloader_num_workers=0, disable_tqdm=True)
    return TrainingArguments(**{**options, **kwargs})


def test_feather_in_the_trainer_ends_at_exactly_the_target_sparsity(tmp_path):
    model, callback, logs = small_vit(), SparsifyCallback("feather", sparsity=0.9, exclude=EXCLUDE), LogRecorder()
    trainer = Trainer(model=model, args=arguments(tmp_path, save_strategy="no"), train_dataset=sample(),
                      callbacks=[callback, logs])
    trainer.train()
    names = callback.method.names
    assert len(names) == 2 * 6 and all(n.startswith("vit.layers.") for n in names)
    assert {n.rsplit(".", 1)[1] for n in names} == {"q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"}
    weights = [model.get_submodule(name).weight for name in names]
    total = sum(w.numel() for w in weights)
    assert sum(int((w == 0).sum()) for w in weights) == round(0.9 * total)
    assert callback.method.step_count == 8
    assert [round(r["sparsify/sparsity"], 4) for r in logs.records if "loss" in r] == [
        round(callback.method.schedule.sparsity_at(4), 4), 0.9]  # logged at steps 4 and 8


def test_an_nm_preset_in_the_trainer_leaves_every_chosen_layer_in_its_pattern(tmp_path):
    from sparsetrain.nm import pattern_holds

    model, callback = small_vit(), SparsifyCallback("feather-nm", nm="2:4", exclude=EXCLUDE)
    Trainer(model=model, args=arguments(tmp_path, save_strategy="no"), train_dataset=sample(), callbacks=[callback]).train()
    assert len(callback.method.names) == 12 and callback.method.dense_layers == []  # inputs of 32 and 64
    assert all(pattern_holds(model.get_submodule(name).weight, 2, 4) for name in callback.method.names)


class LogRecorder(TrainerCallback):
    def __init__(self) -> None:
        self.records: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.records.append(dict(logs))


def test_resume_from_checkpoint_restores_the_method_and_ends_identical(tmp_path):
    exclude = ["bert.embeddings.*", "classifier"]
    straight = small_bert()
    Trainer(model=straight, args=arguments(tmp_path / "straight"), train_dataset=token_sample(),
            callbacks=[SparsifyCallback("feather", sparsity=0.9, exclude=exclude)]).train()

    stopped = small_bert()
    Trainer(model=stopped, args=arguments(tmp_path / "killed"), train_dataset=token_sample(),
            callbacks=[SparsifyCallback("feather", sparsity=0.9, exclude=exclude), StopAt(4)]).train()
    assert (tmp_path / "killed" / "checkpoint-4" / STATE_FILE).is_file()
    resumed, callback = small_bert(), SparsifyCallback("feather", sparsity=0.9, exclude=exclude)
    Trainer(model=resumed, args=arguments(tmp_path / "killed"), train_dataset=token_sample(),
            callbacks=[callback]).train(resume_from_checkpoint=str(tmp_path / "killed" / "checkpoint-4"))

    assert callback.method.step_count == 8
    expected, got = straight.state_dict(), resumed.state_dict()
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key


def test_a_schedule_needs_max_steps(tmp_path):
    with pytest.raises(ValueError, match="max_steps=-1"):
        Trainer(model=small_vit(), args=arguments(tmp_path, max_steps=-1, num_train_epochs=1), train_dataset=sample(),
                callbacks=[SparsifyCallback("feather", sparsity=0.9)])


CHECKPOINT_CASES = {  # model, training samples, layers left dense, a batch of new inputs
    "bert": (small_bert, token_sample, ["bert.embeddings.*", "classifier"],
             {"input_ids": torch.randint(1, 64, (8, 16), generator=torch.Generator().manual_seed(1))}),
    "vit": (small_vit, sample, EXCLUDE, {"pixel_values": torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))}),
}


@pytest.mark.parametrize("case", CHECKPOINT_CASES)
def test_load_finalized_turns_a_trainer_checkpoint_folder_into_the_finalized_model(tmp_path, case):
    """checkpoint-4 holds parametrized weights (a ViT's under transformers' legacy names) and the
    method's state beside them; load_finalized gives the model the stopped run finalized at step 4."""
    import sparsetrain as st

    build, samples, exclude, inputs = CHECKPOINT_CASES[case]
    stopped, callback = build(), SparsifyCallback("feather", sparsity=0.9, exclude=exclude)
    Trainer(model=stopped, args=arguments(tmp_path), train_dataset=samples(),
            callbacks=[callback, StopAt(4)]).train()  # saved at step 4, then finalized in memory
    names = callback.method.names

    loaded = st.load_finalized(build(), tmp_path / "checkpoint-4", exclude=exclude, sparsity=0.9)
    assert not any("parametrizations" in name for name in loaded.state_dict())
    weights = [loaded.get_submodule(name).weight for name in names]
    total = sum(w.numel() for w in weights)
    assert sum(int((w == 0).sum()) for w in weights) == round(0.9 * total)  # s(4) = 0.9: the cubic ends at T/2
    with torch.no_grad():
        expected, got = stopped.eval()(**inputs).logits, loaded.eval()(**inputs).logits
    assert torch.isfinite(got).all()
    assert torch.allclose(got, expected, rtol=0, atol=1e-5)  # the same weights and graph: float32 rounding at most
