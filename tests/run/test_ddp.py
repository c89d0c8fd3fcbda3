"""Data-parallel training with torchrun: 2 real gloo processes share thresholds and masks."""

import json
import subprocess
import sys
import textwrap

import torch
from safetensors.torch import load_file

RANK_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    from safetensors.torch import save_file
    from sparsetrain.run import TrainOptions, fit, prepare

    out = sys.argv[1]
    options = TrainOptions(method="feather", sparsity=0.95, epochs=2, limit=512, batch_size=64,
                           model_args={"width": 0.25}, device="cpu", out=out, name="run", workers=1)
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


def test_two_gloo_ranks_have_identical_thresholds_and_final_weights(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    done = torchrun(script, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["batches"] == 4  # 512 images / 2 ranks / 64 per batch
    thresholds = [[record["threshold"] for record in r["history"]] for r in ranks]
    assert thresholds[0] == thresholds[1] and thresholds[0][0] > 0
    assert [rec["sparsity"] for rec in ranks[0]["history"]] == [rec["sparsity"] for rec in ranks[1]["history"]]
    weights = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1)]
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key
    conv_weights = [v for k, v in weights[0].items() if k.endswith("weight") and v.dim() > 1]
    zeros = sum(int((w == 0).sum()) for w in conv_weights)
    assert zeros == round(0.95 * sum(w.numel() for w in conv_weights))
    # only rank 0 wrote the run folder's files, once
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2


def test_cli_under_torchrun(tmp_path):
    done = torchrun("-m", "sparsetrain", "train", "--epochs", 1, "--limit", 256, "--model-arg", "width=0.25",
                    "--device", "cpu", "--out", tmp_path, "--name", "ddp", "--workers", 1)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("final: test acc") == 1
    config = json.loads((tmp_path / "ddp" / "config.json").read_text())
    assert abs(config["metrics"]["sparsity"] - 0.9) < 1e-4
