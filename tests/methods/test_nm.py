"""N:M sparsity: groups along the input dimension, a threshold per group, exactly M - N weights
pruned per group (ties by position), the operators of Feather / ST-3 / SR-STE inside each group,
SR-STE's decay, the packed export and the conversion to PyTorch's semi-structured tensors."""

import math

import pytest
import torch
from torch import nn

import sparsetrain as st
from sparsetrain.nm import from_groups, pack, parse_nm, pattern_holds, select_groups, to_groups, to_semi_structured, unpack
from sparsetrain.run.export import _layout_sizes, load_sparse, save_sparse


def one(magnitude, k, m):
    """select_groups on one layer: its (threshold, ties)."""
    selection = select_groups([magnitude], k, m)
    return selection.thresholds[0], selection.ties[0]


ROWS = [[0.1, -0.5, 0.3, 0.2, 0.4, 0.4, -0.4, 0.1],
        [1.0, -1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 2.0]]


def p3(w: float, t: float) -> float:
    """Feather's operator on one weight, written out: sign(w) (|w|^3 - T^3)^(1/3)."""
    return math.copysign((abs(w) ** 3 - t**3) ** (1 / 3), w)


def hand_forward(p: float) -> list[list[float]]:
    """ROWS under 2:4 with the operator P_p, group by group (k = 2 pruned in each):
    [0.1, -0.5, 0.3, 0.2]: T = 0.2, kept -0.5 and 0.3;
    [0.4, 0.4, -0.4, 0.1]: three tie at v = 0.4, so T = 0.1 (the largest below v), the first 0.4
        is pruned as a tie, the other two are kept and shrunk by 0.1;
    [1, -1, 1, 1]: all tie, T = 0 (none below), the first two pruned, the others unchanged;
    [0, 0, 0, 2]: v = 0 with three zeros: T = 0, no ties, the group keeps its three zeros."""
    op = {3.0: p3, 1.0: lambda w, t: math.copysign(abs(w) - t, w), math.inf: lambda w, t: w}[p]
    return [[0.0, op(-0.5, 0.2), op(0.3, 0.2), 0.0, 0.0, op(0.4, 0.1), op(-0.4, 0.1), 0.0],
            [0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 2.0]]


def test_group_thresholds_and_ties_by_hand():
    w = torch.tensor(ROWS)
    threshold, ties = one(w.abs(), 2, 4)
    assert torch.equal(threshold, torch.tensor([[0.2] * 4 + [0.1] * 4, [0.0] * 8]))
    assert ties.tolist() == [[False] * 4 + [True, False, False, False], [True, True] + [False] * 6]
    assert one(w.abs(), 0, 4) == (0.0, None)  # k = 0: nothing pruned
    assert one(torch.ones(3, 6), 2, 4) == (0.0, None)  # 6 inputs: no groups of 4


def test_convolution_groups_run_along_input_channels_at_each_kernel_position():
    w = torch.zeros(1, 8, 1, 2)
    w[0, :, 0, 0] = torch.arange(1.0, 9.0)  # groups [1 2 3 4] [5 6 7 8]
    w[0, :, 0, 1] = torch.arange(8.0, 0.0, -1.0)  # groups [8 7 6 5] [4 3 2 1]
    threshold, ties = one(w, 2, 4)
    assert ties is None  # distinct magnitudes in every group
    assert w[0, :, 0, 0][(w > threshold)[0, :, 0, 0]].tolist() == [3.0, 4.0, 7.0, 8.0]
    assert w[0, :, 0, 1][(w > threshold)[0, :, 0, 1]].tolist() == [8.0, 7.0, 4.0, 3.0]
    assert torch.equal(from_groups(to_groups(w, 4), w.shape), w)
    assert to_groups(w, 4).shape == (1, 1, 2, 2, 4)  # (out, kh, kw, in / m, m)


@pytest.mark.parametrize("method, knobs, p", [
    ("feather-nm", {}, 3.0),
    ("st3-nm", {"rescale": False, "start": 0, "end": 0}, 1.0),
    ("sr-ste", {}, math.inf),
])
def test_forward_weights_are_the_operator_with_each_group_threshold(method, knobs, p):
    layer = nn.Linear(8, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(ROWS))
    model = nn.Sequential(layer)
    sparsifier = st.create(model, method, total_steps=10, schedule="constant", **knobs)
    assert sparsifier.target == 0.5
    torch.testing.assert_close(layer.weight, torch.tensor(hand_forward(p)), rtol=1e-6, atol=1e-7)


