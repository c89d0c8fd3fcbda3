"""ONNX export of finished runs: onnxruntime gives PyTorch's outputs for an unstructured and a GDP run."""

import numpy as np
import onnxruntime
import pytest
import torch

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
    (got,) = session.run(["logits"], {"images": images.numpy()})
    assert np.abs(got - expected).max() <= 1e-4
    if method == "gdp":  # the compact model: fewer channels than the dense ResNet-20 at width 0.25
        dense = create_model("resnet20", width=0.25)
        assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in dense.parameters())


def test_export_format_is_checked(cli, tmp_path):
    code, _, err = cli("export", tmp_path, "--format", "tflite")
    assert code == 2 and "invalid choice: 'tflite'" in err
