"""The comparison grid: end to end, skipping finished cells, repairing a truncated results file."""

import json

import pytest

from sparsetrain.run.bench import grid_cells, read_results, results_table, run_grid
from sparsetrain.run.cli import main

BASE = {"epochs": 1, "limit": 128, "batch_size": 64, "model_args": {"width": 0.25}, "device": "cpu", "workers": 1}


@pytest.fixture(scope="module")
def finished_grid(tmp_path_factory):
    out = tmp_path_factory.mktemp("grid")
    cells = grid_cells(["feather", "gmp"], [0], {"sparsities": [0.9]})
    lines = []
    records = run_grid(BASE, cells, out, log=lines.append)
    return out, cells, records, lines


@pytest.mark.slow
def test_tiny_grid_writes_results_table_and_plots(finished_grid):
    out, cells, records, lines = finished_grid
    assert [c.name for c in cells] == ["dense-seed0", "feather-s0.9-seed0", "gmp-s0.9-seed0"]
    assert [r["cell"] for r in records] == [c.name for c in cells]
    for name in ("results.jsonl", "results.md", "accuracy_vs_sparsity.png", "accuracy_vs_flops.png", "grid.json"):
        assert (out / name).is_file(), name
    sparse = [r for r in records if r["method"] != "dense"]
    for record in sparse:
        assert record["sparsity_reached"] == pytest.approx(0.9, abs=1e-4)  # round(0.9 N) / N on any trajectory
        assert record["flops"] < 0.5 * record["dense_flops"]
        assert record["nonzero_params"] < record["params"]
        assert record["wall_time"] > 0
    table = (out / "results.md").read_text()
    assert "| feather | " in table and "(n=1)" in table
    assert (out / "accuracy_vs_flops.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_rerunning_a_finished_grid_trains_nothing(finished_grid):
    out, cells, records, _ = finished_grid
    lines = []
    again = run_grid(BASE, cells, out, log=lines.append)
    assert lines == [] and again == records


@pytest.mark.slow
def test_truncated_last_line_is_repaired_without_losing_finished_cells(finished_grid):
    out, cells, records, _ = finished_grid
    results = out / "results.jsonl"
    text = results.read_text()
    results.write_text(text[: len(text) - 25])  # the last record was cut mid-write
    assert [r["cell"] for r in read_results(results)] == [c.name for c in cells[:2]]
    lines = []
    again = run_grid(BASE, cells, out, log=lines.append)
    assert lines[0] == "[3/3] gmp-s0.9-seed0 (resuming)"  # only the lost cell, from its final checkpoint
    assert not any(line.strip().startswith("epoch") for line in lines)  # nothing left to train
    assert [r["cell"] for r in again] == [c.name for c in cells]
    assert again[:2] == records[:2] and again[2]["test_acc"] == records[2]["test_acc"]


@pytest.mark.slow
def test_a_cell_killed_before_its_first_checkpoint_restarts(tmp_path):
    from sparsetrain.run import prepare
    from sparsetrain.run.options import options_from_dict

    cells = grid_cells(["ste"], [0], {"sparsities": [0.5]})[:1]  # just the dense cell
    options = options_from_dict({**cells[0].training_options(BASE), "out": str(tmp_path / "runs"), "name": cells[0].name})
    prepare(options).folder.unlock()  # its folder and config.json written, then killed before training
    stale = tmp_path / "runs" / cells[0].name
    assert sorted(path.name for path in stale.iterdir()) == ["config.json"]
    records = run_grid(BASE, cells, tmp_path, log=lambda line: None)
    assert records[0]["cell"] == cells[0].name and (stale / "model.safetensors").is_file()


def test_results_table_mean_and_std():
    records = [
        {"method": "dense", "sparsity": 0.0, "test_acc": 0.9},
        {"method": "feather", "sparsity": 0.9, "test_acc": 0.8},
        {"method": "feather", "sparsity": 0.9, "test_acc": 0.6},
    ]
    table = results_table(records)
    assert "| feather | 70.00 ± 14.14 (n=2) |" in table
    assert "| dense (reference, unpruned) | 90.00 ± 0.00 (n=1) |" in table


def test_a_grid_of_the_reference_and_n_m_cells_has_no_empty_table_by_sparsity():
    records = [
        {"method": "dense", "sparsity": 0.0, "test_acc": 0.6, "target": None, "nm": None},
        {"method": "sr-ste", "sparsity": 0.5, "test_acc": 0.5, "target": "nm", "nm": "2:4"},
    ]
    assert results_table(records) == "\n".join([
        "| method | 2:4 |", "|---|---:|", "| dense (reference, unpruned) | 60.00 ± 0.00 (n=1) |",
        "| sr-ste | 50.00 ± 0.00 (n=1) |"])
    assert results_table(records[:1]).startswith("| method |  |")  # the reference alone: its own table


def test_bench_cli_usage_errors(tmp_path, capsys):
    assert main(["bench", "--methods", "feathr", "--out", str(tmp_path / "g")]) == 2
    assert "unknown method 'feathr'" in capsys.readouterr().err
    assert main(["bench", "--sparsities", "0.9,x", "--out", str(tmp_path / "g")]) == 2
    assert "is not a comma-separated list of numbers" in capsys.readouterr().err
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "grid.json").write_text(json.dumps({"epochs": 99}))
    assert main(["bench", "--epochs", "1", "--out", str(tmp_path / "g")]) == 2
    assert "holds a grid with other options" in capsys.readouterr().err