def test_a_schedule_walks_each_group_from_m_of_m_to_n_of_m():
    torch.manual_seed(0)
    layer = nn.Linear(16, 8, bias=False)
    sparsifier = st.create(nn.Sequential(layer), "feather-nm", total_steps=20, nm="1:4")  # cubic, steps 0 -> 10
    seen = []
    for _ in range(12):
        zeros = (to_groups(layer.weight.detach(), 4) == 0).sum(-1)
        assert (zeros == round(sparsifier.target * 4)).all()
        seen.append(int(zeros[0, 0]))
        sparsifier.step()
    assert seen[0] == 0 and seen[-1] == 3 and sorted(seen) == seen and len(set(seen)) == 4


def small_net(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),  # 3 input channels: no groups, stays dense
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, 10),
    ).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("nm", ["2:4", "1:4", "4:8"])
@pytest.mark.parametrize("method", ["feather-nm", "st3-nm", "sr-ste"])
def test_every_group_holds_at_most_n_and_exactly_n_when_magnitudes_differ(method, nm, dtype):
    n, m = parse_nm(nm)
    model = small_net(dtype)
    steps = 6
    sparsifier = st.create(model, method, total_steps=steps, nm=nm)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    sparsifier.bind(optimizer)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(8, 3, 8, 8, generator=gen).to(dtype), torch.randint(0, 10, (8,), generator=gen)
        nn.functional.cross_entropy(model(x).float(), y).backward()
        sparsifier.before_optimizer_step()
        optimizer.step()
        optimizer.zero_grad()
        if not sparsifier.fixed:  # the weights the next selection reads
            dense = {name: w.detach().clone() for name, w in zip(sparsifier.names, sparsifier.dense_weights())}
        sparsifier.step()
    assert sparsifier.dense_layers == ["0"]
    sparsifier.finalize()
    for name in ("2", "6"):
        weight = model.get_submodule(name).weight.detach()
        assert weight.dtype == dtype
        nonzeros = (to_groups(weight, m) != 0).sum(-1)
        magnitudes = to_groups(dense[name].abs().float(), m).sort(-1).values
        distinct = (magnitudes.diff(dim=-1) > 0).all(-1) & (magnitudes[..., 0] > 0)
        assert (nonzeros <= n).all() and pattern_holds(weight, n, m)
        assert distinct.float().mean() > 0.5  # the exact check below covers most groups
        assert (nonzeros[distinct] == n).all()
    assert not pattern_holds(model.get_submodule("0").weight, n, m)


def test_sr_ste_gradient_is_the_straight_through_gradient_plus_the_decay_of_pruned_weights():
    layer = nn.Linear(8, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(ROWS[:1] * 2) * torch.tensor([[1.0], [-2.0]]))
    sparsifier = st.create(nn.Sequential(layer), "sr-ste", total_steps=4)
    x, c = torch.randn(5, 8), torch.randn(5, 2)
    (layer(x) * c).sum().backward()
    w = layer.parametrizations.weight.original
    kept = torch.tensor([[0, 1, 1, 0, 0, 1, 1, 0]] * 2, dtype=torch.bool)  # hand_forward's kept entries
    assert torch.equal(layer.weight.detach() != 0, kept)
    expected = c.T @ x + 2e-4 * (~kept) * w.detach()  # dL/dW~ = c^T x, passed straight through
    torch.testing.assert_close(w.grad, expected)
    assert sparsifier.config.decay == 2e-4


def test_st3_nm_fixes_a_mask_that_keeps_the_pattern():
    torch.manual_seed(0)
    layer = nn.Linear(16, 4, bias=False)
    sparsifier = st.create(nn.Sequential(layer), "st3-nm", total_steps=170, nm="2:4")
    for _ in range(160):
        sparsifier.step()
    assert sparsifier.fixed and pattern_holds(layer.weight, 2, 4)
    mask = layer.parametrizations.weight[0].mask.clone()
    with torch.no_grad():
        layer.parametrizations.weight.original.mul_(-3.0)
    sparsifier.step()
    assert torch.equal(layer.parametrizations.weight[0].mask, mask) and torch.equal(layer.weight != 0, mask)


