"""The command line: a real training run end to end, eval and report, and usage errors."""

import json
import pickle
import subprocess
import sys

import pytest
import torch

SMALL = ["--model-arg", "width=0.25", "--limit", "512", "--batch-size", "64"]


@pytest.mark.slow
def test_train_one_epoch_on_the_bundled_sample_then_eval_reproduces_it(tmp_path, cli):
    code, out, err = cli("train", "--epochs", 1, "--limit", 1024, "--out", tmp_path, "--name", "run", "--device", "cpu")
    assert code == 0, err
    run = tmp_path / "run"
    expected = {"config.json", "metrics.jsonl", "checkpoint.safetensors", "model.safetensors", "report.md",
                "training.png", "layers.png"}
    assert expected <= {p.name for p in run.iterdir()}
    config = json.loads((run / "config.json").read_text())
    assert config["model"] == {"name": "resnet20", "kwargs": {"num_classes": 10}}
    assert config["method"] == {"name": "feather", "options": {}}  # the method's defaults: sparsity 0.9
    (record,) = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert set(record) >= {"epoch", "train_loss", "test_loss", "test_acc", "sparsity", "threshold", "lr", "epoch_time"}
    final_acc = config["metrics"]["test_acc"]
    assert f"final: test acc {final_acc:.2%}  sparsity 90.00%" in out
    assert "| **total** |" in (run / "report.md").read_text()

    code, out, _ = cli("eval", run, "--device", "cpu")
    assert code == 0
    assert out.startswith(f"test acc {final_acc:.2%}") and "sparsity 90.00%" in out
    code, out, _ = cli("report", run)
    assert code == 0 and "| **total** |" in out and "90.00%" in out


@pytest.mark.slow
def test_console_script_and_config_file(tmp_path):
    config = tmp_path / "options.yaml"
    config.write_text("method: gmp\nptarget: 0.5\nepochs: 1\nlimit: 256\nmodel_args: {width: 0.25}\n".replace("ptarget", "sparsity"))
    done = subprocess.run(
        [sys.executable, "-u", "-m", "sparsetrain", "train", "--config", config, "--out", tmp_path, "--name", "cfg",
         "--device", "cpu", "--lr", "0.05"],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    saved = json.loads((tmp_path / "cfg" / "config.json").read_text())["options"]
    assert (saved["method"], saved["sparsity"], saved["lr"], saved["model_args"]) == ("gmp", 0.5, 0.05, {"width": 0.25})


@pytest.mark.slow
def test_toml_config_and_aliases(tmp_path, cli):
    config = tmp_path / "options.toml"
    config.write_text('method = "ste"\nepochs = 1\nlimit = 128\n')
    code, _, err = cli("train", "--config", config, "--ptarget", 0.6, "--sname", "alias", "--out", tmp_path,
                           "--device", "cpu", *SMALL)
    assert code == 0, err
    saved = json.loads((tmp_path / "alias" / "config.json").read_text())["options"]
    assert (saved["method"], saved["sparsity"], saved["epochs"]) == ("ste", 0.6, 1)


def test_list(cli):
    code, out, _ = cli("list")
    assert code == 0 and "resnet20_feather" in out and "st3-sigma" in out and "cifar10-sample" in out


def write_cifar10(folder, corrupt=None):
    batches = folder / "cifar-10-batches-py"
    batches.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]:
        if name == corrupt:
            (batches / name).write_bytes(b"this is not a pickle")
        elif name == "batches.meta":
            (batches / name).write_bytes(pickle.dumps({b"label_names": [b"c%d" % i for i in range(10)]}))
        else:
            import numpy as np

            (batches / name).write_bytes(pickle.dumps({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 3]}))
    return folder


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "resnet21"], "unknown model 'resnet21'; known models: densenet40"),
        (["--method", "feathr"], "unknown method 'feathr'; known methods: dense, feather"),
        (["--sparsity", "1.2"], "sparsity=1.2 is not allowed; allowed: a number in [0, 1)"),
        (["--sparsity", "abc"], "argument --sparsity/--ptarget: invalid float value: 'abc'"),
        (["--epochs", "0"], "epochs=0 is not allowed; allowed: an integer >= 1"),
        (["--dataset", "cifar10"], "needs data_dir"),
        (["--dataset", "cifar10", "--data-dir", "/nonexistent/dir"], "/nonexistent/dir"),
        (["--device", "cuda:7"], "device='cuda:7' is not available here"),
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["--method", "gdp", "--sparsity", "0.5"], "--sparsity does not apply to method 'gdp'; its options: flops_target"),
        (["--method-arg", "thetta=1"], "unknown option 'thetta' for method 'feather'; allowed options: p, theta, rescale"),
        (["--method-arg", "theta=2"], "theta=2 is not allowed; allowed: a number in [0, 1]"),
    ],
)
def test_usage_errors_exit_2_with_one_line(tmp_path, cli, argv, message):
    code, out, err = cli("train", "--out", tmp_path, *argv)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("sparsetrain: error: ")
    assert message in err
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_corrupt_data_file_exits_2(tmp_path, cli):
    data = write_cifar10(tmp_path / "data", corrupt="data_batch_3")
    code, _, err = cli("train", "--dataset", "cifar10", "--data-dir", data, "--out", tmp_path / "runs")
    assert code == 2 and err.count("\n") == 1
    assert "data_batch_3 is not a valid CIFAR batch file" in err


