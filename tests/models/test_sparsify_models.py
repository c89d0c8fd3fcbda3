"""Every registered model goes through a Sparsifier round trip: attach, train, resume, finalize, reload."""

import pytest
import torch
import torch.nn.functional as F

import sparsetrain as st
from sparsetrain.models import create_model, input_size, list_models, model_spec

SMALL_SIDE = 64  # ImageNet ResNets accept any input size; keep them cheap


@pytest.mark.parametrize("name", list_models())
def test_sparsifier_round_trip(name):
    size = input_size(name)
    if size[1] > 32:
        size = (size[0], SMALL_SIDE, SMALL_SIDE)
    classes = model_spec(name).defaults["num_classes"]
    torch.manual_seed(0)
    model = create_model(name)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    sp = st.Sparsifier(model, "feather", 0.9, total_steps=2, end=1)
    x, y = torch.randn(2, *size), torch.randint(0, classes, (2,))
    F.cross_entropy(model(x), y).backward()
    opt.step()
    sp.step()
    fresh = create_model(name)
    fresh_sp = st.Sparsifier(fresh, "feather", 0.9, total_steps=2, end=1)
    fresh.load_state_dict(model.state_dict())
    fresh_sp.load_state_dict(sp.state_dict())
    assert fresh_sp.thresholds == sp.thresholds
    assert sp.sparsity() == round(0.9 * sp.numel()) / sp.numel()
    plain = sp.finalize()
    rebuilt = create_model(name)
    rebuilt.load_state_dict(plain.state_dict(), strict=True)
    assert st.sparsity_report(rebuilt).zeros == round(0.9 * sp.numel())