def test_wrong_patterns_and_options_are_one_clear_sentence():
    model = nn.Sequential(nn.Linear(8, 4))
    for bad in ("3:2", "2-4", "0:4", "2:1024", 4):
        with pytest.raises(ValueError, match=r"is not an N:M pattern; allowed: 'N:M'"):
            st.create(model, "sr-ste", total_steps=4, nm=bad)
    with pytest.raises(ValueError, match="scope='nm' is not allowed here.*feather-nm, st3-nm, sr-ste"):
        st.create(model, "feather", total_steps=4, scope="nm")
    with pytest.raises(ValueError, match="unknown option 'sparsity'"):
        st.create(model, "sr-ste", total_steps=4, sparsity=0.5)
    with pytest.raises(ValueError, match=r"sparsity=0.9 does not match the 2:4 pattern; allowed: 0.5"):
        st.Sparsifier(model, "sr-ste", 0.9, 4)
    with pytest.raises(ValueError, match="apply to scope 'nm' only"):
        st.Sparsifier(model, "feather", 0.9, 4, n=2, m=4)
    with pytest.raises(ValueError, match=r"decay=-1.0 is not allowed"):
        st.create(model, "sr-ste", total_steps=4, decay=-1.0)


@pytest.mark.parametrize("nm", ["2:4", "1:4", "4:8"])
def test_packed_export_loads_back_to_the_same_tensors(tmp_path, nm):
    n, m = parse_nm(nm)
    torch.manual_seed(0)
    weight = torch.randn(64, 32, 3, 3)
    threshold, ties = one(weight.abs(), m - n, m)
    weight = weight * (weight.abs() > threshold)
    weight[0, :m, 0, 0] = 0.0  # a group with fewer than n non-zeros
    state = {"conv.weight": weight, "fc.weight": torch.randn(10, 6), "bn.bias": torch.zeros(5)}
    path = save_sparse(tmp_path / "w.safetensors", state, nm=(n, m))
    loaded = load_sparse(path)
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    values, positions = pack(weight, n, m)
    assert torch.equal(unpack(values, positions, weight.shape, n, m), weight)
    sizes = _layout_sizes(weight, (n, m))
    # N fp32 values and N positions of ceil(log2 M) bits per group of M
    assert sizes["nm"] == weight.numel() // m * n * 4 + math.ceil(weight.numel() // m * n * math.ceil(math.log2(m)) / 8)
    if nm == "2:4":
        assert sizes["nm"] / sizes["dense"] <= 0.57


def test_packed_export_of_a_gpt2_conv1d_weight_groups_its_inputs(tmp_path):
    """GPT-2's Conv1D stores (in, out): sr-ste prunes 2 of every 4 consecutive inputs (rows), and the
    export packs the weight in its (out, in) view and loads it back in its own layout."""
    import json

    from safetensors import safe_open

    transformers = pytest.importorskip("transformers")
    from sparsetrain.prunable import transposed_weights

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32,
                                                                 n_positions=8, bos_token_id=0, eos_token_id=0))
    model = st.create(model, "sr-ste", total_steps=1).finalize()
    weight = model.transformer.h[0].attn.c_attn.weight.detach()  # (16 inputs, 48 outputs)
    assert int((weight.reshape(4, 4, 48) != 0).sum(1).max()) == 2  # groups of 4 rows: 2 kept in each
    state = {k: v for k, v in model.state_dict().items() if ".h.0." in k}
    transposed = transposed_weights(model)
    assert "transformer.h.0.attn.c_attn.weight" in transposed and "lm_head.weight" not in transposed
    path = save_sparse(tmp_path / "w.safetensors", state, nm=(2, 4), transposed=transposed)
    loaded = load_sparse(path)
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    with safe_open(str(path), framework="pt") as f:
        layouts = json.loads(f.metadata()["sparsetrain.sparse"])
    assert layouts["transformer.h.0.attn.c_attn.weight"] == {"layout": "nm", "shape": [16, 48], "dtype": "float32",
                                                             "nm": [2, 4], "transposed": True}
    assert "nm" not in _layout_sizes(weight, (2, 4))  # read as (out, in), the pattern does not hold
    assert _layout_sizes(weight, (2, 4), transposed=True)["nm"] == 16 * 48 // 2 * 4 + 16 * 48 // 2 * 2 // 8


