"""What happens when a run meets a failure: each case ends in one clear line and a run that can go on."""

import json
import os
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

SMALL = ["--model-arg", "width=0.25", "--limit", "256", "--batch-size", "64", "--device", "cpu", "--workers", "1"]
COMMAND = [sys.executable, "-u", "-m", "sparsetrain", "train"]


def same_weights(a, b) -> bool:
    x, y = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return x.keys() == y.keys() and all(bool((x[k] == y[k]).all()) for k in x)


METHODS = {"feather": [], "gdp": ["--flops-target", "0.6"], "frs": ["--prune-every", "1", "--channels-per-step", "4"]}


def method_args(method: str) -> list[str]:
    """``train`` arguments of the kill tests' 3-epoch runs (without --out and --name)."""
    return ["train", "--method", method, *METHODS[method], "--epochs", "3", *SMALL]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """straight(method): the folder of an uninterrupted run of ``method_args(method)``, trained once."""
    out, done = tmp_path_factory.mktemp("straight"), {}

    def run(method: str):
        if method not in done:
            result = subprocess.run([*COMMAND[:-1], *method_args(method), "--out", str(out), "--name", method],
                                    capture_output=True, text=True, timeout=300)
            assert result.returncode == 0, result.stderr
            done[method] = out / method
        return done[method]

    return run