def test_config_file_with_unknown_key_exits_2(tmp_path, cli):
    config = tmp_path / "c.yaml"
    config.write_text("epochs: 1\nlearning_rate: 0.1\n")
    code, _, err = cli("train", "--config", config, "--out", tmp_path / "runs")
    assert code == 2 and err.count("\n") == 1
    assert "unknown option 'learning_rate'; known options: model, model_args" in err


def test_existing_run_folder_is_never_overwritten(tmp_path, cli):
    run = tmp_path / "taken"
    run.mkdir()
    (run / "keep.txt").write_text("precious")
    code, _, err = cli("train", "--out", tmp_path, "--name", "taken")
    assert code == 2 and "already exists; allowed: --resume to continue it, or a new --name" in err
    assert [p.name for p in run.iterdir()] == ["keep.txt"] and (run / "keep.txt").read_text() == "precious"


@pytest.mark.slow
def test_resume_rejects_changed_options_and_missing_runs(tmp_path, cli):
    code, _, err = cli("train", "--resume", tmp_path / "nothing")
    assert code == 2 and "has no config.json" in err
    code, _, err = cli("train", "--out", tmp_path, "--name", "r", "--epochs", 1, "--device", "cpu", *SMALL)
    assert code == 0, err
    code, _, err = cli("train", "--resume", tmp_path / "r", "--lr", 0.5)
    assert code == 2 and "--lr cannot change when resuming" in err


def test_eval_of_a_missing_run(tmp_path, cli):
    code, _, err = cli("eval", tmp_path / "nope")
    assert code == 2 and "is not a run folder or a weights file" in err


def test_method_args_and_flags_reach_the_method(tmp_path):
    from sparsetrain.run import options_from_dict, prepare

    options = options_from_dict({"method": "feather", "sparsity": 0.8, "t1": 1.0, "pthres": 100,
                                 "method_args": {"theta": 0.25}, "limit": 256, "batch_size": 64, "epochs": 3,
                                 "device": "cpu", "out": str(tmp_path), "name": "r"})
    setup = prepare(options)
    method = setup.method
    assert (method.config.theta, method.schedule.final, method.schedule.start) == (0.25, 0.8, 4)  # t1: 1 epoch = 4 steps
    assert all(w.numel() > 100 for w in method.dense_weights())
    saved = json.loads((tmp_path / "r" / "config.json").read_text())["method"]
    assert saved == {"name": "feather", "options": {"theta": 0.25, "sparsity": 0.8, "start": 4, "min_size": 101}}


def test_an_nm_run_reports_its_pattern_per_layer_and_exports_packed(tmp_path, cli):
    from safetensors import safe_open

    from sparsetrain.nm import pattern_holds
    from sparsetrain.run.checkpoint import load_weights
    from sparsetrain.run.export import load_sparse

    code, out, err = cli("train", "--method", "feather-nm", "--nm", "1:4", "--epochs", 1, "--out", tmp_path,
                         "--name", "nm", "--device", "cpu", "--workers", 1, *SMALL)
    assert code == 0, err
    code, out, _ = cli("report", tmp_path / "nm")
    assert code == 0 and out.startswith("resnet20 · feather-nm · nm 1:4")
    assert "| layer | weights | zeros | sparsity | 1:4 |" in out
    assert "| conv1 | 108 | 0 | 0.00% | dense (input not a multiple of 4) |" in out  # 4 x 3 x 3 x 3
    assert "| layer1.0.conv1 | 144 | 108 | 75.00% | yes |" in out  # width 0.25: 4 x 4 x 3 x 3 weights
    assert "| 21 of 22 layers |" in out
    code, out, err = cli("export", tmp_path / "nm")
    assert code == 0, err
    exported = tmp_path / "nm" / "model.sparse.safetensors"
    weights = load_weights(tmp_path / "nm" / "model.safetensors")
    loaded = load_sparse(exported)
    assert loaded.keys() == weights.keys() and all(torch.equal(loaded[k], weights[k]) for k in weights)
    with safe_open(str(exported), framework="pt") as f:
        layouts = json.loads(f.metadata()["sparsetrain.sparse"])
    assert layouts["layer1.0.conv1.weight"]["layout"] == "nm" and layouts["conv1.weight"]["layout"] == "dense"
    assert pattern_holds(weights["layer3.2.conv2.weight"], 1, 4)


def test_options_saved_by_earlier_versions_read_the_same():
    """config.json before the method flags were declared held all eight flag keys, None where not given."""
    from sparsetrain.run import options_from_dict

    new = options_from_dict({"method": "feather", "sparsity": 0.8, "t1": 1.0, "epochs": 3, "name": "r"})
    old = {**new.record(), "nm": None, "pthres": None, "flops_target": None, "prune_every": None,
           "channels_per_step": None, "stop_at": None}
    assert options_from_dict(old) == new and new.method_flags == {"sparsity": 0.8, "t1": 1.0}
    assert options_from_dict({**new.record(), "ptarget": 0.8, "sparsity": None}) == new  # an alias
    with pytest.raises(ValueError, match="option 'sparsity' is given twice"):
        options_from_dict({**new.record(), "ptarget": 0.7})
