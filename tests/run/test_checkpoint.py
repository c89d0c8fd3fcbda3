"""Checkpoints: safetensors + JSON round trips, atomic writes, clear errors, nothing unpickled."""

import json

import pytest
import torch
from safetensors import safe_open

from sparsetrain.run.checkpoint import atomic_write, flatten, load_checkpoint, save_checkpoint, unflatten


def test_round_trip_of_a_nested_state(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    tree = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),  # int keys, tuples (betas), nested tensors
        "rng": torch.get_rng_state(),
        "values": [None, 1, 2.5, float("inf"), "text", True, (1, 2)],
    }
    path = save_checkpoint(tmp_path / "c.safetensors", tree)
    back = load_checkpoint(path)
    assert back["values"] == tree["values"]
    assert back["optimizer"]["param_groups"] == tree["optimizer"]["param_groups"]
    assert set(back["optimizer"]["state"]) == {0, 1}
    for key, value in tree["optimizer"]["state"][0].items():
        assert torch.equal(back["optimizer"]["state"][0][key], value)
    assert torch.equal(back["rng"], tree["rng"])
    fresh = torch.optim.Adam(model.parameters())
    fresh.load_state_dict(back["optimizer"])


def test_file_is_plain_safetensors_with_a_json_header(tmp_path):
    save_checkpoint(tmp_path / "c.safetensors", {"w": torch.arange(4.0), "step": 7})
    with safe_open(str(tmp_path / "c.safetensors"), framework="pt") as f:
        assert list(f.keys()) == [".w"]
        assert json.loads(f.metadata()["sparsetrain.tree"]) == {"w": {"__tensor__": ".w"}, "step": 7}


def test_flatten_rejects_objects_it_cannot_store():
    with pytest.raises(TypeError, match="cannot store a object at .x"):
        flatten({"x": object()})
    assert unflatten(*reversed(flatten({"a": [1, {"b": 2}]}))) == {"a": [1, {"b": 2}]}


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, {"step": 1})

    def failing(tmp):
        with open(tmp, "w") as f:
            f.write("partial")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        atomic_write(path, failing)
    assert load_checkpoint(path) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]


def test_corrupt_or_missing_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="is not a readable sparsetrain checkpoint"):
        load_checkpoint(bad)
