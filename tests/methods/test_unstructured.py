"""The unstructured engine (Sparsifier) and its presets: exact sparsity, ties, shared weights,
threshold timing, resume, knobs, layer choice and bad input."""

import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsetrain as st
from sparsetrain.methods.unstructured import nm_presets
from sparsetrain.operators import threshold_operator
from sparsetrain.selection import erk_counts, layer_sigma

PRESETS = ["feather", "st3", "st3-sigma", "gmp", "ste"]


def fresh_copy(model_class, seed=1):
    torch.manual_seed(seed)
    return model_class()


def forward_zeros(model: nn.Module, sparsifier: st.Sparsifier) -> int:
    """Zeros of the weights the forward pass actually sees (the parametrized weights)."""
    return sum(int((module.weight == 0).sum()) for module in sparsifier._modules)


def test_presets_are_registered_methods():
    methods = st.list_methods()
    assert all(name in methods for name in PRESETS)
    assert all(isinstance(st.create(nn.Linear(8, 8), name, total_steps=2), st.Sparsifier) for name in PRESETS)


@pytest.mark.parametrize("method", PRESETS)
@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.99])
def test_finalized_model_has_exactly_round_sN_zeros(tiny_net, make_batches, train, method, sparsity):
    # float64: among ~5,000 float32 magnitudes a tie is likely (birthday bound), in float64 it is not.
    tiny_net.double()
    sp = st.Sparsifier(tiny_net, method, sparsity, total_steps=12)
    batches = [(x.double(), y) for x, y in make_batches(12)]
    train(tiny_net, sp, torch.optim.SGD(tiny_net.parameters(), lr=0.05, momentum=0.9), batches)
    weights = torch.cat([w.detach().reshape(-1) for w in sp.dense_weights()])
    if not sp.fixed:  # st3's fixed phase (from step 11 of 12) wrote exact zeros into the weights
        assert weights.abs().unique().numel() == weights.numel(), "test needs distinct magnitudes"
    n = sp.numel()
    assert sp.sparsity() == round(sparsity * n) / n
    model = sp.finalize()
    zeros = sum(int((m.weight == 0).sum()) for _, m in st.find_prunable(model))
    assert zeros == round(sparsity * n)


@pytest.mark.parametrize("method", PRESETS)
def test_forward_of_step_t_uses_threshold_of_pre_step_weights(tiny_net, make_batches, method):
    total = 10
    sp = st.Sparsifier(tiny_net, method, 0.9, total_steps=total, start=0, end=6, fix_at=None)
    opt = torch.optim.SGD(tiny_net.parameters(), lr=0.05)
    n = sp.numel()
    for t, (x, y) in enumerate(make_batches(total + 2)):
        pre_step = [w.detach().clone() for w in sp.dense_weights()]
        norms = [p.norm for p in sp._params]
        k = round(sp.schedule.sparsity_at(t) * n)
        magnitudes = torch.cat([(w * s).abs().reshape(-1) for w, s in zip(pre_step, norms)])
        expected = magnitudes.sort().values[k - 1].item() if k > 0 else 0.0
        assert sp.step_count == t
        assert sp.threshold == expected
        assert forward_zeros(tiny_net, sp) == k
        loss = F.cross_entropy(tiny_net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sp.step()
    assert sp.target == 0.9  # stepping past total_steps holds s_f


def test_finalize_leaves_a_plain_model_that_loads_into_a_fresh_instance(tiny_net, make_batches, train):
    sp = st.Sparsifier(tiny_net, "st3", 0.8, total_steps=5)
    train(tiny_net, sp, torch.optim.SGD(tiny_net.parameters(), lr=0.05), make_batches(5))
    tiny_net.eval()
    x = make_batches(1, seed=3)[0][0]
    with torch.no_grad():
        sparse_out = tiny_net(x)
    model = sp.finalize()
    assert not any(hasattr(m, "parametrizations") for m in model.modules())
    fresh = fresh_copy(type(tiny_net), seed=5).eval()
    fresh.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), sparse_out, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="finalized"):
        sp.step()


def test_optimizer_built_before_attaching_still_trains_the_dense_weights(tiny_net, make_batches, train):
    opt = torch.optim.SGD(tiny_net.parameters(), lr=0.1)
    before = tiny_net.conv.weight.detach().clone()
    sp = st.Sparsifier(tiny_net, "ste", 0.5, total_steps=3)
    train(tiny_net, sp, opt, make_batches(3))
    assert not torch.equal(sp.dense_weights()[0].detach(), before)


def test_gmp_gives_pruned_weights_no_gradient_and_ste_full_gradient(tiny_net, make_batches):
    x, y = make_batches(1)[0]
    for method, pruned_grad_is_zero in [("gmp", True), ("ste", False)]:
        model = fresh_copy(type(tiny_net))
        sp = st.Sparsifier(model, method, 0.5, total_steps=1, schedule="constant")
        F.cross_entropy(model(x), y).backward()
        w = sp.dense_weights()[-1]
        pruned = w.detach().abs() <= sp.threshold
        assert bool((w.grad[pruned] == 0).all()) == pruned_grad_is_zero
        assert bool((w.grad[~pruned] != 0).any())


def test_feather_theta_depends_on_final_sparsity():
    assert st.method_config("feather", 0.95).theta == 1.0
    assert st.method_config("feather", 0.96).theta == 0.5


