"""The library validates at its door: every bad input to create(), bind(), load_state_dict() and
step() is one exception whose message names the value and what is allowed."""

import re

import pytest
import torch

import sparsetrain as st
from sparsetrain.models import create_model

METHODS = ["dense", "feather", "gdp", "frs"]  # one of each family (the presets share the engine)
OPTIONS = {
    "feather": {"sparsity": 0.8},
    "gdp": {"flops_target": 0.6},
    "frs": {"prune_every": 2, "channels_per_step": 3, "stop_at": 4},
}
STEPS = 6
EXAMPLE = torch.zeros(2, 3, 16, 16)  # small images keep tracing cheap; the models pool adaptively


def batch(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(8, 3, 16, 16, generator=gen), torch.randint(0, 10, (8,), generator=gen)


def build(name, total_steps=STEPS, **options):
    """A small ResNet-20 with method ``name`` attached (not bound)."""
    torch.manual_seed(0)
    model = create_model("resnet20", width=0.25)
    method = st.create(model, name, total_steps=total_steps, example_inputs=EXAMPLE, data=[batch()],
                       **{**OPTIONS.get(name, {}), **options})
    return model, method


def sgd(params):
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


# -- create() -------------------------------------------------------------------------------


@pytest.mark.parametrize("model, shown", [("resnet20", "'resnet20'"), (None, "None"), (torch.zeros(2, 3), "tensor([[0., 0., 0.], [0., 0., 0.]])")])
def test_create_refuses_a_model_that_is_not_a_module(model, shown):
    with pytest.raises(TypeError, match=re.escape(f"model={shown} is not allowed; allowed: a torch.nn.Module")):
        st.create(model, "feather", total_steps=10)


# -- bind() ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("optimizer, shown", [(None, "None"), ("sgd", "'sgd'")])
def test_bind_refuses_what_is_not_an_optimizer(name, optimizer, shown):
    _, method = build(name)
    with pytest.raises(TypeError, match=rf"optimizer={shown} is not allowed; allowed: a torch\.optim\.Optimizer"):
        method.bind(optimizer)
    assert method.optimizer is None


@pytest.mark.parametrize("name", METHODS)
def test_bind_refuses_another_models_optimizer(name):
    _, method = build(name)
    other = create_model("resnet20", width=0.25)
    with pytest.raises(ValueError, match=f"param group 0 holds a tensor of shape .* that is not a parameter of the "
                                         f"model this {name} method sparsifies; allowed: an optimizer built from"):
        method.bind(sgd(other.parameters()))
    assert method.optimizer is None


@pytest.mark.parametrize("name", METHODS)
def test_bind_refuses_a_foreign_parameter_beside_the_models(name):
    model, method = build(name)
    stray = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="param group 1 holds a tensor of shape \\(3,\\) that is not a parameter"):
        method.bind(sgd([{"params": list(model.parameters())}, {"params": [stray]}]))


@pytest.mark.parametrize("name", METHODS)
def test_bind_refuses_a_parameter_held_twice(name):
    model, method = build(name)
    optimizer = sgd(model.parameters())
    optimizer.param_groups[0]["params"].append(next(model.parameters()))  # torch only warns at construction
    first = next(n for n, _ in model.named_parameters())
    with pytest.raises(ValueError, match=rf"the optimizer holds parameter '{first}' twice; allowed: each parameter"):
        method.bind(optimizer)


@pytest.mark.parametrize("name", METHODS)
def test_bind_accepts_a_subset_of_the_parameters(name):
    model, method = build(name)
    frozen = [p for n, p in model.named_parameters() if n.startswith("fc.")]  # users freeze layers
    optimizer = sgd([p for p in model.parameters() if all(p is not q for q in frozen)])
    method.bind(optimizer)
    assert method.optimizer is optimizer


def test_gdp_bind_still_requires_the_gates():
    model, method = build("gdp")
    with pytest.raises(ValueError, match="the optimizer does not hold GDP's gates; allowed:"):
        method.bind(sgd([p for p in model.parameters() if p is not method.gates]))


# -- load_state_dict() ----------------------------------------------------------------------


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("state, shown", [(None, "None"), ("x", "'x'"), ([1, 2], r"\[1, 2\]")])
def test_load_state_dict_refuses_a_non_mapping(name, state, shown):
    _, method = build(name)
    with pytest.raises(TypeError, match=f"state={shown} is not allowed; allowed: the mapping state_dict\\(\\) of a {name}"):
        method.load_state_dict(state)


