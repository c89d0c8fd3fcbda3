"""Data-parallel training with torchrun: 2 real gloo processes share thresholds, masks, gates and
removed channels."""

import json
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from sparsetrain.run.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow

RANK_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    from safetensors.torch import save_file
    from sparsetrain.run import fit, options_from_dict, prepare

    out, method = sys.argv[1], sys.argv[2]
    extra = json.loads(sys.argv[3])
    options = options_from_dict({"method": method, "epochs": 2, "limit": 512, "batch_size": 64,
                                 "model_args": {"width": 0.25}, "device": "cpu", "out": out, "name": "run",
                                 "workers": 1, **extra})
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


# -- FSDP2 from the command line ------------------------------------------------------------------------

FSDP = ["--fsdp", "--epochs", 2, "--limit", 256, "--batch-size", 64, "--device", "cpu", "--workers", 1]
DIE_AFTER_FIRST_CHECKPOINT = """
import os, signal, sys
from sparsetrain.run import folder
save = folder.RunFolder.save_checkpoint
def save_then_die(self, state):
    save(self, state)
    os.kill(os.getpid(), signal.SIGKILL)  # rank 0, right after the first epoch's checkpoint
folder.RunFolder.save_checkpoint = save_then_die
from sparsetrain.run.cli import main
sys.exit(main(sys.argv[1:]))
"""


def assert_exactly_sparse_plain_run(run):
    """A finished --fsdp run folder: fsdp recorded, a plain model's weights gathered whole, 90 % sparse."""
    config = json.loads((run / "config.json").read_text())
    assert config["options"]["fsdp"] is True
    weights = load_file(str(run / "model.safetensors"))
    assert weights and not any("parametrizations" in key for key in weights)
    assert abs(config["metrics"]["sparsity"] - 0.9) < 1e-4  # round(0.9 N) / N


def assert_nm_plain_run(run):
    """A finished --fsdp N:M run folder: fsdp recorded, a plain model's weights, 2:4 in every layer with groups."""
    from sparsetrain.nm import has_groups, pattern_holds

    assert json.loads((run / "config.json").read_text())["options"]["fsdp"] is True
    weights = load_file(str(run / "model.safetensors"))
    grouped = [v for k, v in weights.items() if k.endswith("weight") and v.dim() > 1 and has_groups(v.shape, 4)]
    assert len(grouped) == 21 and all(pattern_holds(w, 2, 4) for w in grouped)  # every layer but conv1


def test_fsdp_from_the_command_line_trains_a_vit(tmp_path):
    done = torchrun("-m", "sparsetrain", "train", *FSDP, "--model", "vit-micro", "--out", tmp_path, "--name", "run")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("final: test acc") == 1
    assert_exactly_sparse_plain_run(tmp_path / "run")


def test_an_fsdp_run_killed_after_its_first_epoch_resumes_to_the_same_end(tmp_path):
    """sr-ste on a ResNet-20 with its 2:4 groups held between updates (every 3 steps; 2 steps an epoch): the
    checkpoint falls inside an interval and holds them, gathered whole from the ranks' DTensors."""
    args = ["--method", "sr-ste", "--update-every", 3, "--model-arg", "width=0.25", "--out", tmp_path]
    straight = torchrun("-m", "sparsetrain", "train", *FSDP, *args, "--name", "straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert_nm_plain_run(tmp_path / "straight")
    dying = tmp_path / "dying.py"
    dying.write_text(DIE_AFTER_FIRST_CHECKPOINT)
    killed = torchrun(dying, "train", *FSDP, *args, "--name", "killed")
    assert killed.returncode != 0 and (tmp_path / "killed" / "checkpoint.safetensors").is_file()
    method = load_checkpoint(tmp_path / "killed" / "checkpoint.safetensors")["method"]
    # one threshold tensor per weight, whole (each rank holds 2 of the 4 rows), conv1's zeros (no groups) included
    assert method["step"] == 2 and [tuple(t.shape) for t in method["thresholds"][:2]] == [(4, 3, 3, 3), (4, 4, 3, 3)]
    resumed = torchrun("-m", "sparsetrain", "train", "--resume", tmp_path / "killed", "--workers", 1)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = load_file(str(tmp_path / "straight" / "model.safetensors")), load_file(str(tmp_path / "killed" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_gdp_under_fsdp_is_refused_naming_ddp(tmp_path):
    done = torchrun("-m", "sparsetrain", "train", *FSDP, "--method", "gdp", "--model-arg", "width=0.25",
                    "--out", tmp_path, "--name", "gdp")
    assert re.search(r"exitcode\s*:\s*2\b", done.stderr), done.stderr[-3000:]  # each rank: a usage error
    assert "gdp removes channels, which parameters sharded by FSDP (fully_shard) cannot follow; allowed: DDP" in done.stderr


def test_fsdp_without_torchrun_is_a_usage_error(tmp_path, capsys):
    from sparsetrain.run.cli import main

    assert main(["train", *map(str, FSDP), "--out", str(tmp_path), "--name", "alone"]) == 2
    assert "--fsdp shards the model across torchrun's processes; allowed: torchrun with 2 or more" in capsys.readouterr().err