def test_knobs_override_the_preset(tiny_net):
    sp = st.Sparsifier(tiny_net, "feather", 0.9, total_steps=100, p=1.0, theta=0.25, start=10, end=0.5)
    assert (sp.config.p, sp.config.theta) == (1.0, 0.25)
    assert (sp.schedule.start, sp.schedule.end) == (10, 50)
    assert sp.target == 0.0


def test_schedule_object_is_accepted(tiny_net):
    sp = st.Sparsifier(tiny_net, "gmp", 0.6, total_steps=10, schedule=st.Linear(0.6, 0, 4))
    for _ in range(2):
        sp.step()
    assert sp.target == pytest.approx(0.3)
    assert sp.sparsity() == round(0.3 * sp.numel()) / sp.numel()


def test_layer_scope_prunes_each_layer_to_the_same_fraction(tiny_net):
    sp = st.Sparsifier(tiny_net, "gmp", 0.75, total_steps=1, scope="layer", schedule="constant")
    for name, size, zeros in sp.layer_stats():
        assert zeros == round(0.75 * size), name
    with pytest.raises(ValueError, match="Sparsifier.thresholds"):
        sp.threshold


def test_erk_scope_prunes_each_layer_to_its_erk_count(tiny_net):
    sp = st.Sparsifier(tiny_net, "feather", 0.9, total_steps=1, scope="erk", schedule="constant")
    counts = erk_counts([tuple(w.shape) for w in sp.dense_weights()], 0.9)
    assert [zeros for _, _, zeros in sp.layer_stats()] == counts
    assert sp.sparsity() == round(0.9 * sp.numel()) / sp.numel()
    with pytest.raises(ValueError, match="Sparsifier.thresholds"):
        sp.threshold


def test_sigma_scope_thresholds_normalised_magnitudes(tiny_net):
    sp = st.Sparsifier(tiny_net, "st3-sigma", 0.9, total_steps=1, schedule="constant")
    for w, (name, _, zeros) in zip(sp.dense_weights(), sp.layer_stats()):
        layer_threshold = sp.threshold * layer_sigma(w.shape)
        assert abs(zeros - int((w.detach().abs() <= layer_threshold).sum())) <= 1, name
    assert sp.sparsity() == round(0.9 * sp.numel()) / sp.numel()


def test_st3_rescale_matches_hand_computation():
    layer = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.1, 0.2, 0.3, 0.4], [-0.5, 0.6, -0.7, 0.8]]))
    sp = st.Sparsifier(layer, "st3", 0.25, total_steps=1, schedule="constant")  # k = 2: 0.1 and 0.2 pruned
    assert sp.threshold == pytest.approx(0.2)
    r = torch.tensor([(0.7 / 4 + 1e-6) / (1.0 / 4 + 1e-6), (2.6 / 4 + 1e-6) / (2.6 / 4 + 1e-6)])
    a = 1.01 / (r + 0.01)
    expected = a[:, None] * torch.tensor([[0.0, 0.0, 0.1, 0.2], [-0.3, 0.4, -0.5, 0.6]])
    torch.testing.assert_close(layer.weight, expected)


@pytest.mark.parametrize(
    "layer, x",
    [
        (nn.Conv1d(4, 8, 3), torch.randn(2, 4, 10)),
        (nn.Conv2d(4, 8, 3, groups=2), torch.randn(2, 4, 6, 6)),
        (nn.Conv2d(8, 8, 3, groups=8), torch.randn(2, 8, 6, 6)),
        (nn.Conv3d(2, 4, 2), torch.randn(2, 2, 4, 4, 4)),
        (nn.Linear(16, 8), torch.randn(2, 16)),
    ],
    ids=["conv1d", "grouped", "depthwise", "conv3d", "linear"],
)
def test_every_conv_and_linear_kind_is_sparsified(layer, x):
    model = nn.Sequential(layer, nn.ReLU())
    sp = st.Sparsifier(model, "feather", 0.5, total_steps=1, schedule="constant")
    model(x).sum().backward()
    assert sp.sparsity() == round(0.5 * sp.numel()) / sp.numel()
    assert layer.parametrizations.weight.original.grad is not None
    assert not hasattr(layer, "bias") or not hasattr(layer.parametrizations, "bias")


def test_other_modules_are_left_alone(tiny_net):
    bn_state = {k: v.clone() for k, v in tiny_net.bn.state_dict().items()}
    st.Sparsifier(tiny_net, "feather", 0.9, total_steps=1, schedule="constant")
    assert not hasattr(tiny_net.bn, "parametrizations")
    for key, value in tiny_net.bn.state_dict().items():
        assert torch.equal(value, bn_state[key])
    assert not hasattr(tiny_net.conv.parametrizations, "bias")


def test_layer_filters(tiny_net):
    sp = st.Sparsifier(tiny_net, "feather", 0.5, total_steps=1, exclude=["fc", "depth*"], min_size=500)
    assert sp.names == ["conv2"]
    assert sp.excluded == [("conv", "432 weights, fewer than min_size=500"), ("depthwise", "matches exclude pattern 'depth*'"),
                           ("fc", "matches exclude pattern 'fc'")]
    typed = st.find_prunable(tiny_net, types=(nn.Linear,))
    assert [name for name, _ in typed] == ["fc"]


