"""What happens when a run meets a failure: each case ends in one clear line and a run that can go on."""

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


@pytest.mark.slow
def test_a_run_killed_before_its_first_checkpoint_starts_over_on_resume(tmp_path):
    args = [*COMMAND, "--epochs", "2", "--out", str(tmp_path), *SMALL]
    straight = subprocess.run([*args, "--name", "straight"], capture_output=True, text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr
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
    assert same_weights(run, tmp_path / "straight")


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
