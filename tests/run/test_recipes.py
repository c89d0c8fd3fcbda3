"""Named recipes resolve to the papers' numbers, explicit options win, and the schedule, warm-up
and label smoothing they need work as stated."""

import json
import math

import pytest
import torch.nn.functional as F

from sparsetrain.run import options_from_dict, prepare
from sparsetrain.run.bench import grid_cells
from sparsetrain.run.loop import fit, lr_factor
from sparsetrain.run.options import list_recipes

SMALL = {"model_args": {"width": 0.25}, "device": "cpu", "workers": 1}


def test_recipes_resolve_to_the_papers_numbers():
    assert list_recipes() == ["feather", "frs", "st3"]
    st3 = options_from_dict({"recipe": "st3", "method": "st3"})
    assert (st3.epochs, st3.batch_size, st3.lr, st3.momentum, st3.wd, st3.clip) == (170, 128, 0.1, 0.9, 1e-4, 3.0)
    assert (st3.lr_schedule, st3.milestones, st3.gamma) == ("multistep", [80, 120], 0.1)
    frs = options_from_dict({"recipe": "frs", "method": "frs"})
    assert (frs.epochs, frs.lr, frs.lr_schedule, frs.milestones) == (200, 0.1, "multistep", [100, 150])
    assert (frs.batch_size, frs.momentum, frs.wd) == (256, 0.9, 5e-4)  # the public prune_resnet.py
    assert frs.method_flags == {"prune_every": 21, "channels_per_step": 120, "stop_at": 150}
    assert frs.method_options(steps_per_epoch=10) == {"prune_every": 210, "channels_per_step": 120, "stop_at": 1500}
    feather = options_from_dict({"recipe": "feather"})
    assert (feather.epochs, feather.wd, feather.lr_schedule, feather.clip) == (160, 5e-4, "cosine", 3.0)


def test_given_options_win_and_epoch_valued_settings_scale():
    assert options_from_dict({"recipe": "st3", "method": "st3", "wd": 5e-4}).wd == 5e-4
    scaled = options_from_dict({"recipe": "st3", "method": "st3", "epochs": 17})
    assert (scaled.epochs, scaled.milestones) == (17, [8, 12])
    frs = options_from_dict({"recipe": "frs", "method": "frs", "epochs": 20})
    assert (frs.method_flags, frs.milestones) == ({"prune_every": 2, "channels_per_step": 120, "stop_at": 15}, [10, 15])
    with pytest.raises(ValueError, match="unknown recipe 'st4'; known recipes: feather, frs, st3"):
        options_from_dict({"recipe": "st4"})
    with pytest.raises(ValueError, match="--prune-every does not apply to method 'feather'"):
        options_from_dict({"recipe": "frs", "method": "feather"})


def test_lr_factor_by_hand():
    cosine = options_from_dict({"epochs": 4})
    assert [lr_factor(cosine, 10, t) for t in (0, 20, 40)] == pytest.approx([1.0, 0.5, 0.0])
    steps = options_from_dict({"epochs": 4, "lr_schedule": "multistep", "milestones": [2, 3], "gamma": 0.1})
    assert [lr_factor(steps, 10, t) for t in (0, 19, 20, 29, 30, 39)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    warm = options_from_dict({"epochs": 4, "warmup": 1})
    assert lr_factor(warm, 10, 0) == pytest.approx(0.1 * 1.0)
    assert lr_factor(warm, 10, 4) == pytest.approx(0.5 * 0.5 * (1 + math.cos(math.pi * 4 / 40)))
    for bad, message in [({"lr_schedule": "step"}, "lr_schedule='step'"), ({"milestones": [3, 2]}, "milestones=[3, 2]"),
                         ({"label_smoothing": 1.0}, "label_smoothing=1.0"), ({"warmup": -1}, "warmup=-1")]:
        with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
            options_from_dict(bad)


def test_a_run_records_its_recipe_and_trains_with_it(tmp_path):
    options = options_from_dict({"recipe": "st3", "method": "st3", "epochs": 4, "limit": 64, "batch_size": 64,
                                 "label_smoothing": 0.3, "out": str(tmp_path), "name": "r", **SMALL})
    setup = prepare(options)
    saved = json.loads((tmp_path / "r" / "config.json").read_text())["options"]
    assert (saved["recipe"], saved["wd"], saved["milestones"], saved["lr_schedule"]) == ("st3", 1e-4, [2, 3], "multistep")
    x, y = next(iter(setup.train_loader.batches(0)))
    expected = F.cross_entropy(setup.model(x), y, label_smoothing=0.3).item()  # the one batch of epoch 1
    fit(setup, log=lambda line: None)
    assert setup.history[0]["train_loss"] == pytest.approx(expected, rel=1e-5)
    # one step per epoch; milestones 80 and 120 of 170 epochs scale to 2 and 3 of 4
    assert [record["lr"] for record in setup.history] == pytest.approx([0.1, 0.01, 0.001, 0.001])
    assert setup.optimizer.param_groups[0]["weight_decay"] == 1e-4


def test_bench_paper_recipe_gives_each_method_its_own():
    cells = grid_cells(["feather", "st3", "frs"], [0], {"sparsities": [0.9]})
    base = {"epochs": 17, "recipe": "paper", **SMALL}
    recipes = {c.method: options_from_dict({**c.training_options(base), "name": "x"}) for c in cells}
    assert {m: o.recipe for m, o in recipes.items()} == {"dense": "feather", "feather": "feather", "st3": "st3", "frs": "frs"}
    assert recipes["st3"].milestones == [8, 12] and recipes["feather"].lr_schedule == "cosine"
    assert (recipes["frs"].method_flags["prune_every"], recipes["frs"].epochs) == (2, 17)
    shared = {c.method: c.training_options({"epochs": 17, **SMALL}) for c in cells}
    assert all("recipe" not in o for o in shared.values())