def test_unknown_method_lists_the_known_ones(tiny_net):
    with pytest.raises(ValueError, match="unknown method 'feathr'; known methods: feather, st3, st3-sigma, gmp, ste"):
        st.Sparsifier(tiny_net, "feathr", 0.9, total_steps=10)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 2, float("nan")])
def test_sparsity_out_of_range(tiny_net, bad):
    with pytest.raises(ValueError, match=r"sparsity=.*allowed: a number in \[0, 1\)"):
        st.Sparsifier(tiny_net, "feather", bad, total_steps=10)


@pytest.mark.parametrize("bad", [0, -5, 2.5, None])
def test_total_steps_must_be_positive(tiny_net, bad):
    with pytest.raises(ValueError, match=r"total_steps=.*allowed: an int > 0"):
        st.Sparsifier(tiny_net, "feather", 0.5, total_steps=bad)


def test_model_without_prunable_layer(tiny_net):
    with pytest.raises(ValueError, match="has no prunable layer"):
        st.Sparsifier(nn.Sequential(nn.BatchNorm1d(4), nn.ReLU()), "feather", 0.5, total_steps=1)
    with pytest.raises(ValueError, match="has no prunable layer"):
        st.Sparsifier(tiny_net, "feather", 0.5, total_steps=1, exclude=["*"])


def test_unknown_knob_and_bad_values(tiny_net):
    with pytest.raises(ValueError, match="unknown option 'thetta'; allowed options: p, theta"):
        st.Sparsifier(tiny_net, "feather", 0.5, total_steps=1, thetta=0.5)
    with pytest.raises(ValueError, match="theta=2"):
        st.Sparsifier(tiny_net, "feather", 0.5, total_steps=1, theta=2)
    with pytest.raises(ValueError, match="unknown scope 'local'"):
        st.Sparsifier(tiny_net, "feather", 0.5, total_steps=1, scope="local")
    with pytest.raises(ValueError, match="already parametrized"):
        st.Sparsifier(tiny_net, "feather", 0.5, total_steps=1)
        st.Sparsifier(tiny_net, "feather", 0.5, total_steps=1)


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_weight_names_the_layer(tiny_net, value):
    sp = st.Sparsifier(tiny_net, "feather", 0.5, total_steps=10)
    with torch.no_grad():
        sp.dense_weights()[2][0, 0, 0, 0] = value
    with pytest.raises(FloatingPointError, match="layer 'conv2' has a NaN or infinite weight at step 1"):
        sp.step()


class WideNet(nn.Module):
    """fc2 holds 51,200 weights (past the direct selection); fc1's 6 inputs make no groups of 4."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(6, 256), nn.Linear(256, 200), nn.Linear(200, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


@pytest.mark.parametrize("value", [math.nan, math.inf])
@pytest.mark.parametrize("layer", ["fc1", "fc2"])
@pytest.mark.parametrize("method, knobs", [("feather", {}), ("feather", {"scope": "layer"}), ("feather", {"scope": "erk"}),
                                           ("st3-sigma", {}), ("gmp", {"start": 2}), ("sr-ste", {}), ("feather-nm", {})])
def test_non_finite_weight_names_the_layer_in_every_scope(method, knobs, layer, value):
    """The check rides on the selection's pass (off the sample's stride, in a layer left dense by N:M,
    and at a step where nothing is pruned: gmp's start, feather-nm's k = 0)."""
    torch.manual_seed(0)
    model = WideNet()
    sp = st.create(model, method, total_steps=10, **knobs)
    with torch.no_grad():
        getattr(model, layer).parametrizations.weight.original[3, 5] = value
    with pytest.raises(FloatingPointError, match=f"layer '{layer}' has a NaN or infinite weight at step 1"):
        sp.step()


def test_load_state_of_another_method_is_rejected(tiny_net):
    sp = st.Sparsifier(tiny_net, "feather", 0.5, total_steps=10)
    state = sp.state_dict() | {"method": "gmp"}
    with pytest.raises(ValueError, match="method 'gmp'"):
        sp.load_state_dict(state)


class GridNet(nn.Module):
    """Two Linear layers whose weights sit on a 1/16 grid: thousands of tied magnitudes."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(64, 64), nn.Linear(64, 10)
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for layer in (self.a, self.b):
                layer.weight.copy_(torch.randint(-8, 9, layer.weight.shape, generator=gen) / 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", PRESETS)
def test_exact_count_with_tied_magnitudes(method, dtype):
    model = GridNet().to(dtype)
    n = sum(layer.weight.numel() for layer in (model.a, model.b))
    sp = st.Sparsifier(model, method, 0.5, total_steps=4, schedule="constant")
    k = round(0.5 * n)
    magnitudes = torch.cat([w.detach().abs().reshape(-1) for w in sp.dense_weights()])
    assert int((magnitudes <= magnitudes.sort().values[k - 1]).sum()) > k, "test needs ties at the threshold"
    assert forward_zeros(model, sp) == k and sp.sparsity() == k / n
    opt = torch.optim.SGD(model.parameters(), lr=1 / 16)
    for x, y in [(torch.randn(4, 64).to(dtype), torch.randint(0, 10, (4,))) for _ in range(3)]:
        F.cross_entropy(model(x).float(), y).backward()
        opt.step()
        opt.zero_grad()
        sp.step()
        assert forward_zeros(model, sp) == k
    final = sp.finalize()
    assert sum(int((m.weight == 0).sum()) for m in (final.a, final.b)) == k


def test_ties_are_broken_by_index_and_pruned_ties_get_theta():
    layer = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.1, 0.2, 0.2, 0.4], [-0.2, 0.5, 0.2, 0.1]]))
    # s = 0.5: k = 4 of 8; magnitudes 0.1 x2, then 0.2 x4 tied: the first two 0.2s (flat order) go.
    st.Sparsifier(layer, "gmp", 0.5, total_steps=1, schedule="constant")
    pruned = (layer.weight == 0).flatten().tolist()
    assert pruned == [True, True, True, False, False, False, False, True]
    layer.weight.sum().backward()
    grad = layer.parametrizations.weight.original.grad
    assert grad.flatten().tolist() == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0]  # gmp: theta = 0 on pruned


