"""The Lightning callback drives every method through Trainer.fit: exact sparsity, GDP's FLOPs target,
FRS's channel removal, resume from a Lightning checkpoint, gradient accumulation."""

import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from sparsetrain.data import load_dataset
from sparsetrain.data.augment import normalize
from sparsetrain.integrations.lightning import Sparsify
from sparsetrain.measure import count_flops
from sparsetrain.models import create_model


class Classifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = create_model("resnet20", width=0.25)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)


def sample_loader(count: int = 256, batch_size: int = 64, shuffle: bool = True) -> DataLoader:
    """The bundled sample's first ``count`` training images; the order is reshuffled per epoch from
    a seed (the sampler's set_epoch), so a resumed run sees the same batches. Without ``shuffle``
    a plain loader, which Lightning's DDP strategy gives a distributed sampler of its own."""
    data = load_dataset()
    dataset = TensorDataset(normalize(data.x_train[:count], data.mean, data.std), data.y_train[:count].long())
    if not shuffle:
        return DataLoader(dataset, batch_size=batch_size)
    return DataLoader(dataset, batch_size=batch_size, sampler=DistributedSampler(dataset, num_replicas=1, rank=0, seed=0))


def trainer(max_epochs: int = 2, **kwargs) -> pl.Trainer:
    options = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False)
    return pl.Trainer(max_epochs=max_epochs, **{**options, **kwargs})


def test_feather_ends_at_exactly_the_target_sparsity():
    module, callback = Classifier(), Sparsify("feather", sparsity=0.9)
    fitted = trainer(callbacks=[callback])
    fitted.fit(module, sample_loader())
    weights = [module.get_submodule(name).weight for name in callback.method.names]
    total = sum(w.numel() for w in weights)
    logged = fitted.callback_metrics  # the last step's values
    assert float(logged["sparsify/sparsity"]) == pytest.approx(round(0.9 * total) / total)
    assert 0 < float(logged["sparsify/threshold"]) < float(max(w.abs().max() for w in weights))
    assert 0.05 < float(logged["sparsify/flops_ratio"]) < 0.5  # 90 % of the weights are zero
    assert not any(True for name, _ in module.named_parameters() if "parametrizations" in name)  # finalized
    assert sum(int((w == 0).sum()) for w in weights) == round(0.9 * total)
    assert callback.method.step_count == 2 * 4  # 256 images, batches of 64, 2 epochs


@pytest.mark.slow  # trains for real: 3 epochs of GDP, then FRS
def test_gdp_lands_on_its_flops_target_and_frs_removes_channels():
    example = torch.zeros(1, 3, 32, 32)
    dense = count_flops(Classifier(), example)
    module = Classifier()
    trainer(max_epochs=3, callbacks=[Sparsify("gdp", flops_target=0.5)]).fit(module, sample_loader())
    assert abs(count_flops(module, example) / dense - 0.5) <= 0.02  # GDP lands in [0.99, 1] x target on any trajectory
    module, callback = Classifier(), Sparsify("frs", prune_every=2, stop_at=4, channels_per_step=6)
    trainer(callbacks=[callback]).fit(module, sample_loader())
    assert len(callback.method.removals) == 2 and callback.method.channels_removed > 0
    assert count_flops(module, example) < dense


def test_an_nm_preset_leaves_every_grouped_layer_in_its_pattern():
    from sparsetrain.nm import pattern_holds

    module, callback = Classifier(), Sparsify("sr-ste", nm="1:4")
    trainer(max_epochs=1, callbacks=[callback]).fit(module, sample_loader())
    grouped = [name for name in callback.method.names if name not in callback.method.dense_layers]
    assert callback.method.dense_layers == ["net.conv1"] and len(grouped) == 21
    assert all(pattern_holds(module.get_submodule(name).weight, 1, 4) for name in grouped)


class StopAfterFirstEpoch(pl.Callback):
    def on_train_epoch_end(self, trainer, pl_module):
        trainer.should_stop = True


METHODS = {"feather": {"sparsity": 0.9}, "frs": {"prune_every": 3, "channels_per_step": 5}, "gdp": {"flops_target": 0.5}}


@pytest.mark.slow  # trains for real: a fit, a kill and a resumed fit per method
@pytest.mark.parametrize("method, options", METHODS.items())
def test_resume_from_a_lightning_checkpoint_ends_identical(tmp_path, method, options):
    straight = Classifier()
    trainer(callbacks=[Sparsify(method, **options)]).fit(straight, sample_loader())

    stopped = Classifier()
    saver = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(callbacks=[Sparsify(method, **options), StopAfterFirstEpoch(), saver],
            enable_checkpointing=True).fit(stopped, sample_loader())
    resumed = Classifier()
    trainer(callbacks=[Sparsify(method, **options)]).fit(resumed, sample_loader(), ckpt_path=tmp_path / "last.ckpt")

    expected, got = straight.state_dict(), resumed.state_dict()
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key


