"""The method protocol: the same loop drives every registered method, with the promises of
issue #9 checked for each: finalize() computes what the trained model computed, the optimizer
always holds exactly the live parameters, mid-run state resumes bit-identically."""

import copy
import io

import pytest
import torch
import torch.nn.functional as F

import sparsetrain as st
from sparsetrain.models import create_model

METHODS = list(st.list_methods())
OPTIONS = {
    "frs": {"prune_every": 2, "channels_per_step": 3, "stop_at": 4},
    "gdp": {"flops_target": 0.6, "prune_end": 0.5},
    "feather": {"sparsity": 0.8},
}
STEPS = 6


def batches(count=STEPS, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, 16, 16, generator=gen), torch.randint(0, 10, (8,), generator=gen)) for _ in range(count)]


def build(name, seed=0):
    torch.manual_seed(seed)
    model = create_model("resnet20", width=0.25)  # a small residual CNN
    data = batches(2, seed=5)
    method = st.create(model, name, total_steps=STEPS, example_inputs=data[0][0][:2], data=data, **OPTIONS.get(name, {}))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    method.bind(optimizer)
    return model, method, optimizer


def live_parameters_match(model, optimizer):
    held = [p for group in optimizer.param_groups for p in group["params"]]
    return {id(p) for p in held} == {id(p) for p in model.parameters()} and len(held) == len(list(model.parameters()))


def run(train, model, method, optimizer, steps, check=lambda: None):
    """The protocol loop (conftest's ``train``) one batch at a time, with ``check()`` after each."""
    model.train()
    for batch in steps:
        train(model, method, optimizer, [batch])
        check()


@pytest.mark.parametrize("name", METHODS)
def test_the_loop_drives_every_method(name, train):
    model, method, optimizer = build(name)
    assert method.model is model

    def optimizer_holds_the_live_parameters() -> None:
        assert live_parameters_match(model, optimizer)

    run(train, model, method, optimizer, batches(), check=optimizer_holds_the_live_parameters)
    x = batches(1, seed=9)[0][0]
    model.eval()
    with torch.no_grad():
        trained = model(x)
    final = method.finalize()
    assert final is model  # every method works in place, FRS included
    assert live_parameters_match(model, optimizer)  # GDP's optimizer lets go of the gates
    assert not any(hasattr(m, "parametrizations") for m in final.modules())
    final.eval()
    with torch.no_grad():
        torch.testing.assert_close(final(x), trained, rtol=1e-4, atol=1e-5)


def test_gdp_gates_are_parameters_of_the_model():
    model, method, _ = build("gdp")
    assert any(p is method.gates for p in model.parameters())
    assert sum(1 for key in model.state_dict() if key.endswith(".gates")) == 1
    copied = copy.deepcopy(model)  # the gated model copies without the method or its optimizer
    assert sum(p.numel() for p in copied.parameters()) == sum(p.numel() for p in model.parameters())
    stale = torch.optim.SGD([p for p in model.parameters() if p is not method.gates], lr=0.1)
    with pytest.raises(ValueError, match="the optimizer does not hold GDP's gates"):
        method.bind(stale)


def test_frs_removes_channels_in_place_and_reports_it():
    model, method, optimizer = build("frs")
    changed = []
    for x, y in batches():
        F.cross_entropy(model(x), y).backward()
        method.before_optimizer_step()
        optimizer.step()
        optimizer.zero_grad()
        changed.append(method.step())
        assert live_parameters_match(model, optimizer)
        for group in optimizer.param_groups:
            for p in group["params"]:
                buffer = optimizer.state[p].get("momentum_buffer")
                assert buffer is None or buffer.shape == p.shape
    assert changed == [False, True, False, True, False, False]  # after steps 2 and 4 (stop_at)
    assert 0 < method.channels_removed <= 6  # 3 entries per step; a stream channel costs one per block


def saved(obj) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return buffer


@pytest.mark.parametrize("name", METHODS)
def test_mid_run_state_resumes_bit_identically(name, train):
    data = batches()
    model, method, optimizer = build(name)
    run(train, model, method, optimizer, data)
    expected = method.finalize().state_dict()

    model, method, optimizer = build(name)
    run(train, model, method, optimizer, data[:3])
    checkpoint = saved({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "method": method.state_dict()})

    state = torch.load(checkpoint, weights_only=True)  # tensors and plain values only
    model, method, optimizer = build(name, seed=7)  # other initial weights: all must come from the state
    method.load_state_dict(state["method"])
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    run(train, model, method, optimizer, data[3:])
    got = method.finalize().state_dict()
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key


def test_create_rejects_unknown_methods_and_options():
    model = create_model("resnet20", width=0.25)
    with pytest.raises(ValueError, match="unknown method 'feathr'; known methods: dense, feather"):
        st.create(model, "feathr", total_steps=10)
    with pytest.raises(ValueError, match=r"unknown option 'flops_target' for method 'feather'; allowed options: p, theta, .*, min_size, types, sparsity, scope\."):
        st.create(model, "feather", total_steps=10, flops_target=0.5)
    with pytest.raises(ValueError, match="method 'gdp' traces the model; allowed: example_inputs="):
        st.create(model, "gdp", total_steps=10)
    with pytest.raises(ValueError, match="method 'frs' scores the model on data"):
        st.create(model, "frs", total_steps=10, example_inputs=torch.zeros(2, 3, 16, 16))
    with pytest.raises(ValueError, match="unknown option 'sparsity' for method 'dense'; allowed options: none"):
        st.create(model, "dense", total_steps=10, sparsity=0.5)


def test_list_methods_names_every_method_with_its_options():
    methods = st.list_methods()
    assert list(methods) == ["dense", "feather", "st3", "st3-sigma", "gmp", "ste", "feather-nm", "st3-nm", "sr-ste",
                             "gdp", "frs"]
    assert methods["sr-ste"]["nm"] == "2:4" and methods["sr-ste"]["decay"] == 2e-4 and "sparsity" not in methods["sr-ste"]
    assert methods["feather"]["p"] == 3.0 and methods["st3"]["rescale"] is True
    assert methods["gdp"]["flops_target"] == 0.5
    assert set(methods["frs"]) == {"prune_every", "channels_per_step", "stop_at", "num_classes", "linear_per_step", "lrp_eps"}