class SharedNet(nn.Module):
    """The same Linear weight used by two layers (tied weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second, self.head = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 4)
        self.second.weight = self.first.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.second(torch.relu(self.first(x)))))


@pytest.mark.parametrize("method", PRESETS)
def test_a_shared_weight_is_one_weight(method):
    torch.manual_seed(0)
    model = SharedNet().double()
    sp = st.Sparsifier(model, method, 0.6, total_steps=3, end=2)
    assert sp.names == ["first", "head"] and sp.numel() == 16 * 16 + 16 * 4
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        model(torch.randn(8, 16, dtype=torch.float64)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        sp.step()
    x = torch.randn(8, 16, dtype=torch.float64)
    with torch.no_grad():
        before = model(x)
    assert sp.sparsity() == round(0.6 * sp.numel()) / sp.numel()
    final = sp.finalize()
    assert final.first.weight is final.second.weight
    with torch.no_grad():
        torch.testing.assert_close(final(x), before, rtol=0, atol=0)
    zeros = int((final.first.weight == 0).sum()) + int((final.head.weight == 0).sum())
    assert zeros == round(0.6 * sp.numel())


def test_a_shared_weight_with_an_excluded_user_is_refused():
    model = SharedNet()
    with pytest.raises(ValueError, match=r"layer 'second' \(Linear\) shares a weight with prunable layer 'first' but is "
                                         r"not pruned itself; allowed: exclude 'first' too, or leave exclude unset"):
        st.Sparsifier(model, "feather", 0.5, total_steps=2, exclude=["second"])
    assert not any(hasattr(m, "parametrizations") for m in model.modules())  # nothing attached


class TiedLM(nn.Module):
    """A language model's head tied to its token embedding (GPT-2's and OPT's lm_head)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.body, self.head = nn.Embedding(16, 8), nn.Linear(8, 8), nn.Linear(8, 16, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(self.embed(tokens))))


def test_a_layer_tied_to_an_embedding_stays_dense_by_default_and_is_refused_when_exclude_would_prune_it():
    torch.manual_seed(0)
    model = TiedLM()
    embedding = model.embed.weight.detach().clone()
    sp = st.Sparsifier(model, "feather", 0.5, total_steps=1, schedule="constant")
    assert sp.names == ["body"]
    assert sp.excluded == [("embed", "an embedding (never pruned)"),
                           ("head", "weight tied to 'embed' (Embedding), which is not pruned")]
    final = sp.finalize()
    assert final.head.weight is final.embed.weight and torch.equal(final.embed.weight, embedding)
    assert int((final.body.weight == 0).sum()) == 32
    with pytest.raises(ValueError, match=r"layer 'embed' \(Embedding\) shares a weight with prunable layer 'head' but "
                                         r"is not pruned itself; allowed: exclude 'head' too"):
        st.Sparsifier(TiedLM(), "feather", 0.5, total_steps=1, exclude=[])
    assert st.Sparsifier(TiedLM(), "feather", 0.5, total_steps=1, exclude=["head"]).names == ["body"]


def test_an_exclude_pattern_that_matches_no_module_is_refused(tiny_net):
    with pytest.raises(ValueError, match=r"exclude pattern 'head' matches no module of TinyNet; allowed: glob patterns "
                                         r"on module names, e.g. of its layers \['conv', 'depthwise', 'conv2'\]\."):
        st.Sparsifier(tiny_net, "feather", 0.5, total_steps=1, exclude=["conv", "head"])
    assert not any(hasattr(m, "parametrizations") for m in tiny_net.modules())


def test_a_model_declares_what_stays_dense():
    from sparsetrain.models import create_model

    sp = st.create(create_model("vit-micro"), "feather", total_steps=1)
    assert sp.excluded == [("patch_embed", "declared dense by ViT.default_exclude"),
                           ("fc", "declared dense by ViT.default_exclude")]
    assert not {"patch_embed", "fc"} & set(sp.names)


# -- transformers' Conv1D: weight stored (in, out) --------------------------------------------