def test_gradient_accumulation_advances_the_schedule_once_per_optimizer_step():
    module, callback = Classifier(), Sparsify("feather", sparsity=0.9)
    trainer(max_epochs=1, accumulate_grad_batches=2, callbacks=[callback]).fit(module, sample_loader())
    assert callback.method.step_count == 2  # 4 batches, 2 per optimizer step
    assert callback.method.total_steps == 2


@pytest.mark.slow
def test_fsdp_through_model_parallel_strategy_ends_exactly_sparse_and_identical(tmp_path):
    """The model sharded by FSDP2 in configure_model (after the callback's create() in setup, before
    the optimizer and bind()): the gathered weights hold exactly round(0.9 N) zeros on both ranks."""
    import sparsetrain as st

    script = Path(__file__).with_name("lightning_fsdp_run.py")
    done = subprocess.run([sys.executable, "-u", str(script), str(tmp_path)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert all(torch.equal(ranks[0]["weights"][k], ranks[1]["weights"][k]) for k in ranks[0]["weights"])
    prunable = [f"net.{name}.weight" for name, _ in st.find_prunable(Classifier().net)]
    weights = [ranks[0]["weights"][key] for key in prunable]
    assert sum(int((w == 0).sum()) for w in weights) == round(0.9 * sum(w.numel() for w in weights))
    assert "FSDPConv2d" in ranks[0]["classes"] and not any("Parametrized" in c for c in ranks[0]["classes"])


@pytest.mark.slow
@pytest.mark.parametrize("method", ["frs"])  # the hardest case: channels removed, DDP rebuilt, on both ranks
def test_ddp_ranks_end_identical(tmp_path, method):
    script = Path(__file__).with_name("lightning_ddp_run.py")
    done = subprocess.run([sys.executable, "-u", str(script), method, str(tmp_path)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys()
    # Weights are identical; batch-norm statistics are each rank's own (DDP broadcasts them from
    # rank 0 before every forward, and the last forward updates them locally).
    statistics = ("running_mean", "running_var", "num_batches_tracked")
    for key in ranks[0]:
        if not key.endswith(statistics):
            assert torch.equal(ranks[0][key], ranks[1][key]), key
    if method == "frs":  # channels were removed, the same on both ranks
        dense = Classifier().state_dict()
        assert any(ranks[0][key].shape != dense[key].shape for key in ranks[0])


def test_bad_options_fail_before_training():
    with pytest.raises(ValueError, match="sparsity"):
        Sparsify("feather", sparsity=1.5)


def test_a_step_budget_sets_the_schedule_length():
    module, callback = Classifier(), Sparsify("gmp", sparsity=0.5)
    trainer(max_epochs=-1, max_steps=6, callbacks=[callback]).fit(module, sample_loader())
    assert callback.method.total_steps == 6 and callback.method.step_count == 6


@pytest.mark.parametrize("method, options", [("feather", {"sparsity": 0.9}), ("gdp", {"flops_target": 0.5})])
def test_load_finalized_turns_a_checkpoint_written_during_fit_into_the_finalized_model(tmp_path, method, options):
    """The checkpoint holds parametrized weights (load_from_checkpoint fails on it); load_finalized
    gives the model the stopped run finalized at the same step."""
    import sparsetrain as st

    stopped = Classifier()
    saver = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(callbacks=[Sparsify(method, **options), StopAfterFirstEpoch(), saver],
            enable_checkpointing=True).fit(stopped, sample_loader())  # step 4 of 8, then finalized in memory
    with pytest.raises(RuntimeError, match="parametrizations.weight.original"):
        Classifier.load_from_checkpoint(tmp_path / "last.ckpt")

    loaded = st.load_finalized(Classifier(), tmp_path / "last.ckpt", example_inputs=torch.zeros(2, 3, 32, 32), **options)
    assert not any("parametrizations" in name for name in loaded.state_dict())
    assert {k: v.shape for k, v in loaded.state_dict().items()} == {k: v.shape for k, v in stopped.state_dict().items()}
    data = load_dataset()
    images = normalize(data.x_test[:32], data.mean, data.std)
    with torch.no_grad():
        expected, got = stopped.eval()(images), loaded.eval()(images)
    assert torch.isfinite(got).all()
    assert torch.allclose(got, expected, rtol=0, atol=1e-5)  # the same weights and graph: float32 rounding at most
    if method == "gdp":  # channels were removed: the compact model
        assert sum(p.numel() for p in loaded.parameters()) < sum(p.numel() for p in Classifier().parameters())
    else:  # the cubic schedule reaches 0.9 at step 4 = half of training: round(0.9 N) zeros
        weights = [m.weight for m in loaded.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
        total = sum(w.numel() for w in weights)
        assert sum(int((w == 0).sum()) for w in weights) == round(0.9 * total)
