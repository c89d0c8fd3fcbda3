"""Data-parallel training with torchrun: 2 real gloo processes share thresholds, masks, gates and
removed channels."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

RANK_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    from safetensors.torch import save_file
    from sparsetrain.run import TrainOptions, fit, prepare

    out, method = sys.argv[1], sys.argv[2]
    extra = json.loads(sys.argv[3])
    options = TrainOptions(method=method, epochs=2, limit=512, batch_size=64, model_args={"width": 0.25},
                           device="cpu", out=out, name="run", workers=1, **extra)
    setup = prepare(options)
    fit(setup, log=lambda line: None)
    rank = setup.ranks.rank
    state = {k: v.contiguous() for k, v in setup.model.state_dict().items()}
    save_file(state, f"{out}/rank{rank}.safetensors")
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump({"world_size": setup.ranks.world_size, "history": setup.history,
                   "batches": len(setup.train_loader)}, f)
    """
)


def torchrun(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *map(str, args)],
        capture_output=True, text=True, timeout=300, cwd=cwd,
    )


def run_ranks(tmp_path, method, **extra):
    """Train on two gloo ranks; return each rank's report and final weights."""
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    done = torchrun(script, tmp_path, method, json.dumps(extra))
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    weights = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1)]
    return ranks, weights


def assert_identical(weights):
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:
        assert weights[0][key].shape == weights[1][key].shape and torch.equal(weights[0][key], weights[1][key]), key


def test_two_gloo_ranks_have_identical_thresholds_and_final_weights(tmp_path):
    ranks, weights = run_ranks(tmp_path, "feather", sparsity=0.95)
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["batches"] == 4  # 512 images / 2 ranks / 64 per batch
    thresholds = [[record["threshold"] for record in r["history"]] for r in ranks]
    assert thresholds[0] == thresholds[1] and thresholds[0][0] > 0
    assert [rec["sparsity"] for rec in ranks[0]["history"]] == [rec["sparsity"] for rec in ranks[1]["history"]]
    assert_identical(weights)
    conv_weights = [v for k, v in weights[0].items() if k.endswith("weight") and v.dim() > 1]
    zeros = sum(int((w == 0).sum()) for w in conv_weights)
    assert zeros == round(0.95 * sum(w.numel() for w in conv_weights))
    # only rank 0 wrote the run folder's files, once
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2


@pytest.mark.parametrize("method, extra", [("frs", {"prune_every": 1, "channels_per_step": 12}), ("gdp", {"flops_target": 0.5})])
def test_channel_pruning_on_two_gloo_ranks_ends_with_identical_widths_and_weights(tmp_path, method, extra):
    ranks, weights = run_ranks(tmp_path, method, **extra)
    assert_identical(weights)  # same keys, same shapes (widths), same values
    dense = sum(v.numel() for k, v in weights[0].items() if k.endswith("weight"))
    assert [r["history"][-1]["flops_ratio"] for r in ranks][0] == ranks[1]["history"][-1]["flops_ratio"] < 1.0
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["shapes"] and config["metrics"]["flops"] < config["metrics"]["dense_flops"] and dense > 0


def test_frs_under_torchrun_from_the_command_line(tmp_path):
    """The command that crashed at FRS's first pruning step (ranks removed different channels)."""
    done = torchrun("-m", "sparsetrain", "train", "--method", "frs", "--limit", 256, "--epochs", 1, "--workers", 1,
                    "--device", "cpu", "--model-arg", "width=0.25", "--out", tmp_path, "--name", "frs")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("final: test acc") == 1


def test_cli_under_torchrun(tmp_path):
    done = torchrun("-m", "sparsetrain", "train", "--epochs", 1, "--limit", 256, "--model-arg", "width=0.25",
                    "--device", "cpu", "--out", tmp_path, "--name", "ddp", "--workers", 1)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("final: test acc") == 1
    config = json.loads((tmp_path / "ddp" / "config.json").read_text())
    assert abs(config["metrics"]["sparsity"] - 0.9) < 1e-4  # round(0.9 N) / N on any trajectory


def test_nm_on_two_gloo_ranks_ends_identical_and_every_group_holds_the_pattern(tmp_path):
    from sparsetrain.nm import has_groups, pattern_holds

    ranks, weights = run_ranks(tmp_path, "feather-nm", nm="2:4")
    assert_identical(weights)
    grouped = [v for k, v in weights[0].items() if k.endswith("weight") and v.dim() > 1 and has_groups(v.shape, 4)]
    assert len(grouped) == 21 and all(pattern_holds(w, 2, 4) for w in grouped)  # every layer but conv1
    assert [rec["sparsity"] for rec in ranks[0]["history"]] == [rec["sparsity"] for rec in ranks[1]["history"]]
