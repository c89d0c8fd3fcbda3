"""compat.Pruner is the published Feather Pruner: its own loop on the published code's recorded
outputs (tests/fixtures/feather_pruner_*.npz, from athglentis/feather @ d4aefe6), and the rules
of issue #10 derived by hand."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsetrain.compat import Pruner, feather_schedule, interpolated_quantile

FIXTURES = Path(__file__).parent / "fixtures"
CASES = json.loads((FIXTURES / "feather_pruner.json").read_text())["feather_pruner"]


def fixture_network() -> nn.Sequential:
    """The fixtures' network; module names are the Sequential indices."""
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 12, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(12), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 5),
    )


def run_published_loop(case: dict, data: dict, capsys) -> tuple[list[float], list[int], list[float], dict, str]:
    """The published loop, verbatim but for the import: update_thresh before every forward,
    update_thresh(end_of_batch=True) and print_sparsity after each epoch, desparsify at the end."""
    model = fixture_network()
    model.load_state_dict({k[len("init/"):]: torch.from_numpy(data[k]) for k in data.files if k.startswith("init/")})
    model.train()
    pruner = Pruner(model, "cpu", case["final_rate"], case["nbatches"], case["epochs"], case["pthres"], case["t1"])
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    thresholds, kinds, printed = [], [], []
    x, y = torch.from_numpy(data["x"]), torch.from_numpy(data["y"])
    for epoch in range(case["epochs"]):
        for i in range(case["nbatches"]):
            batch = epoch * case["nbatches"] + i
            pruner.update_thresh()
            thresholds.append(pruner.thresh)
            kinds.append(0)
            loss = F.cross_entropy(model(x[batch]), y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
        pruner.update_thresh(end_of_batch=True)
        thresholds.append(pruner.thresh)
        kinds.append(1)
        printed.append(pruner.print_sparsity())
    final = pruner.desparsify()
    assert final is model and not any(hasattr(m, "parametrizations") for m in model.modules())
    return thresholds, kinds, printed, model.state_dict(), capsys.readouterr().out


@pytest.mark.parametrize("case", CASES, ids=[c["file"][len("feather_pruner_"):-4] for c in CASES])
def test_the_published_loop_gives_the_published_numbers(case, capsys):
    data = np.load(FIXTURES / case["file"])
    thresholds, kinds, printed, state, out = run_published_loop(case, data, capsys)
    assert kinds == data["end_of_batch"].tolist()
    # Before and after the first SGD step from the given init weights: one step's rounding, an ulp or two.
    np.testing.assert_allclose(thresholds[:2], data["threshold"][:2], rtol=2**-22, atol=0)
    # Epochs of SGD drift by CPU and thread count (convolutions sum in other orders): 3e-6 seen after 3 epochs.
    np.testing.assert_allclose(thresholds, data["threshold"], rtol=1e-4, atol=0)
    assert printed == data["printed"].tolist()  # |w| <= T counts floor((N - 1) s) + 1 weights, drift or not
    final = {k[len("final/"):]: torch.from_numpy(data[k]) for k in data.files if k.startswith("final/")}
    weights = [key for key in final if key.endswith("weight") and final[key].dim() > 1]  # prunable ones baked
    # As many zeros as printed: drift changes which weights are zero, not how many.
    assert sum(int((state[k] == 0).sum()) for k in weights) == sum(int((final[k] == 0).sum()) for k in weights)
    for key, expected in final.items():
        got = state[key]
        if not expected.is_floating_point():
            assert torch.equal(got, expected), key
            continue
        if key in weights:  # d^(1/3) magnifies the drift of weights near T without bound; d = |w|^3 - T^3 does not
            got, expected = got.double() ** 3, expected.double() ** 3
        # The same drift, relative to the tensor's largest entry: 1e-5 seen.
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()),
                                   msg=lambda message, key=key: f"{key}: {message}")
    lines = [line for line in out.splitlines() if "| sparsity:" in line]
    assert len(lines) == case["epochs"] * len({"0", "3", "6", "11"} - ({"3", "11"} if case["pthres"] > 60 else set()))


def test_schedule_by_hand():
    # 2 batches x 4 epochs, t1 = 1 epoch: zeros for t < 2, cubic from t1 = 2 to t2 = floor(0.5 * 8) = 4, then s_f.
    schedule = feather_schedule(0.8, nbatches=2, epochs=4, t1=1)
    assert schedule.tolist() == pytest.approx([0, 0, 0.0, 0.8 - 0.8 * 0.5**3, 0.8, 0.8, 0.8, 0.8])


def test_interpolated_quantile_by_hand():
    values = torch.tensor([0.4, 0.1, 0.3, 0.2])  # sorted 0.1 0.2 0.3 0.4; m = 3 * 0.5 = 1.5 -> 0.25
    assert interpolated_quantile(values, 0.5) == pytest.approx(0.25)
    assert interpolated_quantile(values, 1.0) == pytest.approx(0.4)
    assert interpolated_quantile(values, 0.0) == pytest.approx(0.1)


def test_update_thresh_advances_and_end_of_batch_recomputes_without_advancing():
    torch.manual_seed(0)
    model = fixture_network()
    pruner = Pruner(model, "cpu", 0.5, nbatches=2, epochs=2)  # schedule [0, 0.4375, 0.5, 0.5]
    pruner.update_thresh()
    assert (pruner.step_idx, pruner.thresh) == (1, 0.0)
    pruner.update_thresh()
    magnitudes = torch.cat([m.parametrizations.weight.original.detach().flatten() for _, m in pruner.layers]).abs()
    assert pruner.step_idx == 2 and pruner.thresh == pytest.approx(interpolated_quantile(magnitudes, 0.4375))
    with torch.no_grad():
        model[0].parametrizations.weight.original.mul_(3)  # the weights change: end_of_batch sees it
    pruner.update_thresh(end_of_batch=True)
    magnitudes = torch.cat([m.parametrizations.weight.original.detach().flatten() for _, m in pruner.layers]).abs()
    assert pruner.step_idx == 2 and pruner.thresh == pytest.approx(interpolated_quantile(magnitudes, 0.4375))


def test_pthres_boundary_and_exact_types():
    model = fixture_network()  # prunable counts 162, 54, 648, 60
    assert [name for name, _ in Pruner(model, "cpu", 0.5, 1, 2, pthres=162).layers] == ["0", "6"]  # 162 >= 162
    class MyConv(nn.Conv2d):
        pass
    other = nn.Sequential(MyConv(3, 4, 3), nn.Conv2d(4, 4, 1))
    assert [name for name, _ in Pruner(other, "cpu", 0.5, 1, 2).layers] == ["1"]  # exactly nn.Conv2d, not a subclass