def test_packing_a_weight_without_the_pattern_is_refused():
    with pytest.raises(ValueError, match="does not hold the 2:4 pattern"):
        pack(torch.ones(2, 8), 2, 4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given where CUDA is missing")
def test_semi_structured_conversion_names_what_is_missing_without_cuda():
    with pytest.raises(RuntimeError, match=r"needs a CUDA GPU \(torch.cuda.is_available\(\) is False\)"):
        to_semi_structured(nn.Sequential(nn.Linear(64, 64)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: semi-structured sparse tensors run on GPUs only")
def test_semi_structured_conversion_computes_what_the_dense_layer_computes():
    from torch.sparse import SparseSemiStructuredTensor

    torch.manual_seed(0)
    model = st.create(nn.Sequential(nn.Linear(128, 128, bias=False)), "sr-ste", total_steps=1, nm="2:4").finalize()
    model = model.half().cuda()
    assert pattern_holds(model[0].weight, 2, 4)
    x = torch.randn(64, 128, dtype=torch.half, device="cuda")
    expected = model(x)
    to_semi_structured(model)
    assert isinstance(model[0].weight, SparseSemiStructuredTensor)
    torch.testing.assert_close(model(x), expected, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("m", range(2, 17))
def test_the_sorting_network_sorts_every_input_of_zeros_and_ones(m):
    # the 0-1 principle: a comparator network that sorts all 2^m inputs of 0s and 1s sorts any input
    every = ((torch.arange(2**m)[None, :] >> torch.arange(m)[:, None]) & 1).float()
    assert torch.equal(sorted_rows(every), every.sort(dim=0).values)


def sorted_rows(columns):
    """sort_rows_ on a copy of ``columns`` and a spare row (its rows reused in place), stacked."""
    from sparsetrain.nm import sort_rows_

    buffer = torch.cat([columns, torch.full_like(columns[:1], float("nan"))])
    return torch.stack(sort_rows_(buffer[:-1], buffer[-1]))


@pytest.mark.parametrize("m", [4, 8, 32])
def test_sort_rows_sorts_each_column_in_place(m):
    columns = torch.randint(0, 6, (m, 300), generator=torch.Generator().manual_seed(m)).float()
    assert torch.equal(sorted_rows(columns), columns.sort(dim=0).values)


def test_a_selector_reuses_its_buffer_and_selects_as_a_fresh_one():
    from sparsetrain.nm import GroupSelector

    gen = torch.Generator().manual_seed(0)
    selector = GroupSelector(4)
    for step in range(3):  # new magnitudes, one with a tie inside a group, through the same buffer
        magnitudes = [torch.rand(8, 16, generator=gen), torch.rand(4, 8, 3, 3, generator=gen)]
        magnitudes[0][2, 4:8] = torch.tensor([0.1, 0.5, 0.5, 0.9])  # a tie across the 2nd position
        kept = selector.select(magnitudes, 2)
        buffer = selector._buffer
        fresh = select_groups(magnitudes, 2, 4)
        for mine, theirs in zip(kept.thresholds + kept.ties, fresh.thresholds + fresh.ties):
            assert (mine is None and theirs is None) or torch.equal(mine, theirs), step
        assert kept.ties[0] is not None and int(kept.ties[0].sum()) == 1
        if step == 0:
            thresholds = kept.thresholds
    assert selector._buffer is buffer
    assert all(mine is first for mine, first in zip(kept.thresholds, thresholds))  # rewritten in place


def test_the_thresholds_read_from_an_nm_engine_stay_as_they_were_read():
    torch.manual_seed(0)
    layer = nn.Linear(16, 8, bias=False)
    sparsifier = st.create(nn.Sequential(layer), "sr-ste", total_steps=10)
    read = sparsifier.thresholds["0"]
    before = read.clone()
    with torch.no_grad():
        layer.parametrizations.weight.original.mul_(-3.0).add_(0.1)
    sparsifier.step()
    assert torch.equal(read, before)
    assert not torch.equal(sparsifier.thresholds["0"], before)


@pytest.mark.parametrize("m", [4, 8, 16, 32])
def test_the_k_smallest_of_each_group_by_rank_or_by_sort_agree_on_ties(m):
    from sparsetrain.nm import smallest_in_groups

    gen = torch.Generator().manual_seed(m)
    groups = torch.randint(0, 4, (500, m), generator=gen).float()  # many ties
    for k in range(m + 1):
        order = torch.sort(groups, dim=-1, stable=True).indices  # position breaks ties
        expected = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, order[:, :k], True)
        assert torch.equal(smallest_in_groups(groups.T.contiguous(), k).T, expected), k


def test_layers_selected_together_get_what_each_gets_alone():
    gen = torch.Generator().manual_seed(0)
    layers = [torch.randint(0, 5, (6, 8, 3, 3), generator=gen).float(), torch.randint(0, 5, (4, 6), generator=gen).float(),
              torch.rand(10, 16, generator=gen), torch.randint(0, 3, (2, 4), generator=gen).float()]
    together = select_groups(layers, 2, 4)
    for layer, threshold, ties in zip(layers, together.thresholds, together.ties):
        alone_threshold, alone_ties = one(layer, 2, 4)
        assert type(threshold) is type(alone_threshold) and torch.equal(torch.as_tensor(threshold), torch.as_tensor(alone_threshold))
        assert (ties is None and alone_ties is None) or torch.equal(ties, alone_ties)
    assert together.thresholds[1] == 0.0 and together.ties[0] is not None  # 6 inputs: dense; ties in small integers


@pytest.mark.parametrize("value", [math.nan, math.inf])
@pytest.mark.parametrize("m", [4, 8, 32])
def test_a_nan_or_infinity_at_any_place_in_a_group_is_refused(m, value):
    """The sort carries a NaN into its group's largest value whichever comparator it meets first."""
    from sparsetrain.nm import GroupSelector
    from sparsetrain.selection import NonFiniteMagnitudes

    for place in range(m):
        magnitudes = [torch.rand(3, 2 * m, generator=torch.Generator().manual_seed(place))]
        magnitudes[0][1, m + place] = value
        for k in (1, m // 2, m - 1):
            with pytest.raises(NonFiniteMagnitudes, match="the magnitudes hold a NaN or an infinity"):
                GroupSelector(m).select(magnitudes, k)


@pytest.mark.parametrize("method, p, rescaled", [("sr-ste", math.inf, False), ("feather-nm", 3.0, False),
                                                 ("st3-nm", 1.0, True)])
def test_group_thresholds_of_linear_conv_and_conv1d_layers_act_entry_by_entry(method, p, rescaled):
    """Linear, Conv2d and a Conv1D stored (in, out) selected together: the thresholds read are each
    group's at every entry, the forward weights the operator's with them (and ST-3's rescale), and a
    resumed state gives the same forward weights."""
    transformers = pytest.importorskip("transformers")
    from sparsetrain.methods.unstructured.weight import st3_rescale
    from sparsetrain.operators import threshold_operator
    from sparsetrain.prunable import out_in

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(8, 4, 3, bias=False)
            self.fc = nn.Linear(16, 12, bias=False)
            self.c1d = transformers.pytorch_utils.Conv1D(8, 12)  # weight (12 inputs, 8 outputs)

        def forward(self, x):
            return self.c1d(self.fc(self.conv(x).flatten(1)[:, :16]))

    torch.manual_seed(0)
    model = Mixed()
    sparsifier = st.create(model, method, total_steps=10, schedule="constant", start=0, end=0, fix_at=None)
    for name, layer, transposed in (("conv", model.conv, False), ("fc", model.fc, False), ("c1d", model.c1d, True)):
        w = layer.parametrizations.weight.original.detach()
        magnitude = out_in(w.abs(), transposed)
        expected = out_in(select_groups([magnitude], 2, 4).thresholds[0], transposed)
        assert torch.equal(sparsifier.thresholds[name], expected), name
        forward = threshold_operator(w, expected, p)
        if rescaled:
            kept = out_in(w.abs() > expected, transposed)
            forward = forward * out_in(st3_rescale(magnitude, kept), transposed)
        torch.testing.assert_close(layer.weight, forward, rtol=1e-6, atol=0.0, msg=name)
    resumed = st.create(Mixed(), method, total_steps=10, schedule="constant", start=0, end=0, fix_at=None)
    resumed.model.load_state_dict(model.state_dict())
    resumed.load_state_dict(sparsifier.state_dict())
    for name in ("conv", "fc", "c1d"):
        assert torch.equal(getattr(resumed.model, name).weight, getattr(model, name).weight), name
