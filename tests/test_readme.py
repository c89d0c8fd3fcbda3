"""The README's examples run, and CI runs the README's test command."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.DOTALL)


@pytest.mark.slow
def test_readme_python_examples_run(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # what the examples write (the Trainer's output_dir) lands here
    namespace: dict = {}
    for block in code_blocks("python"):
        exec(compile(block, "README.md", "exec"), namespace)
    out = capsys.readouterr().out
    assert "sparsity 0.9000" in out
    assert "| **total** |" in out
    removed = int(re.search(r"channels removed (\d+)", out).group(1))
    assert 0 < removed <= 80 and len(namespace["method"].removals) == 2  # at most one channel per entry
    assert namespace["compact"] is namespace["method"].model
    assert "2:4 holds in 21 layers, dense: ['conv1']" in out
    assert "lightning: sparsity 0.9000" in out
    zeros, total = map(int, re.search(r"hf: (\d+) zeros of (\d+)", out).groups())
    assert zeros == round(0.9 * total)
    assert int(re.search(r"onnx: (\d+) KiB", out).group(1)) > 0 and (tmp_path / "resnet20-frs.onnx").is_file()
    # the published count: floor((N - 1) s) + 1 of ResNet-20's N = 270,896 weights are |w| <= T
    assert namespace["percent"] == pytest.approx(100 * 243_806 / 270_896)


@pytest.mark.slow
def test_the_fsdp_example_runs_under_torchrun():
    import subprocess
    import sys

    assert "torchrun --nproc_per_node=2 examples/fsdp.py" in README
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(ROOT / "examples" / "fsdp.py")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "fsdp: 2 ranks, sparsity 0.9000" in done.stdout


def test_ci_runs_the_readme_test_command():
    install_and_test = [line for block in code_blocks("bash") for line in block.splitlines() if "pytest" in line]
    assert len(install_and_test) == 1
    assert install_and_test[0] in (ROOT / ".ci" / "run").read_text()
