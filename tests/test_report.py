"""The per-layer sparsity report."""

import pytest
import torch
from torch import nn

import sparsetrain as st


def test_report_of_a_plain_model_counts_zeros_per_layer():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2), nn.BatchNorm1d(2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[0.0, 1, 2, 0], [3, 0, 4, 5], [6, 7, 8, 9]]))
        model[2].weight.fill_(0.0)
    report = st.sparsity_report(model)
    assert [(r.name, r.size, r.zeros) for r in report.layers] == [("0", 12, 3), ("2", 6, 6)]
    assert (report.size, report.zeros, report.sparsity) == (18, 9, 0.5)
    table = report.to_markdown()
    assert "| 0 | 12 | 3 | 25.00% |" in table
    assert "| **total** | 18 | 9 | 50.00% |" in table


def test_report_of_a_model_with_a_method_attached_matches_the_finalized_model(tiny_net):
    sp = st.Sparsifier(tiny_net, "feather", 0.8, total_steps=1, schedule="constant")
    live = st.sparsity_report(tiny_net)
    assert live.zeros == round(0.8 * sp.numel())
    assert st.sparsity_report(sp.finalize()) == live


def test_report_without_prunable_layers():
    with pytest.raises(ValueError, match="no prunable layer"):
        st.sparsity_report(nn.ReLU())


class _Attention(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.scaled_dot_product_attention(x, x, x)


def test_flops_count_attention_products():
    from sparsetrain.report import count_flops

    batch, heads, tokens, dim = 2, 3, 17, 8
    x = torch.randn(batch, heads, tokens, dim)
    # q k^T and (softmax) v: two products of 2 * tokens * tokens * dim FLOPs per head
    assert count_flops(_Attention(), x) == batch * heads * 2 * (2 * tokens * tokens * dim)
