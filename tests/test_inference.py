"""load_finalized: a state saved while a method is attached becomes the plain model finalize() returns,
from a {"model", "method"} mapping or a torch.save file of one (Lightning and Hugging Face checkpoints
are tested with their callbacks in tests/integrations); what does not fit is refused in one sentence."""

import copy

import pytest
import torch

import sparsetrain as st

EXAMPLE = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def trained(model, make_batches, train, method, **options):
    """``model`` after 6 steps of ``method`` (to the end of its schedule), with the mapping a user's
    loop would save then."""
    attached = st.create(model, method, total_steps=6, example_inputs=EXAMPLE, data=make_batches(2, seed=1), **options)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    attached.bind(optimizer)
    train(model, attached, optimizer, make_batches(6))
    saved = {"model": {k: v.detach().clone() for k, v in model.state_dict().items()},
             "method": copy.deepcopy(attached.state_dict())}
    return attached, saved


@pytest.mark.parametrize("method, options", [("feather", {"sparsity": 0.8}), ("gdp", {"flops_target": 0.5}),
                                             ("frs", {"prune_every": 3, "channels_per_step": 4})])
def test_a_saved_mapping_or_file_loads_as_the_finalized_model(tmp_path, tiny_net, make_batches, train, method, options):
    attached, saved = trained(tiny_net, make_batches, train, method, **options)
    torch.save(saved, tmp_path / "state.pt")
    finalized = attached.finalize().eval()
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = finalized(x)
    for checkpoint in (saved, tmp_path / "state.pt"):  # the method and its schedule length are read from the state
        loaded = st.load_finalized(type(tiny_net)(), checkpoint, example_inputs=EXAMPLE, **options).eval()
        assert not any("parametrizations" in name for name in loaded.state_dict())
        with torch.no_grad():
            got = loaded(x)
        assert torch.isfinite(got).all()
        assert torch.allclose(got, expected, rtol=0, atol=1e-6)  # the same weights and graph: float32 rounding at most
    if method in ("gdp", "frs"):  # the compact model: channels removed
        assert sum(p.numel() for p in loaded.parameters()) < sum(p.numel() for p in type(tiny_net)().parameters())
    else:
        weights = [m.weight for m in loaded.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
        assert sum(int((w == 0).sum()) for w in weights) == round(0.8 * sum(w.numel() for w in weights))


def test_what_does_not_fit_is_refused_naming_it(tmp_path, tiny_net, make_batches, train):
    _, saved = trained(tiny_net, make_batches, train, "feather", sparsity=0.8)
    fresh = type(tiny_net)
    with pytest.raises(ValueError, match=r"^the mapping given holds neither a Lightning checkpoint nor"):
        st.load_finalized(fresh(), {"weights": saved["model"]})
    with pytest.raises(ValueError, match=r"holds no Sparsify method states; allowed: a checkpoint written during fit"):
        st.load_finalized(fresh(), {"state_dict": saved["model"], "callbacks": {"ModelCheckpoint": {}}})
    with pytest.raises(ValueError, match=r"sparsity=0.8 but this feather has sparsity=0.5"):
        st.load_finalized(fresh(), saved, sparsity=0.5)
    with pytest.raises(ValueError, match=r"this state is for method 'feather'; allowed: a state of method 'gdp'"):
        st.load_finalized(fresh(), saved, "gdp", example_inputs=EXAMPLE)
    without_bias = {"model": {k: v for k, v in saved["model"].items() if k != "conv.bias"}, "method": saved["method"]}
    with pytest.raises(ValueError, match=r"does not fit this model: 'conv.bias' is missing"):
        st.load_finalized(fresh(), without_bias, sparsity=0.8)
    with pytest.raises(TypeError, match=r"^checkpoint=42 is not allowed"):
        st.load_finalized(fresh(), 42)


def test_files_that_are_no_checkpoint_are_refused_and_nothing_is_unpickled(tmp_path, tiny_net):
    with pytest.raises(ValueError, match=r"missing.ckpt \(the checkpoint\) does not exist"):
        st.load_finalized(tiny_net, tmp_path / "missing.ckpt")
    with pytest.raises(ValueError, match=r"sparsify_state.pt \(its method state\) does not exist"):
        st.load_finalized(tiny_net, tmp_path)  # a folder: a Hugging Face checkpoint without SparsifyCallback's file
    (tmp_path / "text.ckpt").write_text("not a checkpoint")
    torch.save(tiny_net, tmp_path / "module.pt")  # a pickled module: weights_only refuses to rebuild it
    for name in ("text.ckpt", "module.pt"):
        with pytest.raises(ValueError, match=rf"{name} is not a checkpoint torch.load reads with weights_only=True"):
            st.load_finalized(tiny_net, tmp_path / name)
