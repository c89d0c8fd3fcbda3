"""The integrations are optional extras: the core package and the CLI never import them."""

import subprocess
import sys


def test_core_and_cli_import_neither_lightning_nor_transformers_nor_onnx():
    # nor what only some runs need and takes long to import: plots (matplotlib) and FSDP's DTensor
    code = ("import sys, sparsetrain, sparsetrain.run.cli, sparsetrain.integrations; "
            "print(sorted(m for m in ('lightning', 'transformers', 'accelerate', 'onnx', 'onnxscript', 'onnxruntime', "
            "'matplotlib', 'torch.distributed.tensor') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
