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
    from sparsetrain.measure import count_flops

    batch, heads, tokens, dim = 2, 3, 17, 8
    x = torch.randn(batch, heads, tokens, dim)
    # q k^T and (softmax) v: two products of 2 * tokens * tokens * dim FLOPs per head
    assert count_flops(_Attention(), x) == batch * heads * 2 * (2 * tokens * tokens * dim)


def tiny_gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16, n_positions=8, bos_token_id=0,
                                     eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


@pytest.mark.parametrize("along_inputs", [True, False])
def test_report_lists_conv1d_layers_with_their_n_m_pattern_along_the_input_dimension(along_inputs):
    model = tiny_gpt2()
    attention = model.transformer.h[0].attn.c_attn  # Conv1D: weight (8 inputs, 24 outputs)
    with torch.no_grad():  # two zeros in every 4 consecutive inputs (rows), or outputs (columns)
        kept = (torch.arange(8) % 4 >= 2)[:, None] if along_inputs else (torch.arange(24) % 4 >= 2)[None, :]
        attention.weight.mul_(kept)
    report = st.sparsity_report(model, nm=(2, 4))
    prefix = "transformer.h.0."
    assert [r.name for r in report.layers] == [prefix + name for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    assert (report.layers[0].size, report.layers[0].zeros, report.layers[0].pattern) == (192, 96, along_inputs)
    assert report.layers[1].pattern is False  # a dense weight
    expected = "yes" if along_inputs else "no"
    assert f"| {prefix}attn.c_attn | 192 | 96 | 50.00% | {expected} |" in report.to_markdown()


def test_report_lists_what_was_left_dense_and_why():
    model = tiny_gpt2()
    report = st.sparsity_report(model)
    assert report.dense == (("transformer.wte", "an embedding (never pruned)"),
                            ("transformer.wpe", "an embedding (never pruned)"),
                            ("lm_head", "the output embedding (get_output_embeddings())"))
    assert report.to_markdown().endswith(
        "\n\nLeft dense:\n- transformer.wte: an embedding (never pruned)\n- transformer.wpe: an embedding (never pruned)"
        "\n- lm_head: the output embedding (get_output_embeddings())"
    )
    plain = st.sparsity_report(nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)), exclude=["1"])
    assert plain.dense == (("1", "matches exclude pattern '1'"),) and [r.name for r in plain.layers] == ["0"]
    assert "Left dense" not in st.sparsity_report(nn.Linear(4, 3)).to_markdown()


def test_report_lists_the_layers_a_model_declares_dense():
    from sparsetrain.models import create_model

    report = st.sparsity_report(create_model("vit-micro"))
    assert report.dense == (("patch_embed", "declared dense by ViT.default_exclude"),
                            ("fc", "declared dense by ViT.default_exclude"))
    assert "- patch_embed: declared dense by ViT.default_exclude" in report.to_markdown()