@pytest.mark.parametrize("method", PRESETS + nm_presets())
def test_a_conv1d_layer_is_pruned_as_the_linear_layer_of_its_transposed_weight(method):
    """Groups along the input dimension (rows of a Conv1D weight) and ST-3's rescale per output
    channel (its columns): the Conv1D's forward and final weights are the Linear layer's, transposed."""
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    torch.manual_seed(0)
    linear = nn.Sequential(nn.Linear(16, 8)).double()
    conv1d = nn.Sequential(pytorch_utils.Conv1D(8, 16)).double()
    with torch.no_grad():
        conv1d[0].weight.copy_(linear[0].weight.t())
        conv1d[0].bias.copy_(linear[0].bias)
    options = {} if method in nm_presets() else {"sparsity": 0.6}
    methods = [st.create(model, method, total_steps=4, **options) for model in (linear, conv1d)]
    x = torch.randn(3, 16, dtype=torch.float64)
    for _ in range(4):  # the same updates, as training would make them
        torch.testing.assert_close(conv1d[0].weight, linear[0].weight.t())
        torch.testing.assert_close(conv1d(x), linear(x))
        assert methods[1].sparsity() == methods[0].sparsity()
        update = 0.01 * torch.randn(8, 16, dtype=torch.float64)
        with torch.no_grad():
            linear[0].parametrizations.weight.original.add_(update)
            conv1d[0].parametrizations.weight.original.add_(update.t())
        for sp in methods:
            sp.step()
    finals = [sp.finalize()[0].weight for sp in methods]
    torch.testing.assert_close(finals[1], finals[0].t())
    assert methods[1].sparsity() == methods[0].sparsity() == (0.5 if method in nm_presets() else round(0.6 * 128) / 128)


def test_stores_transposed_recognises_transformers_conv1d_by_name_and_package():
    from sparsetrain.prunable import stores_transposed

    ours = type("Conv1D", (nn.Linear,), {"__module__": "my_models"})(4, 4)
    theirs = type("Conv1D", (nn.Module,), {"__module__": "transformers.pytorch_utils"})()
    assert stores_transposed(theirs) and not stores_transposed(ours) and not stores_transposed(nn.Linear(4, 4))


@pytest.mark.parametrize("method", ["st3", "st3-sigma"])
def test_st3_presets_follow_the_published_170_epoch_schedule(method):
    sp = st.Sparsifier(nn.Linear(8, 8), method, 0.9, total_steps=170)  # one step per epoch
    assert (sp.schedule.start, sp.schedule.end, sp.fix_step) == (5, 80, 160)


@pytest.mark.parametrize("method", ["st3", "st3-sigma"])
def test_fixed_mask_phase(tiny_net, make_batches, method):
    """From fix_at on: the weights hold a * P_1(w; T) of that moment, the mask never changes,
    pruned weights get no gradient, no shift and no rescale."""
    sp = st.Sparsifier(tiny_net, method, 0.8, total_steps=8, start=0, end=3, fix_at=5)
    opt = torch.optim.SGD(tiny_net.parameters(), lr=0.05, momentum=0.9)
    batches = make_batches(8)
    for t, (x, y) in enumerate(batches, start=1):
        F.cross_entropy(tiny_net(x), y).backward()
        if sp.fixed:
            for w, param in zip(sp.dense_weights(), sp._params):
                assert bool((w.grad[~param.mask] == 0).all()) and bool((w.grad[param.mask] != 0).any())
        opt.step()
        opt.zero_grad()
        if t == 5:
            before = [w.detach().clone() for w in sp.dense_weights()]
        sp.step()
        if t == 5:  # re-thresholded at s_f from the weights of that moment, then written: w = a * P_1(w; T)
            assert sp.fixed and sp.target == 0.8
            masks = [param.mask.clone() for param in sp._params]
            for w, w0, param in zip(sp.dense_weights(), before, sp._params):
                value = param.rescale * threshold_operator(w0 * param.norm, param.threshold, 1.0) / param.norm
                torch.testing.assert_close(w.detach(), value, rtol=1e-6, atol=0)
                assert torch.equal(param.mask, value != 0)
        if t >= 5:
            assert all(torch.equal(param.mask, mask) for param, mask in zip(sp._params, masks))
            for module, w, param in zip(sp._modules, sp.dense_weights(), sp._params):
                assert torch.equal(module.weight, w * param.mask)  # no shift, no rescale
            assert sp.sparsity() == round(0.8 * sp.numel()) / sp.numel()
    thresholds = sp.thresholds
    sp.step()
    assert sp.thresholds == thresholds  # frozen


def test_resume_across_the_fix_is_bit_identical(tiny_net, make_batches, train):
    batches = make_batches(8)

    def build(seed):
        torch.manual_seed(seed)
        model = type(tiny_net)()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        return model, opt, st.Sparsifier(model, "st3", 0.8, total_steps=8, start=0, end=3, fix_at=5)

    assert_resume_is_bit_identical(build, batches, (4, 6), train)  # just before the fix, and after it


def assert_resume_is_bit_identical(build, batches, cuts, train):
    """Train on ``batches`` in one go, and again stopped at each of ``cuts``: model, optimizer and
    method saved with torch.save, loaded into a set-up built from another seed (``build(seed)``:
    model, optimizer, method) and trained on; the finalized weights must be equal bit for bit."""
    model, opt, sp = build(0)
    train(model, sp, opt, batches)
    expected = sp.finalize().state_dict()
    for cut in cuts:
        model, opt, sp = build(0)
        train(model, sp, opt, batches[:cut])
        buffer = io.BytesIO()
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "method": sp.state_dict()}, buffer)
        buffer.seek(0)
        state = torch.load(buffer, weights_only=True)
        model, opt, sp = build(3)
        sp.load_state_dict(state["method"])
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        train(model, sp, opt, batches[cut:])
        got = sp.finalize().state_dict()
        assert all(torch.equal(got[k], expected[k]) for k in expected), cut


