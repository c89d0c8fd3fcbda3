"""Every train option and config key given a value of each wrong kind ends in exit 2, one line, and nothing
written. A few kinds are right for some options (0 epochs of warm-up, seed 0, ...): those pairs are listed."""

import dataclasses
import math

import pytest
import yaml

from sparsetrain.run import TrainOptions

KINDS = {"string": "abc", "negative": -1, "zero": 0, "nan": math.nan, "inf": math.inf, "list": [1, 2], "huge": 10**30}
VALID = {  # (option, kind) pairs whose value is a right one for that option
    ("wd", "zero"), ("momentum", "zero"), ("warmup", "zero"), ("label_smoothing", "zero"), ("t1", "zero"),
    ("pthres", "zero"), ("seed", "zero"), ("workers", "zero"), ("limit", "huge"), ("milestones", "list"),
    ("name", "string"), ("out", "string"), ("sparsity", "zero"),
    # a huge finite learning rate is a run that diverges (exit 1, tests/run/test_failures.py); a huge clip, none
    ("lr", "huge"), ("clip", "huge"),
}
SMALL = {"epochs": 1, "limit": 64, "batch_size": 64, "workers": 1, "device": "cpu", "model_args": {"width": 0.25}}
CASES = [(f.name, kind) for f in dataclasses.fields(TrainOptions) for kind in KINDS if (f.name, kind) not in VALID]


@pytest.mark.parametrize("option, kind", CASES)
def test_a_wrong_value_is_one_line_and_writes_nothing(tmp_path, cli, option, kind):
    config = tmp_path / "c.yaml"
    values = {**SMALL, option: KINDS[kind]}
    if option != "out":
        values["out"] = str(tmp_path / "runs")
    config.write_text(yaml.safe_dump(values))
    code, _, err = cli("train", "--config", config)
    assert code == 2 and err.count("\n") == 1 and err.startswith("sparsetrain: error: "), (code, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]  # nothing written
