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
    assert not (run / "checkpoint.pt").exists()
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