@pytest.mark.parametrize("other, field", [({"sparsity": 0.5}, "sparsity"), ({"total_steps": 20}, "total_steps"),
                                          ({"scope": "layer"}, "scope")])
def test_a_state_that_does_not_fit_is_refused_naming_the_field(other, field):
    from sparsetrain.models import create_model

    settings = {"sparsity": 0.9, "total_steps": 10}
    saved = st.create(create_model("resnet20", width=0.25), "feather", **settings)
    saved.step()
    state = saved.state_dict()
    options = {**settings, **other}
    target = st.create(create_model("resnet20", width=0.25), "feather", **options)
    with pytest.raises(ValueError, match=f"the saved state has {field}=.* but this feather has {field}="):
        target.load_state_dict(state)
    fresh = st.create(create_model("resnet20", width=0.25), "feather", **settings)
    with pytest.raises(ValueError, match="this state has keys"):
        fresh.load_state_dict({k: v for k, v in state.items() if k != "thresholds"})
    with pytest.raises(ValueError, match="NaN or infinite threshold"):
        fresh.load_state_dict({**state, "thresholds": [float("nan")] * len(state["thresholds"])})
    fresh.load_state_dict(state)  # the state itself still fits
    assert fresh.state_dict()["step"] == 1


def test_a_state_saved_before_settings_were_recorded_still_resumes():
    from sparsetrain.models import create_model

    saved = st.create(create_model("resnet20", width=0.25), "gmp", sparsity=0.9, total_steps=10)
    saved.step()
    older = {k: v for k, v in saved.state_dict().items() if k != "settings"}  # a checkpoint of the previous format
    resumed = st.create(create_model("resnet20", width=0.25), "gmp", sparsity=0.9, total_steps=10)
    resumed.load_state_dict(older)
    assert resumed.state_dict()["step"] == 1 and resumed.state_dict()["thresholds"] == saved.state_dict()["thresholds"]


@pytest.mark.parametrize("method", ["feather", "st3", "sr-ste"])
def test_weights_prepared_before_the_forward_give_what_each_layer_computes_itself(tiny_net, method):
    import copy

    options = {} if method == "sr-ste" else {"sparsity": 0.8}
    sp = st.create(tiny_net, method, total_steps=4, **options)
    sp.step(), sp.step()
    twin = copy.deepcopy(tiny_net)
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    prepared, lazy = tiny_net(x), twin.forward(x)  # calling forward() skips the model's hooks: each layer computes
    assert torch.equal(prepared, lazy)
    prepared.square().sum().backward(), lazy.square().sum().backward()
    for a, b in zip(tiny_net.parameters(), twin.parameters()):
        assert torch.equal(a.grad, b.grad)


def test_prepared_weights_are_used_only_within_their_forward_and_for_unchanged_weights(tiny_net):
    sp = st.Sparsifier(tiny_net, "feather", 0.8, total_steps=4)
    sp.step(), sp.step()  # s = 0.8: the forward weights differ from the weights
    layer, param, w = sp._modules[0], sp._params[0], sp.dense_weights()[0]
    seen = []
    layer.register_forward_pre_hook(lambda module, args: seen.append(param._prepared is not None))
    tiny_net(torch.randn(2, 3, 8, 8))
    assert seen == [True] and param._prepared is None  # ready inside the forward, dropped after it
    with pytest.raises(RuntimeError):
        tiny_net(torch.randn(2, 5, 8, 8))  # a forward that raises drops them too
    assert param._prepared is None
    param.prepare(w)
    prepared = param._prepared[1]
    assert layer.weight is prepared
    with torch.no_grad():
        w.mul_(2.0)  # changed in place after preparing: the forward weight is computed again
    again = layer.weight
    assert again is not prepared and not torch.equal(again, prepared)
    param.release()
    assert torch.equal(layer.weight, again)


@pytest.mark.parametrize("method", ["feather", "st3-sigma", "sr-ste", "feather-nm"])
def test_the_forward_weight_from_the_magnitudes_kept_by_step_equals_a_fresh_one(tiny_net, method):
    import copy

    options = {"sparsity": 0.8} if method in ("feather", "st3-sigma") else {}
    sp = st.create(tiny_net, method, total_steps=4, **options)
    sp.step(), sp.step()
    param, w = sp._params[1], sp.dense_weights()[1]
    assert param._scratch_version == w._version  # step() left |w * n| of this version of w
    spent = param(w)
    assert param._scratch_version is None  # the forward used it as scratch space
    assert torch.equal(spent, param(w))  # computed from w alone
    sp.refresh()
    with torch.no_grad():
        w.mul_(1.5)  # changed in place after the magnitudes were taken: they must not be used
    unaware = copy.deepcopy(param)
    unaware._scratch_version = None
    assert torch.equal(param(w), unaware(w))


# -- update_every: thresholds recomputed every k optimizer steps ------------------------------------


