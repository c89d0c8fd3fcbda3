"""GDP and FRS through `sparsetrain train`: compact models on disk, FLOPs on target; ViTs with every
unstructured method. (Killed runs: tests/run/test_failures.py.)"""

import json

import pytest
import torch
from safetensors.torch import load_file

SMALL = ["--model-arg", "width=0.5", "--limit", "1024", "--batch-size", "64", "--device", "cpu", "--workers", "1"]


@pytest.mark.slow
def test_gdp_run_lands_on_its_flops_target_and_eval_rebuilds_the_compact_model(tmp_path, cli):
    code, out, err = cli("train", "--method", "gdp", "--flops-target", 0.5, "--epochs", 4,
                             "--out", tmp_path, "--name", "gdp", *SMALL)
    assert code == 0, err
    config = json.loads((tmp_path / "gdp" / "config.json").read_text())
    ratio = config["metrics"]["flops"] / config["metrics"]["dense_flops"]
    assert abs(ratio - 0.5) <= 0.02 * 0.5, ratio  # GDP lands in [0.99, 1] x target on any trajectory
    assert config["shapes"] and all(s.get("out_channels", 1) <= 32 for s in config["shapes"].values())  # the changed layers
    code, eval_out, _ = cli("eval", tmp_path / "gdp", "--device", "cpu")
    assert code == 0 and eval_out.startswith(f"test acc {config['metrics']['test_acc']:.2%}")
    code, report, _ = cli("report", tmp_path / "gdp")
    assert code == 0 and "| FLOPs (non-zero weights) |" in report and "| layer | width before | width after |" in report


@pytest.mark.slow
def test_frs_removes_channels_on_schedule(tmp_path, cli):
    code, out, err = cli("train", "--method", "frs", "--epochs", 2, "--prune-every", 1,
                             "--channels-per-step", 20, "--out", tmp_path, "--name", "frs", *SMALL)
    assert code == 0, err
    config = json.loads((tmp_path / "frs" / "config.json").read_text())
    widths = [s["out_channels"] for s in config["shapes"].values() if "out_channels" in s]
    assert config["metrics"]["flops"] < config["metrics"]["dense_flops"]
    assert config["metrics"]["params"] < 272_474 / 4 + 1000  # width 0.5: about a quarter of ResNet-20, minus pruning
    assert min(widths) >= 1


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--method", "gdp", "--flops-target", "1.5"], "flops_target=1.5"),
        (["--method", "frs", "--channels-per-step", "100000", "--epochs", "2"], "channels_per_step=100000"),
    ],
)
def test_structured_usage_errors(tmp_path, cli, argv, message):
    code, _, err = cli("train", "--out", tmp_path, *argv, *SMALL)
    assert code == 2 and message in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_frs_scores_augmented_training_batches_fresh_each_epoch(tmp_path):
    from sparsetrain.run import TrainOptions, fit, prepare

    options = TrainOptions(method="frs", epochs=2, method_flags={"prune_every": 1, "channels_per_step": 4}, limit=64, batch_size=64,
                           model_args={"width": 0.25}, device="cpu", workers=1, out=str(tmp_path), name="r")
    setup = prepare(options)
    assert setup.method.data is setup.scoring and setup.scoring.augment
    (x0, y0), = setup.scoring.batches(0)
    (x1, y1), = setup.scoring.batches(1)
    train_images = setup.data.x_train[:64]
    assert torch.equal(y0, y1) and not torch.equal(x0, x1)  # the same samples, augmented anew
    assert x0.shape == (64, *train_images.shape[1:])
    fit(setup, log=lambda line: None)
    (x_last, _), = setup.scoring  # what the method scored in the last epoch: that epoch's batches
    assert torch.equal(x_last, x1)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["feather", "st3", "st3-sigma", "gmp", "ste"])
def test_vit_trains_with_every_unstructured_method(tmp_path, cli, method):
    code, out, err = cli("train", "--model", "vit-micro", "--method", method, "--sparsity", 0.9, "--epochs", 1,
                         "--limit", 256, "--batch-size", 64, "--device", "cpu", "--workers", 1,
                         "--out", tmp_path, "--name", "vit")
    assert code == 0, err
    config = json.loads((tmp_path / "vit" / "config.json").read_text())
    weights = load_file(str(tmp_path / "vit" / "model.safetensors"))
    # attention and MLP Linear layers are pruned, the patch embedding and head are not (the ViT's default)
    pruned = [k for k in weights if k.startswith("blocks.") and k.endswith("weight") and weights[k].dim() == 2]
    total = sum(weights[k].numel() for k in pruned)
    assert sum(int((weights[k] == 0).sum()) for k in pruned) == round(0.9 * total)
    assert int((weights["fc.weight"] == 0).sum()) == 0 and int((weights["patch_embed.weight"] == 0).sum()) == 0
    assert config["metrics"]["sparsity"] == round(0.9 * total) / total


def test_frs_refuses_a_vit_naming_the_module_and_only_mlp_units_form_channel_groups():
    import sparsetrain as st
    from sparsetrain.models import create_model
    from sparsetrain.structured.surgery import channel_groups

    example = torch.zeros(2, 3, 32, 32)
    with pytest.raises(ValueError, match="the model's own module \\(ViT\\) has parameters but no relevance rule"):
        st.create(create_model("vit-micro"), "frs", total_steps=10, example_inputs=example, data=[])
    # attention's qkv channels are re-viewed as heads on the way to proj: no channel group there
    roots = [g.root for g in channel_groups(create_model("vit-micro"), example)]
    assert sorted(roots) == [f"blocks.{i}.fc1" for i in range(4)]
