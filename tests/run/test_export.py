"""Sparse export: identical weights back, smaller than dense at 90 % sparsity; sparse-aware FLOPs."""

import torch

import sparsetrain as st
from sparsetrain.measure import count_flops
from sparsetrain.models import create_model
from sparsetrain.run.export import load_sparse, save_sparse


def sparse_resnet(sparsity):
    torch.manual_seed(0)
    model = create_model("resnet20")
    return st.Sparsifier(model, "feather", sparsity, total_steps=1, schedule="constant").finalize()


def test_round_trip_is_identical_and_smaller_than_dense(tmp_path):
    from safetensors.torch import save_file

    for sparsity in (0.9, 0.99):
        state = sparse_resnet(sparsity).state_dict()
        path = save_sparse(tmp_path / f"sparse{sparsity}.safetensors", state)
        back = load_sparse(path)
        assert back.keys() == state.keys()
        for key, value in state.items():
            assert back[key].dtype == value.dtype and torch.equal(back[key], value), key
        save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "dense.safetensors")
        ratio = path.stat().st_size / (tmp_path / "dense.safetensors").stat().st_size
        assert ratio < (0.2 if sparsity == 0.9 else 0.08), ratio


def test_layouts_are_chosen_by_size(tmp_path):
    import json

    from safetensors import safe_open

    state = {
        "dense": torch.arange(1.0, 101.0),
        "half": torch.cat([torch.zeros(50), torch.ones(50)]),
        "rare": torch.cat([torch.zeros(999), torch.ones(1)]),
        "count": torch.tensor(7),
    }
    path = save_sparse(tmp_path / "s.safetensors", state)
    with safe_open(str(path), framework="pt") as f:
        layouts = {k: v["layout"] for k, v in json.loads(f.metadata()["sparsetrain.sparse"]).items()}
    assert layouts == {"dense": "dense", "half": "bitmask", "rare": "indices", "count": "dense"}
    assert all(torch.equal(load_sparse(path)[k], v) for k, v in state.items())


def hand_counted_flops(model, x):
    """2 * (output positions) * (non-zero weights) per conv, 2 * non-zeros per linear."""
    total = []

    def hook(module, inputs, output):
        positions = output[0, 0].numel() if isinstance(module, torch.nn.Conv2d) else 1
        total.append(2 * positions * int(torch.count_nonzero(module.weight)))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    with torch.no_grad():
        model.eval()(x)
    for handle in handles:
        handle.remove()
    return sum(total)


def test_sparse_flops_count_only_nonzero_weights():
    x = torch.randn(1, 3, 32, 32)
    dense_model = create_model("resnet20")
    dense = count_flops(dense_model, x)
    assert count_flops(dense_model, x, skip_zeros=True) == dense == hand_counted_flops(dense_model, x)
    sparse_model = sparse_resnet(0.9)
    sparse = count_flops(sparse_model, x, skip_zeros=True)
    assert sparse == hand_counted_flops(sparse_model, x)
    assert sparse < 0.25 * dense


def test_export_command_writes_a_loadable_compressed_file(tmp_path, capsys):
    from safetensors.torch import save_file

    from sparsetrain.run.cli import main

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    state = sparse_resnet(0.9).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, run / "model.safetensors")
    assert main(["export", str(run)]) == 0
    assert "model.sparse.safetensors" in capsys.readouterr().out
    back = load_sparse(run / "model.sparse.safetensors")
    assert all(torch.equal(back[k], v) for k, v in state.items())
    assert main(["export", str(tmp_path / "missing")]) == 2