@pytest.mark.parametrize("method, options", [("feather", {"sparsity": 0.9}),
                                             ("st3-sigma", {"sparsity": 0.9, "fix_at": None}), ("sr-ste", {})])
def test_update_every_4_moves_thresholds_only_at_multiples_of_4(tiny_net, make_batches, method, options):
    from sparsetrain.selection import select

    tiny_net.double()  # distinct magnitudes: no tie masks, the threshold alone sets each count
    sp = st.Sparsifier(tiny_net, method, total_steps=12, update_every=4, **options)
    opt = torch.optim.SGD(tiny_net.parameters(), lr=0.05, momentum=0.9)
    before = [_copy_thresholds(sp)]
    for t, (x, y) in enumerate(make_batches(11), start=1):
        F.cross_entropy(tiny_net(x.double()), y).backward()
        sp.before_optimizer_step()
        opt.step()
        opt.zero_grad()
        sp.step()
        now = _copy_thresholds(sp)
        changed = any(not torch.equal(torch.as_tensor(a), torch.as_tensor(b)) for a, b in zip(now, before[-1]))
        assert changed == (t % 4 == 0 and sp.target > 0), t
        assert sp.target == sp.schedule.sparsity_at(t - t % 4)
        if t % 4 == 0 and sp.config.scope != "nm":  # recomputed from the weights of step t, for s(t)
            magnitudes = [p.normalised(w).abs() for p, w in zip(sp._params, sp.dense_weights())]
            assert now == select(magnitudes, sp.target, sp.config.scope).thresholds
        before.append(now)
    n, final = sp.numel(), sp.schedule.sparsity_at(11)  # 11 is no multiple of 4: finalize recomputes for s(11)
    model = sp.finalize()
    if sp.config.scope == "nm":
        from sparsetrain.nm import pattern_holds

        grouped = [m.weight for _, m in st.find_prunable(model) if m.weight.shape[1] % 4 == 0]
        assert grouped and all(pattern_holds(w, 2, 4) and int((w == 0).sum()) == w.numel() // 2 for w in grouped)
    else:
        assert sum(int((m.weight == 0).sum()) for _, m in st.find_prunable(model)) == round(final * n)


@pytest.mark.parametrize("method", ["sr-ste", "feather-nm", "st3-nm"])
def test_nm_groups_held_between_updates_gain_no_non_zero(tiny_net, make_batches, method):
    """N:M with update_every=4: at an update every group has exactly N non-zeros; until the next one the
    forward prunes by the thresholds and the entries pruned then, so no group gains a non-zero as its
    magnitudes move (the forward is w * (|w| > T_u) * (1 - pruned_u), scaled for ST-3, with T_u and
    pruned_u what :func:`select_groups` gives on the weights at the update u). Holding the thresholds
    alone, half the groups had 3 non-zeros a step after an update."""
    from sparsetrain.methods.unstructured.weight import weight_of
    from sparsetrain.nm import select_groups, to_groups
    from sparsetrain.operators import kept_mask

    sp = st.create(tiny_net, method, total_steps=12, update_every=4, **({} if method == "sr-ste" else {"start": 0, "end": 1}))
    opt = torch.optim.SGD(tiny_net.parameters(), lr=0.2, momentum=0.9)
    sp.bind(opt)
    layers = [tiny_net.conv2, tiny_net.fc]  # the layers with groups of 4 along their input
    for t, (x, y) in enumerate(make_batches(11)):
        if t % 4 == 0:  # the update that set the thresholds now in use
            dense = [weight_of(layer).detach().abs() for layer in layers]
            chosen = select_groups(dense, round(sp.target * 4), 4)
            pruned = [~kept_mask(m, T, ties) for m, T, ties in zip(dense, chosen.thresholds, chosen.ties)]
            k = round(sp.target * 4)
        for layer, T, gone in zip(layers, chosen.thresholds, pruned):
            w, forward = weight_of(layer).detach(), layer.weight.detach()
            nonzero = (to_groups(forward, 4) != 0).sum(-1)
            assert bool((nonzero <= 4 - k).all()) and (t % 4 or bool((nonzero == 4 - k).all())), (t, method)
            assert torch.equal(forward != 0, (w.abs() > T) & ~gone), (t, method)
        F.cross_entropy(tiny_net(x), y).backward()
        sp.before_optimizer_step()
        opt.step()
        opt.zero_grad()
        sp.step()


@pytest.mark.parametrize("method, options", [("sr-ste", {"update_every": 4}), ("st3", {"sparsity": 0.8, "fix_at": 2}),
                                             ("st3", {"sparsity": 0.8, "fix_at": None})])
def test_what_the_selection_derives_is_no_buffer_and_follows_the_model_to_another_dtype(tiny_net, make_batches, train, method, options):
    """The held N:M pattern, ST-3's fixed mask and its rescale are as large as a weight or one per output channel,
    and every rank computes them alike: they are no buffers (DDP broadcasts every buffer from rank 0 at each
    forward), so the model's only buffers are its own and two numbers a weight. ``.double()`` after the steps
    carries them and the thresholds with the weights: the forward weights are those of the float32 model."""
    sp = st.create(tiny_net, method, total_steps=12, **options)
    opt = torch.optim.SGD(tiny_net.parameters(), lr=0.1)
    sp.bind(opt)
    train(tiny_net, sp, opt, make_batches(3))
    params = sp._params
    assert any(p.ties is not None or p.mask is not None or p.rescale is not None for p in params)
    derived = [name for name, b in tiny_net.named_buffers() if ".parametrizations." in name and b.dim() > 0]
    assert derived == []
    forward = [layer.weight.detach().clone() for _, layer in st.find_prunable(tiny_net)]
    tiny_net.double()
    for p in params:
        for value in (p.threshold, p.rescale):
            assert not isinstance(value, torch.Tensor) or value.dtype == torch.float64
        assert all(t is None or t.dtype == torch.bool for t in (p.ties, p.mask))
    again = [layer.weight.detach() for _, layer in st.find_prunable(tiny_net)]
    assert all(b.dtype == torch.float64 and torch.equal(b == 0, a == 0) for a, b in zip(forward, again))
    assert all(torch.allclose(b, a.double(), rtol=1e-6, atol=0) for a, b in zip(forward, again))


def test_nm_held_between_updates_resumes_bit_identically_from_inside_an_interval(tiny_net, make_batches, train):
    def build(seed):
        torch.manual_seed(seed)
        model = type(tiny_net)()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        return model, opt, st.create(model, "sr-ste", total_steps=10, update_every=4)

    assert_resume_is_bit_identical(build, make_batches(10), (4, 6), train)


def _copy_thresholds(sp):
    return [t.clone() if isinstance(t, torch.Tensor) else t for t in sp.thresholds.values()]


def test_update_every_resumes_bit_identically_from_inside_an_interval(tiny_net, make_batches, train):
    batches = make_batches(10)

    def build(seed):
        torch.manual_seed(seed)
        model = type(tiny_net)()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        return model, opt, st.create(model, "feather", sparsity=0.8, total_steps=10, update_every=4)

    assert_resume_is_bit_identical(build, batches, (4, 6), train)  # at an update, and two steps after one


def test_update_every_is_a_setting_of_the_saved_state_and_checked(tiny_net):
    saved = st.create(tiny_net, "feather", sparsity=0.8, total_steps=10, update_every=4).state_dict()
    assert saved["settings"]["update_every"] == 4
    other = st.create(fresh_copy(type(tiny_net), 0), "feather", sparsity=0.8, total_steps=10)
    assert "update_every" not in other.state_dict()["settings"]  # the default: states from before the option load
    with pytest.raises(ValueError, match="update_every=None but this feather has update_every=4"):
        st.create(fresh_copy(type(tiny_net), 0), "feather", sparsity=0.8, total_steps=10,
                  update_every=4).load_state_dict(other.state_dict())


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "4"])
def test_update_every_must_be_a_positive_int(tiny_net, bad):
    with pytest.raises(ValueError, match=rf"update_every={bad!r} is not allowed; allowed: an int >= 1"):
        st.create(tiny_net, "feather", sparsity=0.8, total_steps=10, update_every=bad)