@pytest.mark.slow
def test_a_run_killed_before_its_first_checkpoint_starts_over_on_resume(tmp_path, straight):
    """Starting over reads only config.json, whatever the method: one method is enough here (the
    kills below, mid-run and inside a checkpoint write, run every method)."""
    method = "feather"
    args = [*COMMAND[:-1], *method_args(method), "--out", str(tmp_path)]
    run = tmp_path / "killed"
    process = subprocess.Popen([*args, "--name", "killed"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not (run / "config.json").is_file():  # killed the moment the folder exists, before any checkpoint
        assert process.poll() is None
        time.sleep(0.01)
    process.kill()
    process.wait(timeout=60)
    assert not (run / "checkpoint.safetensors").exists()
    resumed = subprocess.run([*COMMAND, "--resume", str(run)], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.splitlines()[0] == f"{run} has no checkpoint yet (stopped before its first epoch ended): starting the run over"
    assert same_weights(run, straight(method))


@pytest.mark.slow
def test_the_run_folder_given_to_resume_is_the_run_wherever_it_lies(tmp_path, cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = cli("train", "--epochs", 1, "--name", "r", *SMALL)  # --out runs, relative
    assert code == 0, err
    code, _, err = cli("train", "--resume", tmp_path / "runs" / "r")  # the same folder, spelled absolute
    assert code == 0, err
    os.rename(tmp_path / "runs", tmp_path / "moved")
    code, _, err = cli("train", "--resume", tmp_path / "moved" / "r")
    assert code == 0, err


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dense", "feather", "gdp", "frs"])
def test_a_diverging_run_stops_with_one_line_and_exit_1(tmp_path, cli, method):
    code, out, err = cli("train", "--method", method, "--lr", 1e38, "--clip", 1e38, "--epochs", 2, *SMALL,
                         "--out", tmp_path, "--name", "r")
    assert code == 1 and err.count("\n") == 1, err
    assert err.startswith("sparsetrain: error: ") and ("step " in err or "at step" in err)
    assert "NaN or infinite" in err or "the loss is nan" in err or "the loss is inf" in err
    assert not (tmp_path / "r" / "model.safetensors").exists()


@pytest.mark.slow
def test_divergence_keeps_the_last_good_checkpoint_and_bad_checkpoints_are_refused(tmp_path, cli):
    import torch

    from sparsetrain.run import TrainOptions, fit, prepare
    from sparsetrain.run.folder import RunFolder

    options = TrainOptions(method="dense", epochs=3, limit=128, batch_size=64, model_args={"width": 0.25}, device="cpu", workers=1,
                           out=str(tmp_path), name="r")
    setup = prepare(options)
    batches = setup.train_loader.batches
    setup.train_loader.batches = lambda epoch: (
        (x * float("nan") if epoch == 1 else x, y) for x, y in batches(epoch))  # epoch 2 meets a NaN input
    with pytest.raises(FloatingPointError, match="step 3: the loss is nan"):
        fit(setup, log=lambda line: None)
    folder = RunFolder(tmp_path / "r")
    state = folder.load_checkpoint(torch.device("cpu"))
    assert state["epoch"] == 1  # the last good one

    state["model"]["layer2.0.conv1.weight"][0, 0, 0, 0] = float("inf")
    folder.save_checkpoint(state)
    code, _, err = cli("train", "--resume", tmp_path / "r")
    assert code == 2 and err.count("\n") == 1
    assert "the checkpoint's layer2.0.conv1.weight holds NaN or infinite values" in err
    code, _, err = cli("eval", tmp_path / "r" / "checkpoint.safetensors")
    assert code == 2 and "layer2.0.conv1.weight holds NaN or infinite values" in err


# -- one line instead of a traceback --------------------------------------------------------------------

@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 1-epoch run (its folder holds config.json, checkpoint and model); copy it to change it."""
    from sparsetrain.run.cli import main

    out = tmp_path_factory.mktemp("finished")
    assert main(["train", "--method", "feather", "--epochs", "1", *SMALL, "--out", str(out), "--name", "r"]) == 0
    return out / "r"


@pytest.fixture
def run(finished, tmp_path):
    import shutil

    return shutil.copytree(finished, tmp_path / "r")


def one_line_error(result) -> str:
    code, _, err = result
    assert code == 2 and err.count("\n") == 1 and err.startswith("sparsetrain: error: "), err
    return err


@pytest.mark.parametrize("command", ["eval", "report", "export"])
@pytest.mark.parametrize("damage", ["corrupt", "truncated", "pickle"])
def test_a_damaged_model_file_is_one_line(run, cli, command, damage):
    model = run / "model.safetensors"
    if damage == "corrupt":
        model.write_bytes(b"\xff" * 64)
    elif damage == "truncated":
        model.write_bytes(model.read_bytes()[:1000])
    else:
        import pickle

        model.write_bytes(pickle.dumps({"a": 1}))
    err = one_line_error(cli(command, run))
    assert "model.safetensors is not a readable safetensors file" in err


def test_a_config_naming_another_model_is_one_line(run, cli):
    config = json.loads((run / "config.json").read_text())
    config["model"]["name"] = "resnet32"
    (run / "config.json").write_text(json.dumps(config))
    err = one_line_error(cli("eval", run))
    assert "do not fit the model 'resnet32' its config.json names" in err


def test_a_config_without_options_is_one_line_on_resume(run, cli):
    config = json.loads((run / "config.json").read_text())
    del config["options"]
    (run / "config.json").write_text(json.dumps(config))
    err = one_line_error(cli("train", "--resume", run))
    assert "config.json has no 'options' mapping" in err


@pytest.mark.parametrize("value, message", [("out: 5", "out=5 is not allowed"), ("data_dir: 5", "data_dir=5 is not allowed"),
                                            ("model_args: [1, 2]", "model_args=[1, 2] is not allowed")])
def test_config_values_of_the_wrong_type_are_one_line(tmp_path, cli, value, message):
    config = tmp_path / "c.yaml"
    config.write_text(value + "\n")
    assert message in one_line_error(cli("train", "--config", config))


def test_a_non_utf8_config_file_is_named(tmp_path, cli):
    config = tmp_path / "c.yaml"
    config.write_bytes(b"epochs: \xff\xfe\n")
    assert f"config file {config} is not UTF-8 text" in one_line_error(cli("train", "--config", config))


def test_out_at_a_regular_file_is_one_line(tmp_path, cli):
    (tmp_path / "file").write_text("x")
    err = one_line_error(cli("train", "--out", tmp_path / "file", "--name", "r", "--epochs", 1, *SMALL))
    assert "cannot create the run folder" in err and "file" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_out_under_a_read_only_folder_is_one_line(tmp_path, cli):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    err = one_line_error(cli("train", "--out", locked / "runs", "--name", "r", "--epochs", 1, *SMALL))
    assert "cannot create the run folder" in err


def test_t1_beyond_the_run_names_the_flag(tmp_path, cli):
    err = one_line_error(cli("train", "--t1", 100, "--epochs", 2, "--out", tmp_path, *SMALL))
    assert "--t1 100 is beyond the run's 2 epochs" in err


@pytest.mark.parametrize("change, message", [
    ("drop_tensor", "does not fit this run"),
    ("wrong_shape", "does not fit this run"),
    ("rng_type", "rng state or history of the wrong type"),
    ("method_null", "holds no model or method state"),
    ("huge_epoch", "is at epoch 1000000; allowed: 0 to the run's 1 epochs"),
])
def test_a_checkpoint_that_does_not_fit_is_one_line(run, cli, change, message):
    import torch

    from sparsetrain.run.folder import RunFolder

    folder = RunFolder(run)
    state = folder.load_checkpoint(torch.device("cpu"))
    key = next(k for k in state["model"] if k.endswith("bn1.weight"))
    if change == "drop_tensor":
        del state["model"][key]
    elif change == "wrong_shape":
        state["model"][key] = torch.ones(3)
    elif change == "rng_type":
        state["rng"] = [1, 2, 3]
    elif change == "method_null":
        state["method"] = None
    else:
        state["epoch"] = 10**6
    folder.save_checkpoint(state)
    assert message in one_line_error(cli("train", "--resume", run))


# -- nothing overwritten, nothing written elsewhere ---------------------------------------------------------

def test_export_never_overwrites_the_run_and_names_stay_inside_out(run, cli, tmp_path):
    before = (run / "model.safetensors").read_bytes()
    err = one_line_error(cli("export", run, "--out", run / "model.safetensors"))
    assert "is a file of the run itself" in err and (run / "model.safetensors").read_bytes() == before
    err = one_line_error(cli("train", "--out", tmp_path / "runs", "--name", "../x", "--epochs", 1, *SMALL))
    assert "name='../x' is not allowed" in err and not (tmp_path / "x").exists()


# -- leftovers and permissions ---------------------------------------------------------------------------

def test_run_files_share_one_mode_and_resume_removes_leftovers(run, cli):
    modes = {path.name: path.stat().st_mode & 0o777 for path in run.iterdir() if path.is_file()}
    assert {"config.json", "checkpoint.safetensors", "model.safetensors"} <= set(modes)
    assert len(set(modes.values())) == 1, modes  # what the umask gives every file, weights included
    leftover = run / ".checkpoint.safetensors.0123abcd.tmp"
    leftover.write_bytes(b"\0" * 1024)  # an atomic write cut short by a kill
    code, _, err = cli("train", "--resume", run)
    assert code == 0, err
    assert not leftover.exists()


# -- killed at random moments ---------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_runs_killed_at_random_moments_resume_to_the_same_end(tmp_path, straight, method):
    import random

    args = [*COMMAND[:-1], *method_args(method), "--out", str(tmp_path)]
    run, rng = tmp_path / "killed", random.Random(method)
    first = [*args, "--name", "killed"]
    process = subprocess.Popen(first, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    kills = 0
    while kills < 4 and process.poll() is None:
        deadline = time.monotonic() + rng.uniform(0.5, 4.0)
        while time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.01)
        if process.poll() is None:
            process.kill()
            process.wait(timeout=60)
            kills += 1
            # before its folder exists there is nothing to resume: the user runs the command again
            again = [*COMMAND, "--resume", str(run)] if (run / "config.json").is_file() else first
            process = subprocess.Popen(again, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert process.wait(timeout=300) == 0, process.stderr.read()
    assert kills >= 2
    assert same_weights(run, straight(method))
    assert not any(run.glob(".*.tmp"))


DIE_IN_SECOND_CHECKPOINT_WRITE = """
import os, signal, sys
from sparsetrain.run import checkpoint
real, calls = checkpoint.save_file, []
def dying(tensors, path, metadata=None):
    calls.append(path)
    real(tensors, path, metadata=metadata)
    if len(calls) == 2:  # the second checkpoint: half on disk, then killed
        with open(path, "r+b") as file:
            file.truncate(os.path.getsize(path) // 2)
        os.kill(os.getpid(), signal.SIGKILL)
checkpoint.save_file = dying
from sparsetrain.run.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_a_run_killed_inside_a_checkpoint_write_resumes_to_the_same_end(tmp_path, straight, cli, method):
    args = [*method_args(method), "--out", str(tmp_path)]
    killed = subprocess.run([sys.executable, "-c", DIE_IN_SECOND_CHECKPOINT_WRITE, *args, "--name", "killed"],
                            capture_output=True, text=True, timeout=300)
    run = tmp_path / "killed"
    assert killed.returncode == -9 and len(list(run.glob(".checkpoint.safetensors.*.tmp"))) == 1
    # The intact checkpoint evaluates with its method re-attached (FRS's widths, GDP's gates).
    code, out, err = cli("eval", run / "checkpoint.safetensors", "--device", "cpu")
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert code == 0 and out.startswith(f"test acc {history[0]['test_acc']:.2%}"), err
    resumed = subprocess.run([*COMMAND, "--resume", str(run)], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.startswith("epoch 2/3")  # from the intact epoch-1 checkpoint
    assert same_weights(run, straight(method)) and not any(run.glob(".*.tmp"))
    without_times = lambda path: [  # noqa: E731
        {k: v for k, v in json.loads(line).items() if not k.endswith("_time")} for line in (path / "metrics.jsonl").read_text().splitlines()
    ]
    assert without_times(run) == without_times(straight(method))
    config = lambda path: json.loads((path / "config.json").read_text())  # noqa: E731
    assert config(run).get("shapes") == config(straight(method)).get("shapes")


# -- hostile inputs: one line each ---------------------------------------------------------------------------

def test_a_yaml_alias_bomb_is_refused_at_once_in_one_short_line(tmp_path, cli):
    levels = ["&a0 [x, x, x, x, x, x, x, x, x]"] + [f"&a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    config = tmp_path / "bomb.yaml"
    config.write_text("a0: " + "\n".join(f"a{i}: {level}" for i, level in enumerate(levels))[4:] + "\nmilestones: *a8\n")
    start = time.perf_counter()
    err = one_line_error(cli("train", "--config", config))
    assert time.perf_counter() - start < 10 and len(err) < 300
    assert f"config file {config} uses a YAML alias at line 2; allowed: plain values" in err


def test_a_huge_config_file_or_value_is_refused_in_one_short_line(tmp_path, cli):
    config = tmp_path / "big.yaml"
    config.write_text("epochs: 1\n" + "#" * (1 << 20) + "\n")
    assert f"config file {config} holds 1048587 bytes; allowed: at most 1048576" in one_line_error(cli("train", "--config", config))
    config.write_text(f"model: {'x' * 500_000}\n")
    err = one_line_error(cli("train", "--config", config))
    assert len(err) < 400 and err.startswith("sparsetrain: error: unknown model 'xxx") and "known models" in err


@pytest.mark.parametrize("args, message", [
    (["--method-arg", "exclude=5"], "exclude=5 is not allowed; allowed: a list of glob patterns"),
    (["--model-arg", "width=100000"], "model 'resnet20' cannot be built with {'num_classes': 10, 'width': 100000}: "),
    (["--name", "n" * 256], "name='nnn"),
    (["--out", "o" * 256], "is too long for the file system; allowed: names of at most 255 bytes"),
])
def test_bad_values_that_used_to_raise_are_one_line(tmp_path, cli, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    assert message in one_line_error(cli("train", "--epochs", 1, *args))
    assert list(tmp_path.iterdir()) == []  # nothing written


def _rewrite(path, drop: str | None = None, header: str | None = None) -> None:
    """Write the safetensors file at ``path`` again without tensor ``drop`` or with another header."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys() if k != drop}, f.metadata()
    save_file(tensors, str(path), metadata={"sparsetrain.tree": header or metadata["sparsetrain.tree"]})


@pytest.mark.parametrize("damage, message", [
    ("tensor gone from the file", "does not fit this run (it lacks the tensor '.model.conv1.parametrizations.weight.original'"),
    ("header nested 200,000 deep", "is not a readable sparsetrain checkpoint (its header nests too deeply)"),
])
def test_a_crafted_checkpoint_header_is_one_line(run, cli, damage, message):
    checkpoint = run / "checkpoint.safetensors"
    if damage.startswith("tensor"):
        _rewrite(checkpoint, drop=".model.conv1.parametrizations.weight.original")
    else:
        _rewrite(checkpoint, header="[" * 200_000 + "]" * 200_000)
    assert message in one_line_error(cli("train", "--resume", run))
    assert message in one_line_error(cli("eval", checkpoint))


def test_a_tensor_of_another_dtype_is_refused_on_resume_and_eval(run, cli):
    import torch
    from safetensors.torch import load_file, save_file

    from sparsetrain.run.folder import RunFolder

    folder = RunFolder(run)
    state = folder.load_checkpoint(torch.device("cpu"))
    key = "conv1.parametrizations.weight.original"
    state["model"][key] = state["model"][key].long()
    folder.save_checkpoint(state)
    err = one_line_error(cli("train", "--resume", run))
    assert f"the model state in {run / 'checkpoint.safetensors'} does not fit this run ('{key}' is int64, not float32)" in err
    weights = load_file(str(run / "model.safetensors"))
    weights["conv1.weight"] = weights["conv1.weight"].long()
    save_file(weights, str(run / "model.safetensors"))
    assert "('conv1.weight' is int64, not float32)" in one_line_error(cli("eval", run))