@pytest.mark.slow
def test_channel_pruning_cells_land_in_their_own_table(tmp_path):
    cells = grid_cells(["gdp", "frs"], [0], {"sparsities": [0.9], "flops-targets": [0.5]})
    assert [c.name for c in cells] == ["dense-seed0", "gdp-f0.5-seed0", "frs-seed0"]
    records = run_grid({**BASE, "epochs": 2}, cells, tmp_path, log=lambda line: None)
    gdp, frs = records[1], records[2]
    assert gdp["flops_target"] == 0.5 and gdp["flops"] < gdp["dense_flops"]
    assert frs["flops_target"] is None and frs["flops"] < frs["dense_flops"] and frs["params"] < records[0]["params"]
    table = (tmp_path / "results.md").read_text()
    assert "| method | FLOPs target | FLOPs reached (% of dense) | test accuracy (%) |" in table
    assert "| gdp | 50% |" in table and "| frs | — |" in table
    assert (tmp_path / "accuracy_vs_flops.png").is_file()


def test_shared_method_options_go_to_the_methods_that_take_them(tmp_path):
    from sparsetrain.run.bench import check_grid

    cells = grid_cells(["feather", "gdp"], [0], {"sparsities": [0.9]})
    base = {**BASE, "pthres": 100, "method_args": {"theta": 0.5}}
    check_grid(base, cells, tmp_path)  # dense and gdp take neither: no error
    by_method = {c.method: c.training_options(base) for c in cells}
    assert "pthres" not in by_method["dense"] and by_method["dense"]["method_args"] == {}
    assert by_method["feather"]["pthres"] == 100 and by_method["feather"]["method_args"] == {"theta": 0.5}
    assert by_method["gdp"]["flops_target"] == 0.5 and "pthres" not in by_method["gdp"]
    with pytest.raises(ValueError, match="method option 'thetta' applies to none of the grid's methods"):
        check_grid({**BASE, "method_args": {"thetta": 0.5}}, cells, tmp_path)
    with pytest.raises(ValueError, match="--prune-every applies to none of the grid's methods"):
        check_grid({**BASE, "prune_every": 2}, cells, tmp_path)


@pytest.mark.slow  # trains a grid of cells
def test_nm_cells_vary_the_pattern_and_land_in_a_table_by_pattern(tmp_path, capsys):
    cells = grid_cells(["sr-ste", "feather"], [0], {"sparsities": [0.9], "nm": ["2:4", "1:4"]})
    assert [c.name for c in cells] == ["dense-seed0", "sr-ste-nm2-4-seed0", "sr-ste-nm1-4-seed0", "feather-s0.9-seed0"]
    assert main(["bench", "--methods", "sr-ste", "--nm", "2:4,1:4", "--sparsities", "0.9", "--seeds", "0",
                 "--out", str(tmp_path), "--epochs", "1", "--limit", "128", "--batch-size", "64",
                 "--model-arg", "width=0.25", "--device", "cpu", "--workers", "1"]) == 0
    records = read_results(tmp_path / "results.jsonl")
    assert [(r["cell"], r["nm"], r["sparsity"]) for r in records] == [
        ("dense-seed0", None, 0.0), ("sr-ste-nm2-4-seed0", "2:4", 0.5), ("sr-ste-nm1-4-seed0", "1:4", 0.75)]
    # conv1 (3 input channels) stays dense: a little under the pattern's sparsity
    assert 0.49 < records[1]["sparsity_reached"] < 0.5 and 0.74 < records[2]["sparsity_reached"] < 0.75
    table = (tmp_path / "results.md").read_text()
    assert "| method | 2:4 | 1:4 |" in table
    dense = f"{100 * records[0]['test_acc']:.2f} ± 0.00 (n=1)"
    assert f"| dense (reference, unpruned) | {dense} | {dense} |" in table
    assert f"| sr-ste | {100 * records[1]['test_acc']:.2f} ± 0.00 (n=1) | {100 * records[2]['test_acc']:.2f}" in table
    assert (tmp_path / "accuracy_vs_sparsity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # N:M at 1 - N/M
    assert main(["bench", "--methods", "sr-ste", "--nm", "2:5x", "--out", str(tmp_path / "bad")]) == 2
    assert "nm='2:5x' is not an N:M pattern" in capsys.readouterr().err