@pytest.mark.parametrize("method", ["sr-ste", "feather-nm", "st3-nm"])
def test_nm_ties_fold_into_thresholds_and_a_state_with_tie_masks_loads_before_the_weights(method):
    # groups tie across their 2nd and 3rd smallest magnitude, at two values: the selection gives each pruned
    # tie its own |w| as T (no mask); a state saved with the group's T and a tie mask (as states were before)
    # still prunes those positions when it is loaded before the weights, in the documented order
    from sparsetrain.nm import pattern_holds, select_groups

    weight = torch.tensor([[0.1, 0.5, 0.5, 0.9, 0.2, 0.3, 0.3, 0.8], [0.7, 0.2, 0.6, 0.1, 0.4, 0.4, 0.9, 0.4]])
    options = {"start": 0} if method == "feather-nm" else {}

    def attached(values):
        layer = nn.Linear(8, 2, bias=False)
        with torch.no_grad():
            layer.weight.copy_(values)
        method_object = st.create(layer, method, total_steps=4, **options)
        method_object.bind(torch.optim.SGD(layer.parameters(), lr=0.0))
        return layer, method_object

    layer, method_object = attached(weight)
    method_object.step()
    state = method_object.state_dict()
    chosen = select_groups([weight], 2, 4)
    assert state["ties"] == [None] and chosen.ties[0] is not None
    assert torch.equal(state["thresholds"][0], torch.where(chosen.ties[0], weight, chosen.thresholds[0]))
    assert pattern_holds(layer.weight, 2, 4)  # the forward weight

    state["thresholds"], state["ties"] = [chosen.thresholds[0].clone()], [chosen.ties[0].clone()]  # the mask form
    fresh, loaded = attached(torch.zeros(2, 8).uniform_(0.0, 0.05))  # other weights until the model's state loads
    loaded.load_state_dict(state)
    with torch.no_grad():
        fresh.parametrizations["weight"].original.copy_(weight)
    assert torch.equal(fresh.weight != 0, layer.weight != 0)
    torch._dynamo.reset()
    compiled = torch.compile(fresh, backend="eager")(torch.eye(8)).detach().T  # the traced forward reads the mask
    assert torch.equal(compiled != 0, layer.weight != 0)
    assert pattern_holds(loaded.finalize().weight, 2, 4)
