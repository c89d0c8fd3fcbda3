"""Paired comparison: the seed fixes initial weights and data order whatever the method; the paired
t-interval by hand; a tiny paired run end to end, resumed without training again."""

import math

import pytest
import torch

from sparsetrain.run.loop import prepare
from sparsetrain.run.options import options_from_dict
from sparsetrain.run.paired import Variant, paired_interval, paired_table, parse_variant, run_paired

BASE = {"epochs": 1, "limit": 128, "batch_size": 64, "model_args": {"width": 0.25}, "device": "cpu", "workers": 1}
ORIGINAL = ".parametrizations.weight.original"


def _start(tmp_path, method, seed, **method_args):
    """The initial weights (by module name) and the first two epochs' batches of a prepared run."""
    options = options_from_dict({**BASE, "sparsity": 0.98, "method": method, "method_args": method_args, "seed": seed,
                                 "out": str(tmp_path), "name": f"{method}-{len(method_args)}-{seed}"})
    setup = prepare(options)
    setup.folder.unlock()
    weights = {name.replace(ORIGINAL, ".weight"): p.detach().clone() for name, p in setup.model.named_parameters()}
    batches = [torch.cat([x.flatten() for x, _ in setup.train_loader.batches(e)]) for e in (0, 1)]
    labels = [torch.cat([y for _, y in setup.train_loader.batches(e)]) for e in (0, 1)]
    return weights, batches, labels


@pytest.mark.parametrize("seed", [0, 3])
def test_the_seed_fixes_initial_weights_and_batches_whatever_the_method(tmp_path, seed):
    reference = _start(tmp_path, "feather", seed)
    for method, args in [("gmp", {}), ("st3-sigma", {}), ("feather", {"scope": "erk", "decay": 2e-4})]:
        weights, batches, labels = _start(tmp_path, method, seed, **args)
        assert weights.keys() == reference[0].keys()
        assert all(torch.equal(weights[k], reference[0][k]) for k in weights)
        assert all(torch.equal(a, b) for a, b in zip(batches + labels, reference[1] + reference[2]))
    other = _start(tmp_path, "feather", seed + 1)  # and another seed changes both
    assert not torch.equal(other[0]["conv1.weight"], reference[0]["conv1.weight"])
    assert not torch.equal(other[2][0], reference[2][0])


def test_paired_interval_by_hand():
    mean, low, high = paired_interval([1, 2, 3, 4, 5], [2, 2.5, 4, 4, 6.5])
    # d = (1, .5, 1, 0, 1.5): mean .8, s_d = sqrt(1.3 / 4), t_{.975, 4} = 2.776
    half = 2.776 * math.sqrt(1.3 / 4) / math.sqrt(5)
    assert (mean, low, high) == pytest.approx((0.8, 0.8 - half, 0.8 + half))
    with pytest.raises(ValueError, match="equal sizes"):
        paired_interval([1, 2], [1, 2, 3])


def test_parse_variant():
    assert parse_variant("gmp") == Variant("gmp", "gmp", {})
    assert parse_variant("feather:scope=erk,decay=2e-4") == Variant("feather-scope=erk-decay=2e-4", "feather",
                                                                     {"scope": "erk", "decay": 2e-4})
    assert parse_variant("fe=feather:end=0.75") == Variant("fe", "feather", {"end": 0.75})
    with pytest.raises(ValueError, match="not KEY=VALUE"):
        parse_variant("feather:scope")
    with pytest.raises(ValueError, match="unknown method"):
        parse_variant("feathr")


@pytest.mark.slow
def test_a_tiny_paired_run_resumes_and_tabulates(tmp_path):
    variants = [Variant("feather", "feather"), Variant("erk", "feather", {"scope": "erk"})]
    lines = []
    base = {**BASE, "sparsity": 0.9}
    records = run_paired(base, variants, [0, 1], tmp_path, log=lines.append)
    assert [(r["label"], r["seed"]) for r in records] == [("feather", 0), ("erk", 0), ("feather", 1), ("erk", 1)]
    assert all(r["sparsity_reached"] == pytest.approx(0.9, abs=1e-4) for r in records)
    again = []
    assert run_paired(base, variants, [0, 1], tmp_path, log=again.append) == records and again == []
    table = (tmp_path / "results.md").read_text().splitlines()
    acc = {(r["label"], r["seed"]): 100 * r["test_acc"] for r in records}
    mean, low, high = paired_interval([acc["feather", 0], acc["feather", 1]], [acc["erk", 0], acc["erk", 1]])
    assert table[3].startswith(f"| erk | {acc['erk', 0]:.2f} | {acc['erk', 1]:.2f} |")
    assert table[3].endswith(f"| {mean:+.2f} [{low:+.2f}, {high:+.2f}] (n=2) |")
    assert paired_table(records, ["feather", "erk"]) == "\n".join(table)
    with pytest.raises(ValueError, match="label 'erk' for another variant"):
        run_paired(base, [variants[0], Variant("erk", "feather", {"scope": "sigma"})], [0], tmp_path)
    with pytest.raises(ValueError, match="other shared options"):
        run_paired({**base, "epochs": 2}, variants, [0], tmp_path)
