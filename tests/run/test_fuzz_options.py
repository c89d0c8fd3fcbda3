"""Every train option and config key, and every method flag (with a method that takes it), given a value of
each wrong kind ends in exit 2, one line, and nothing written. A few kinds are right for some options (0 epochs
of warm-up, seed 0, ...): those pairs are listed."""

import dataclasses
import math

import pytest
import yaml

from sparsetrain.run import TrainOptions
from sparsetrain.run.flags import method_flags

KINDS = {"string": "abc", "negative": -1, "zero": 0, "nan": math.nan, "inf": math.inf, "list": [1, 2], "huge": 10**30}
VALID = {  # (option, kind) pairs whose value is a right one for that option
    ("wd", "zero"), ("momentum", "zero"), ("warmup", "zero"), ("label_smoothing", "zero"), ("t1", "zero"),
    ("pthres", "zero"), ("seed", "zero"), ("workers", "zero"), ("limit", "huge"), ("milestones", "list"),
    ("name", "string"), ("out", "string"), ("sparsity", "zero"),
    # method flags: a zero or huge value some options take, an N:M pattern as a list ([1, 2]: 1:2)
    ("theta", "zero"), ("end", "zero"), ("fix_at", "zero"), ("decay", "zero"), ("decay", "huge"), ("p", "huge"),
    ("p", "inf"), ("nm", "list"), ("eps_start", "huge"), ("eps_end", "huge"), ("init", "huge"),
    ("lambda_init", "huge"), ("lr_lambda", "huge"), ("tolerance", "zero"), ("min_keep", "zero"),
    ("linear_per_step", "zero"), ("lrp_eps", "zero"),
    # a huge finite learning rate is a run that diverges (exit 1, tests/run/test_failures.py); a huge clip, none
    ("lr", "huge"), ("clip", "huge"),
}
SMALL = {"epochs": 1, "limit": 64, "batch_size": 64, "workers": 1, "device": "cpu", "model_args": {"width": 0.25}}
FIELDS = [f.name for f in dataclasses.fields(TrainOptions) if f.name != "method_flags"]
FLAGS = {key: next(iter(flag.takes)) for key, flag in method_flags().items()}  # each flag with a method taking it
CASES = [(name, kind) for name in FIELDS + list(FLAGS) for kind in KINDS if (name, kind) not in VALID]


@pytest.mark.parametrize("option, kind", CASES)
def test_a_wrong_value_is_one_line_and_writes_nothing(tmp_path, cli, option, kind):
    config = tmp_path / "c.yaml"
    values = {**SMALL, option: KINDS[kind], **({"method": FLAGS[option]} if option in FLAGS else {})}
    if option != "out":
        values["out"] = str(tmp_path / "runs")
    config.write_text(yaml.safe_dump(values))
    code, _, err = cli("train", "--config", config)
    assert code == 2 and err.count("\n") == 1 and err.startswith("sparsetrain: error: "), (code, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]  # nothing written
