"""A method registered here alone, with one option of its own, reaches every place a method is named:
``sparsetrain list``, ``train --help``, ``train --my-option``, a config file, ``bench`` and both trainer
callbacks, with no other file changed (issue 25)."""

import json
from dataclasses import dataclass

import pytest
import torch
import yaml

from sparsetrain.declare import Declared, option
from sparsetrain.methods import Dense, MethodSpec, register_method, unregister_method
from sparsetrain.run.bench import check_grid, grid_cells
from sparsetrain.run.cli import main, train_options
from sparsetrain.run.loop import prepare

TINY = ["--epochs", 1, "--limit", 64, "--batch-size", 64, "--model-arg", "width=0.25", "--device", "cpu", "--workers", 1]


@dataclass(frozen=True)
class ToyOptions(Declared):
    my_option: int = option(7, "how many toy things", kind=int, low=1)


class Toy(Dense):
    """Trains densely, remembering its option."""

    name = "toy"

    def __init__(self, model: torch.nn.Module, my_option: int) -> None:
        super().__init__(model)
        self.my_option = my_option

    def metrics(self) -> dict[str, float]:
        return {"my_option": float(self.my_option)}


@pytest.fixture(autouse=True)
def toy():
    register_method(MethodSpec("toy", ToyOptions, lambda model, options, context: Toy(model, options.my_option),
                               "a toy method of this test"))
    yield
    unregister_method("toy")


def test_list_and_help_show_the_option(cli, capsys):
    code, out, _ = cli("list")
    assert code == 0 and "toy        a toy method of this test" in out and "my_option=7" in out
    code, out, _ = cli("list", "toy")
    assert code == 0 and out.split() == ["toy:", "a", "toy", "method", "of", "this", "test", "my_option", "--my-option",
                                         "default", "7;", "allowed:", "an", "int", ">=", "1", "how", "many", "toy", "things"]
    with pytest.raises(SystemExit) as done:
        main(["train", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert done.value.code == 0 and "--my-option MY_OPTION how many toy things [toy]" in help_text


def test_a_bad_value_is_one_sentence(cli, tmp_path):
    code, _, err = cli("train", "--method", "toy", "--my-option", 0, "--out", tmp_path, *TINY)
    assert code == 2 and "my_option=0 is not allowed; allowed: an int >= 1." in err
    code, _, err = cli("train", "--method", "feather", "--my-option", 3, "--out", tmp_path, *TINY)
    assert code == 2 and "--my-option does not apply to method 'feather'" in err


def test_a_config_file_sets_the_option(tmp_path):
    config = tmp_path / "toy.yaml"
    config.write_text(yaml.safe_dump({"method": "toy", "my_option": 4, "out": str(tmp_path / "runs"), "epochs": 1}))
    options, _ = train_options({"config": str(config)})
    setup = prepare(options)
    setup.folder.unlock()
    assert setup.method.my_option == 4
    saved = json.loads((setup.folder.path / "config.json").read_text())
    assert saved["method"] == {"name": "toy", "options": {"my_option": 4}} and saved["options"]["my_option"] == 4


def test_bench_runs_the_method_beside_the_reference_with_its_option():
    cells = grid_cells(["toy"], [0])
    assert [c.name for c in cells] == ["dense-seed0", "toy-seed0"]
    base = {"my_option": 3, "epochs": 1}
    assert cells[1].training_options(base)["my_option"] == 3 and "my_option" not in cells[0].training_options(base)
    check_grid(base, cells, "unused")


@pytest.mark.slow
def test_train_and_bench_record_the_option(cli, tmp_path):
    code, _, err = cli("train", "--method", "toy", "--my-option", 3, "--out", tmp_path, "--name", "run", *TINY)
    assert code == 0, err
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["method"] == {"name": "toy", "options": {"my_option": 3}} and saved["options"]["my_option"] == 3
    code, _, err = cli("bench", "--methods", "toy", "--my-option", 3, "--seeds", 0, "--out", tmp_path / "grid", *TINY)
    assert code == 0, err
    records = [json.loads(line) for line in (tmp_path / "grid" / "results.jsonl").read_text().splitlines()]
    assert [r["cell"] for r in records] == ["dense-seed0", "toy-seed0"]
    toy_run = json.loads((tmp_path / "grid" / "runs" / "toy-seed0" / "config.json").read_text())
    assert toy_run["method"]["options"] == {"my_option": 3}


def test_the_hugging_face_callback_creates_it_with_the_option():
    from transformers import TrainingArguments

    from sparsetrain.integrations.hf import SparsifyCallback

    callback = SparsifyCallback("toy", my_option=3)
    callback.on_init_end(TrainingArguments(output_dir="unused", max_steps=4, report_to=[]), None, None,
                         model=torch.nn.Linear(4, 2))
    assert callback.method.my_option == 3
    with pytest.raises(ValueError, match="my_option=0 is not allowed"):
        SparsifyCallback("toy", my_option=0)


@pytest.mark.slow
def test_the_lightning_callback_trains_with_it():
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    from sparsetrain.integrations.lightning import Sparsify

    class Classifier(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            return torch.nn.functional.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    gen = torch.Generator().manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(32, 12, generator=gen), torch.randint(0, 3, (32,), generator=gen)), batch_size=8)
    callback = Sparsify("toy", my_option=3)
    fitted = pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1, callbacks=[callback])
    fitted.fit(Classifier(), data)
    assert callback.method.my_option == 3 and fitted.callback_metrics["sparsify/my_option"] == 3.0
    assert "sparsify/flops_ratio" in fitted.callback_metrics