@pytest.mark.parametrize("name, other", [("dense", "feather"), ("feather", "dense"), ("gdp", "dense"), ("frs", "gdp")])
def test_load_state_dict_refuses_a_state_of_another_method(name, other):
    _, method = build(name)
    state = build(other)[1].state_dict()
    with pytest.raises(ValueError, match=f"this state is for method '{other}'; allowed: a state of method '{name}'"):
        method.load_state_dict(state)


@pytest.mark.parametrize("name", METHODS)
def test_load_state_dict_refuses_missing_keys(name):
    _, method = build(name)
    state = {k: v for k, v in method.state_dict().items() if k != "step"}
    with pytest.raises(ValueError, match=f"this state has keys .*; allowed: a {name} state with"):
        method.load_state_dict(state)


@pytest.mark.parametrize("setting, saved, here", [
    ("flops_target", {}, {"flops_target": 0.5}),
    ("total_steps", {}, {"total_steps": 8}),
    ("eps_start", {"eps_start": 0.2}, {}),
    ("prune_end", {}, {"prune_end": 0.75}),
])
def test_gdp_refuses_a_state_saved_with_other_settings(setting, saved, here):
    state = build("gdp", **saved)[1].state_dict()
    _, method = build("gdp", **here)
    old, new = state["settings"][setting], method.state_dict()["settings"][setting]
    with pytest.raises(ValueError, match=rf"the saved state has {setting}={old!r} but this gdp has {setting}={new!r}; "
                                         "allowed: the settings of the run being resumed"):
        method.load_state_dict(state)


@pytest.mark.parametrize("setting, here", [
    ("prune_every", {"prune_every": 3}),
    ("stop_at", {"stop_at": 2}),
    ("channels_per_step", {"channels_per_step": 2}),
    ("total_steps", {"total_steps": 8}),
    ("lrp_eps", {"lrp_eps": 1e-9}),
])
def test_frs_refuses_a_state_saved_with_other_settings(setting, here):
    state = build("frs")[1].state_dict()
    _, method = build("frs", **here)
    old, new = state["settings"][setting], method.state_dict()["settings"][setting]
    with pytest.raises(ValueError, match=rf"the saved state has {setting}={old!r} but this frs has {setting}={new!r}"):
        method.load_state_dict(state)


@pytest.mark.parametrize("name", ["gdp", "frs"])
def test_a_state_with_the_same_settings_loads_and_one_without_settings_too(name):
    state = build(name)[1].state_dict()
    _, method = build(name)
    method.load_state_dict(state)
    method.load_state_dict({k: v for k, v in state.items() if k != "settings"})  # written before settings were saved


# -- step() before bind() ---------------------------------------------------------------------


def test_frs_step_before_bind_is_refused_and_changes_nothing():
    model, method = build("frs", prune_every=1, stop_at=1)
    shapes = [tuple(p.shape) for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"allowed: call bind\(optimizer\) before step\(\)"):
        method.step()
    assert method.step_count == 0 and [tuple(p.shape) for p in model.parameters()] == shapes


@pytest.mark.parametrize("name", ["dense", "feather", "gdp"])
def test_methods_that_never_touch_the_optimizer_step_without_bind(name):
    _, method = build(name)
    assert method.step() is False


# -- non-finite values ------------------------------------------------------------------------


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_gdp_gate_stops_naming_its_group(value):
    _, method = build("gdp")
    group = 2
    with torch.no_grad():
        method.gates[sum(g.channels for g in method.groups[:group])] = value
    root = method.groups[group].root
    with pytest.raises(FloatingPointError, match=f"gate group '{root}' has a NaN or infinite gate at step 1; allowed: finite gates"):
        method.step()


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_frs_relevance_score_stops_naming_its_layer(value, monkeypatch):
    model, method = build("frs")
    scores = method.scores()
    layer = list(scores)[3]
    scores[layer][1] = value
    monkeypatch.setattr(method, "scores", lambda: scores)
    shapes = [tuple(p.shape) for p in model.parameters()]
    with pytest.raises(FloatingPointError, match=f"layer '{layer}' has a NaN or infinite relevance score at step 0; "
                                                 "allowed: finite relevance scores"):
        method.prune()
    assert [tuple(p.shape) for p in model.parameters()] == shapes and method.prunes_done == 0
