"""Nothing a user has is ever deleted or overwritten: starting a run over removes only what the run
wrote, a folder being trained in is locked, exports replace a file only with --force, and a file
system that is full or read-only ends the command with one line and the last good checkpoint."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from sparsetrain.run.folder import RunFolder

SMALL = ["--model-arg", "width=0.25", "--limit", "256", "--batch-size", "64", "--device", "cpu", "--workers", "1"]
COMMAND = [sys.executable, "-u", "-m", "sparsetrain", "train"]


def one_line(result, code: int = 2) -> str:
    status, _, err = result
    assert status == code and err.count("\n") == 1 and err.startswith("sparsetrain: error: "), (status, err)
    return err


def contents(folder: Path) -> dict[str, bytes | None]:
    """Every entry under ``folder``: a file's bytes, None for a folder."""
    return {str(p.relative_to(folder)): None if p.is_dir() else p.read_bytes() for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 1-epoch feather run."""
    from sparsetrain.run.cli import main

    out = tmp_path_factory.mktemp("finished")
    assert main(["train", "--epochs", "1", *SMALL, "--out", str(out), "--name", "r"]) == 0
    return out / "r"


@pytest.fixture
def unstarted(finished, tmp_path):
    """A run killed before its first checkpoint: its folder holds config.json only."""
    run = tmp_path / "unstarted"
    run.mkdir()
    shutil.copy(finished / "config.json", run / "config.json")
    return run


# -- starting over -------------------------------------------------------------------------------------------

INTRUDERS = {
    "a user's file": lambda run: (run / "notes.txt").write_text("my notes"),
    "a renamed checkpoint": lambda run: (run / "checkpoint.safetensors.bak").write_bytes(b"\1" * 100),
    "a folder named as the checkpoint": lambda run: ((run / "checkpoint.safetensors").mkdir(),
                                                     (run / "checkpoint.safetensors" / "inside").write_text("x")),
    "a user's file among the events": lambda run: ((run / "tensorboard").mkdir(), (run / "tensorboard" / "mine.txt").write_text("x")),
    "a link named as the config": lambda run: ((run / "real.json").write_text((run / "config.json").read_text()),
                                              (run / "config.json").unlink(), (run / "config.json").symlink_to("real.json")),
}


@pytest.mark.parametrize("intruder", INTRUDERS)
def test_resume_never_starts_over_a_folder_holding_what_the_run_did_not_write(unstarted, cli, intruder):
    INTRUDERS[intruder](unstarted)
    before = contents(unstarted)
    err = one_line(cli("train", "--resume", unstarted))
    assert f"cannot start {unstarted} over: it holds" in err and "move it out of the folder" in err
    assert contents(unstarted) == before


def test_resume_starts_over_a_folder_holding_only_what_the_run_wrote(unstarted, finished, cli):
    (unstarted / "tensorboard").mkdir()
    (unstarted / "tensorboard" / "events.out.tfevents.1.host.1.0").write_bytes(b"\0" * 10)
    (unstarted / ".checkpoint.safetensors.00ff.tmp").write_bytes(b"\0" * 10)  # a cut write
    code, out, err = cli("train", "--resume", unstarted)
    assert code == 0, err
    assert out.splitlines()[0] == f"{unstarted} has no checkpoint yet (stopped before its first epoch ended): starting the run over"
    weights = load_file(str(unstarted / "model.safetensors"))
    assert all(bool((weights[k] == v).all()) for k, v in load_file(str(finished / "model.safetensors")).items())


def test_resume_through_a_link_starts_the_run_over_inside_it(unstarted, cli, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(unstarted)
    code, _, err = cli("train", "--resume", link)
    assert code == 0, err
    assert link.is_symlink() and (unstarted / "model.safetensors").is_file()


def test_leftovers_removed_are_only_our_own_temporary_files(finished, tmp_path, cli):
    run = shutil.copytree(finished, tmp_path / "r")
    ours, theirs = run / ".checkpoint.safetensors.0123abcd.tmp", [run / ".notes.tmp", run / ".x.0123.tmp"]
    for path in [ours, *theirs]:
        path.write_bytes(b"\0")
    code, _, err = cli("train", "--resume", run)
    assert code == 0, err
    assert not ours.exists() and all(path.exists() for path in theirs)


def test_a_folder_created_meanwhile_is_refused_as_existing(tmp_path):
    folder = RunFolder(tmp_path / "r")
    (tmp_path / "r").mkdir()  # another process's mkdir won the race
    with pytest.raises(ValueError, match="already exists; allowed: --resume to continue it, or a new --name"):
        folder.create({})
    assert list((tmp_path / "r").iterdir()) == []


# -- the lock ------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_folder_being_trained_in_is_locked_and_the_lock_dies_with_the_process(tmp_path, cli):
    run = tmp_path / "live"
    process = subprocess.Popen([*COMMAND, "--epochs", "200", *SMALL, "--out", str(tmp_path), "--name", "live"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        while not (run / "config.json").is_file():  # still in its first epoch
            assert process.poll() is None, process.stderr.read()
            time.sleep(0.01)
        before = set(os.listdir(run))
        err = one_line(cli("train", "--resume", run))
        assert f"run folder {run} is in use by another training process" in err
        err = one_line(cli("train", "--epochs", "1", *SMALL, "--out", tmp_path, "--name", "live"))
        assert "already exists; allowed: --resume to continue it, or a new --name" in err
        assert before <= set(os.listdir(run))  # nothing removed under the live run
        while not (run / "checkpoint.safetensors").is_file():
            assert process.poll() is None, process.stderr.read()
            time.sleep(0.01)
        code, out, err = cli("eval", run / "checkpoint.safetensors")  # reading a live run works
        assert code == 0 and out.startswith("test acc"), err
        code, out, err = cli("report", run)
        assert code == 0 and "sparsity" in out, err
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    folder = RunFolder(run)
    folder.lock()  # no stale lock after a kill
    folder.unlock()


# -- exports -------------------------------------------------------------------------------------------------

def test_exports_replace_an_existing_file_only_with_force(finished, tmp_path, cli):
    run = shutil.copytree(finished, tmp_path / "r")
    other = shutil.copytree(finished, tmp_path / "other")
    assert cli("export", run)[0] == 0
    exported = (run / "model.sparse.safetensors").read_bytes()
    (run / "model.sparse.safetensors").write_bytes(b"mine")
    err = one_line(cli("export", run))
    assert "model.sparse.safetensors exists; allowed: another path, or --force to replace it" in err
    assert (run / "model.sparse.safetensors").read_bytes() == b"mine"
    before = (other / "model.safetensors").read_bytes()
    assert "exists; allowed" in one_line(cli("export", run, "--out", other / "model.safetensors"))
    assert (other / "model.safetensors").read_bytes() == before  # another run's model is never overwritten
    assert cli("export", run, "--force")[0] == 0
    assert (run / "model.sparse.safetensors").read_bytes() == exported


@pytest.mark.parametrize("where, message", [
    ("folder", "is a folder; allowed: a file path"),
    ("missing/x.safetensors", "does not exist; allowed: a file in an existing folder"),
    ("x" * 300, "is too long for the file system; allowed: names of at most 255 bytes"),
])
def test_export_out_that_cannot_be_a_file_is_one_line(finished, tmp_path, cli, where, message):
    (tmp_path / "folder").mkdir()
    assert message in one_line(cli("export", finished, "--out", tmp_path / where))


# -- full and read-only file systems -------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """small_disk(size): a tmpfs of ``size`` mounted in tmp_path (root only; skipped where mounting is refused)."""
    mounted = []

    def mount(size: str) -> Path:
        where = tmp_path / f"disk{len(mounted)}"
        where.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"needs a small file system to fill; mount refused: {result.stderr.strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=True)


def fill(disk: Path, leave: int = 0) -> None:
    """Write zeros into ``disk`` until it is full, then free ``leave`` bytes."""
    descriptor = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(descriptor, b"\0" * 4096)
    except OSError as error:
        assert error.errno == 28
    finally:
        os.close(descriptor)
    os.truncate(disk / "filler", (disk / "filler").stat().st_size - leave)


def test_a_full_disk_at_the_first_checkpoint_is_one_line_and_keeps_the_config(small_disk, cli):
    disk = small_disk("64k")  # config.json fits, the checkpoint does not
    err = one_line(cli("train", "--epochs", "1", *SMALL, "--out", disk, "--name", "r"), code=1)
    assert f"No space left on device: {disk / 'r' / 'checkpoint.safetensors'}" in err
    assert json.loads((disk / "r" / "config.json").read_text())["options"]["name"] == "r"
    assert not any((disk / "r").glob(".*.tmp"))


def test_a_full_disk_at_the_final_model_or_an_export_keeps_the_checkpoint(small_disk, finished, cli):
    disk = small_disk("2m")
    run = shutil.copytree(finished, disk / "r")
    (run / "model.safetensors").unlink()  # killed after its last checkpoint, before the model was written
    checkpoint = (run / "checkpoint.safetensors").read_bytes()
    fill(disk, leave=16384)  # room for TensorBoard's first events, not for the model
    err = one_line(cli("train", "--resume", run), code=1)
    assert f"No space left on device: {run / 'model.safetensors'}" in err
    assert (run / "checkpoint.safetensors").read_bytes() == checkpoint and not any(run.glob(".*.tmp"))
    (disk / "filler").unlink()
    code, _, err = cli("train", "--resume", run)
    assert code == 0, err
    fill(disk)
    err = one_line(cli("export", run), code=1)
    assert f"No space left on device: {run / 'model.sparse.safetensors'}" in err
    assert not (run / "model.sparse.safetensors").exists() and not any(run.glob(".*.tmp"))
    final = load_file(str(run / "model.safetensors"))
    assert all(bool((final[k] == v).all()) for k, v in load_file(str(finished / "model.safetensors")).items())


def _without_root_powers() -> list[str]:
    """A command prefix under which permissions hold: root without the capability to ignore them."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("root writes into read-only folders, and setpriv (util-linux) is missing to drop that power")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]


@pytest.mark.slow
def test_a_run_folder_made_read_only_mid_run_ends_with_one_line(tmp_path):
    run = tmp_path / "r"
    process = subprocess.Popen([*_without_root_powers(), *COMMAND, "--epochs", "200", *SMALL, "--out", str(tmp_path), "--name", "r"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while not (run / "checkpoint.safetensors").is_file():
            assert process.poll() is None, process.stderr.read()
            time.sleep(0.01)
        run.chmod(0o555)
        code = process.wait(timeout=120)
    finally:
        process.kill()
        process.wait(timeout=60)
        run.chmod(0o755)
    err = process.stderr.read()
    assert code == 1 and err.count("\n") == 1 and err.startswith("sparsetrain: error: Permission denied: "), err
    assert (run / "checkpoint.safetensors").is_file() and not any(run.glob(".*.tmp"))


@pytest.mark.slow  # a process of its own
def test_an_export_into_a_read_only_folder_is_one_line(finished, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        result = subprocess.run([*_without_root_powers(), *COMMAND[:-1], "export", str(finished), "--out", str(locked / "x.safetensors")],
                                capture_output=True, text=True, timeout=120)
    finally:
        locked.chmod(0o755)
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"sparsetrain: error: Permission denied: {locked / 'x.safetensors'}")
    assert list(locked.iterdir()) == []
