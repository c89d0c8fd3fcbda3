"""ONNX export: onnxruntime gives PyTorch's outputs for finished runs (an unstructured and a GDP run) and
for models exported from Python (a Hugging Face model with keyword inputs too); pruned weights are stored
as sparse initializers, a fifth of the dense bytes at 90 % sparsity, dense weights stay dense."""

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

import sparsetrain as st
from sparsetrain.data import load_dataset
from sparsetrain.data.augment import normalize
from sparsetrain.models import create_model
from sparsetrain.run.folder import load_run

SMALL = ["--model-arg", "width=0.25", "--limit", "256", "--batch-size", "64", "--epochs", "2", "--device", "cpu",
         "--workers", "1"]


@pytest.mark.slow
@pytest.mark.parametrize("method, extra", [("feather", ["--sparsity", "0.9"]), ("gdp", ["--flops-target", "0.5"])])
def test_onnx_export_matches_pytorch(tmp_path, cli, method, extra):
    code, _, err = cli("train", "--method", method, *extra, *SMALL, "--out", tmp_path, "--name", "r")
    assert code == 0, err
    run = tmp_path / "r"
    code, out, err = cli("export", run, "--format", "onnx")
    assert code == 0, err
    assert "model.onnx" in out and "onnxruntime matches PyTorch" in out
    data = load_dataset()
    images = normalize(data.x_test[:50], data.mean, data.std)
    model = load_run(run, torch.device("cpu")).model.eval()
    with torch.no_grad():
        expected = model(images).numpy()
    session = onnxruntime.InferenceSession(str(run / "model.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(["logits"], {session.get_inputs()[0].name: images.numpy()})
    assert np.abs(got - expected).max() <= 1e-4
    if method == "gdp":  # the compact model: fewer channels than the dense ResNet-20 at width 0.25
        dense = create_model("resnet20", width=0.25)
        assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in dense.parameters())


def test_export_format_is_checked(cli, tmp_path):
    code, _, err = cli("export", tmp_path, "--format", "tflite")
    assert code == 2 and "invalid choice: 'tflite'" in err


def feather_resnet20(sparsity: float, width: float = 0.5) -> torch.nn.Module:
    """ResNet-20 with ``sparsity`` of its weights zero by feather (a single step: no training)."""
    torch.manual_seed(0)
    return st.create(create_model("resnet20", width=width), "feather", total_steps=1, sparsity=sparsity,
                     schedule="constant").finalize()


def stored_sparse(weight: torch.Tensor) -> bool:
    """The documented rule: non-zeros x (4 value bytes + index bytes) < 4 x entries, the index the
    narrowest of int8/16/32 holding every position."""
    index = 1 if weight.numel() <= 128 else 2 if weight.numel() <= 2**15 else 4
    return int((weight != 0).sum()) * (4 + index) < 4 * weight.numel()


def densified(tensor: onnx.SparseTensorProto) -> np.ndarray:
    """A sparse initializer written out densely."""
    values = np.zeros(int(np.prod(tensor.dims)), dtype=np.float32)
    values[onnx.numpy_helper.to_array(tensor.indices).astype(np.int64)] = onnx.numpy_helper.to_array(tensor.values)
    return values.reshape(tuple(tensor.dims))


@pytest.mark.slow  # the ONNX exporter takes seconds
def test_a_90_percent_sparse_model_is_stored_in_a_fifth_of_the_bytes_and_runs_in_onnxruntime(tmp_path):
    """Width 0.5: at width 0.25 the graph itself (~15 KB of nodes and shapes) outweighs the 70 KB of weights."""
    model = feather_resnet20(0.9)
    path = st.export_onnx(model, torch.zeros(2, 3, 32, 32), tmp_path / "sparse.onnx")
    stored = onnx.load(str(path))
    weights = {name: p for name, p in model.named_parameters() if p.dim() > 1}
    sparse = {tensor.values.name: densified(tensor) for tensor in stored.graph.sparse_initializer}
    assert set(sparse) == {name for name, w in weights.items() if stored_sparse(w)}
    assert len(sparse) >= len(weights) - 2  # a small layer may be too dense to gain
    for name, values in sparse.items():  # batch norms are folded in: the same zeros, scaled values
        assert np.array_equal(values != 0, weights[name].detach().numpy() != 0)
    sparse_size = stored.ByteSize()
    stored.graph.initializer.extend(onnx.numpy_helper.from_array(v, name) for name, v in sparse.items())
    del stored.graph.sparse_initializer[:]
    assert sparse_size <= 0.25 * stored.ByteSize()  # the same model with every initializer dense

    images = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))  # another batch size
    with torch.no_grad():
        expected = model.eval()(images).numpy()
    got = run_onnx(path, images)
    assert np.isfinite(got).all()
    assert np.abs(got - expected).max() <= 1e-4  # float32 kernels of two runtimes: differences near 1e-7


def test_a_dense_model_keeps_dense_initializers(tmp_path, tiny_net):
    path = st.export_onnx(tiny_net, torch.zeros(1, 3, 8, 8), tmp_path / "dense.onnx")
    stored = onnx.load(str(path)).graph
    assert len(stored.sparse_initializer) == 0
    assert {t.name for t in stored.initializer} >= {"conv.weight", "depthwise.weight", "conv2.weight", "fc.weight"}


def run_onnx(path, inputs: torch.Tensor) -> np.ndarray:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(["logits"], {session.get_inputs()[0].name: inputs.numpy()})
    return got


@pytest.mark.slow  # the ONNX exporter takes seconds
def test_a_transformers_model_exports_with_keyword_inputs(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=32, num_labels=4)
    method = st.create(BertForSequenceClassification(config), "feather", total_steps=1, sparsity=0.9,
                       exclude=["bert.embeddings.*", "classifier"], schedule="constant")
    model = method.finalize()
    gen = torch.Generator().manual_seed(0)
    example = {"input_ids": torch.randint(1, 64, (2, 16), generator=gen), "attention_mask": torch.ones(2, 16, dtype=torch.long)}
    path = st.export_onnx(model, example, tmp_path / "bert.onnx")
    pruned = [model.get_submodule(name).weight for name in method.names]
    gaining = [w for w in pruned if stored_sparse(w)]
    matrices = [t for t in onnx.load(str(path)).graph.sparse_initializer if len(t.dims) == 2]  # (transposed) weights
    assert len(matrices) == len(gaining) >= len(pruned) - 2
    assert sum(t.values.dims[0] for t in matrices) == sum(int((w != 0).sum()) for w in gaining)
    inputs = {"input_ids": torch.randint(1, 64, (3, 16), generator=gen), "attention_mask": torch.ones(3, 16, dtype=torch.long)}
    difference = st.onnx.onnxruntime_difference(model, path, inputs)
    assert difference is not None and difference <= 1e-4  # float32 kernels of two runtimes


def test_export_refuses_inputs_it_cannot_trace(tmp_path):
    with pytest.raises(TypeError, match=r"^example_inputs=\[1, 2\] is not allowed; allowed: a tensor batch or a mapping"):
        st.export_onnx(torch.nn.Linear(2, 2), [1, 2], tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()

