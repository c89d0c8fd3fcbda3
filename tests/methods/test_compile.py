"""torch.compile over a sparsified model: no graph break, no recompilation as thresholds, targets and
tie masks change (one more graph where a threshold becomes per-group or the masks are fixed), and the
numbers of eager training within float tolerance."""

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters

import sparsetrain as st
from sparsetrain.models import create_model
from sparsetrain.nm import select_groups

NO_TARGET = ("dense", "sr-ste", "feather-nm", "st3-nm")  # the N:M presets take their pattern's sparsity
EXTRA_GRAPHS = {"st3": 1, "st3-sigma": 1, "feather-nm": 1, "st3-nm": 2}  # the fixed masks; per-group T from k > 0


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 12))


def run(build, method, backend, steps, batch, tied=False):
    """Train ``steps`` steps (compiled with ``backend``, or eager for None); return the losses, the
    finalized state, the compiler's graph and graph-break counts, and the steps that had pruned ties."""
    torch._dynamo.reset()
    counters.clear()
    model = build()
    options = {} if method in NO_TARGET else {"sparsity": 0.5}
    if tied:  # magnitudes on a grid of 1/64, kept there (lr 0): many tie at every threshold from step 3 on
        with torch.no_grad():
            for p in model.parameters():
                p.copy_((p * 64).round() / 64)
        options["start"] = 3
    method_object = st.create(model, method, total_steps=steps, **options)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0 if tied else 0.1, momentum=0.9)
    method_object.bind(optimizer)
    forward = torch.compile(model, backend=backend) if backend else model
    gen = torch.Generator().manual_seed(1)
    losses, tie_steps = [], []
    for t in range(steps):
        x, y = batch(gen)
        loss = F.cross_entropy(forward(x), y)
        optimizer.zero_grad()
        loss.backward()
        method_object.before_optimizer_step()
        optimizer.step()
        method_object.step()
        losses.append(loss.item())
        if any(p.ties is not None for p in getattr(method_object, "_params", [])):
            tie_steps.append(t)
    graphs, breaks = counters["stats"].get("unique_graphs", 0), sum(counters["graph_break"].values())
    return losses, method_object.finalize().state_dict(), graphs, breaks, tie_steps


def vectors(gen):
    return torch.randn(16, 32, generator=gen), torch.randint(0, 12, (16,), generator=gen)


def images(gen):
    return torch.randn(4, 3, 32, 32, generator=gen), torch.randint(0, 10, (4,), generator=gen)


def assert_same_training(eager, compiled, rtol):
    """Losses within ``rtol`` and, after finalize, as many zeros in all (a weight within an ulp of the
    threshold may fall on the other side, so neither the weights nor each layer's count are compared)."""
    assert compiled[0] == pytest.approx(eager[0], rel=rtol)
    assert sum(int((v == 0).sum()) for v in compiled[1].values()) == sum(int((v == 0).sum()) for v in eager[1].values())


@pytest.mark.parametrize("method", ["feather", "st3", "st3-sigma", "gmp", "ste", "sr-ste", "feather-nm", "st3-nm"])
def test_compiled_training_keeps_one_graph_and_the_eager_numbers(method):
    dense_graphs = run(mlp, "dense", "eager", 12, vectors)[2]
    eager, compiled = run(mlp, method, None, 12, vectors), run(mlp, method, "eager", 12, vectors)
    assert compiled[3] == 0  # no graph break
    assert compiled[2] == dense_graphs + EXTRA_GRAPHS.get(method, 0)
    assert_same_training(eager, compiled, 1e-4)  # Feather's cube root: numpy's cbrt eager, pow compiled


@pytest.mark.parametrize("method", ["feather", "st3-sigma", "gmp"])
def test_tie_masks_appearing_and_moving_recompile_nothing_and_prune_the_same_entries(method):
    eager, compiled = run(mlp, method, None, 10, vectors, tied=True), run(mlp, method, "eager", 10, vectors, tied=True)
    assert eager[4] == list(range(3, 10))  # none while s(t) = 0 (to step 4), then a tie mask at every threshold
    assert compiled[3] == 0 and compiled[2] == 1 + EXTRA_GRAPHS.get(method, 0)
    assert_same_training(eager, compiled, 1e-5)
    for key, value in eager[1].items():  # the same entries pruned (lr 0: the same weights, so exactly)
        assert torch.equal(compiled[1][key] == 0, value == 0), key


@pytest.mark.parametrize("method", ["sr-ste", "feather-nm", "st3-nm"])
def test_nm_ties_of_different_values_in_several_groups_prune_the_same_entries_compiled(method):
    # magnitudes on a grid of 1/16: many groups of 4 tie across their 2nd and 3rd smallest, at many values
    torch.manual_seed(0)
    layer = nn.Linear(64, 16, bias=False)
    with torch.no_grad():
        layer.weight.copy_((layer.weight * 16).round() / 16)
    chosen = select_groups([layer.weight.detach().abs()], 2, 4)
    tied = chosen.ties[0]
    assert tied is not None and len(layer.weight.detach().abs()[tied].unique()) > 1  # ties at several values
    method_object = st.create(layer, method, total_steps=4, **({"start": 0} if method == "feather-nm" else {}))
    method_object.bind(torch.optim.SGD(layer.parameters(), lr=0.0))
    for _ in range(2):
        method_object.step()
    torch._dynamo.reset()
    eye = torch.eye(64)
    eager, compiled = layer(eye).detach().T, torch.compile(layer, backend="eager")(eye).detach().T
    assert torch.equal(compiled != 0, eager != 0)
    assert int((compiled.reshape(16, 16, 4) != 0).sum(-1).max()) <= 2  # the 2:4 pattern holds in the compiled forward
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=0)  # p = 3: pow compiled, Newton's steps eager


def test_a_bfloat16_layer_beside_a_float32_one_keeps_its_dtype_compiled():
    # the N:M thresholds of layers of mixed dtypes are selected together, in the wider dtype
    torch.manual_seed(0)
    model = nn.ModuleDict({"narrow": nn.Linear(16, 8).bfloat16(), "wide": nn.Linear(16, 8)})
    method_object = st.create(model, "sr-ste", total_steps=4)
    method_object.bind(torch.optim.SGD(model.parameters(), lr=0.0))
    method_object.step()
    torch._dynamo.reset()
    x = torch.randn(4, 16)
    eager = model["narrow"](x.bfloat16())
    compiled = torch.compile(model["narrow"], backend="eager")(x.bfloat16())
    assert compiled.dtype == torch.bfloat16 and torch.equal(compiled, eager)


@pytest.mark.slow
@pytest.mark.parametrize("model_name, method", [("resnet20", "feather"), ("vit-micro", "feather"),
                                                ("vit-micro", "st3"), ("resnet20", "sr-ste")])
def test_zoo_models_compile_with_the_dense_graph_count(model_name, method):
    """Through AOT autograd (the straight-through Function's backward traced too) for feather on
    ResNet-20, through dynamo alone for the others (the graph counts are dynamo's)."""
    def build():
        torch.manual_seed(0)
        return create_model(model_name, **({"width": 0.25} if model_name == "resnet20" else {}))

    backend = "aot_eager" if method == "feather" and model_name == "resnet20" else "eager"
    dense_graphs = run(build, "dense", backend, 6, images)[2]
    eager, compiled = run(build, method, None, 6, images), run(build, method, backend, 6, images)
    assert compiled[3] == 0
    assert compiled[2] == dense_graphs + EXTRA_GRAPHS.get(method, 0)  # st3: its fixed masks from step 6 of 6
    assert_same_training(eager, compiled, 1e-3)
