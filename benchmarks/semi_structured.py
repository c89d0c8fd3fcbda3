"""Speed of 2:4 Linear layers on a GPU's sparse tensor cores (`sparsetrain.nm.to_semi_structured`).

Makes each model 2:4 sparse with sr-ste's finalize (the N:M selection every N:M preset shares),
casts it to float16 on CUDA, times its forward pass, converts its 2:4 Linear layers to PyTorch's
semi-structured sparse weights, checks the output agrees with the dense one, and times it again.
Models: one 4096x4096 Linear layer (a large GEMM, where the sparse kernels have room to win) and
vit-tiny (its attention and MLP Linear layers; convolutions stay dense). Needs CUDA.

    python benchmarks/semi_structured.py [--batch 4096] [--repeats 50]
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.sparse import SparseSemiStructuredTensor
from torch.utils import benchmark

import sparsetrain as st
from sparsetrain.models import create_model
from sparsetrain.nm import to_semi_structured


def two_four(model: nn.Module) -> nn.Module:
    """The model with every prunable layer 2:4, as a finished sr-ste run leaves it."""
    return st.create(model, "sr-ste", total_steps=1, nm="2:4").finalize()


def forward_ms(model: nn.Module, x: torch.Tensor, repeats: int) -> float:
    with torch.inference_mode():
        timer = benchmark.Timer("model(x)", globals={"model": model, "x": x})
        return timer.timeit(repeats).median * 1e3


def measure(label: str, model: nn.Module, x: torch.Tensor, repeats: int) -> str:
    model = two_four(model).half().cuda().eval()
    x = x.half().cuda()
    with torch.inference_mode():
        expected = model(x)
    dense = forward_ms(model, x, repeats)
    to_semi_structured(model)
    converted = sum(isinstance(m.weight, SparseSemiStructuredTensor) for m in model.modules() if isinstance(m, nn.Linear))
    with torch.inference_mode():
        error = (model(x) - expected).abs().max().item()
    sparse = forward_ms(model, x, repeats)
    return f"| {label} | {converted} | {dense:.3f} | {sparse:.3f} | {dense / sparse:.2f} | {error:.2e} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4096, help="rows of the Linear layer's input")
    parser.add_argument("--vit-batch", type=int, default=256, help="images per vit-tiny forward")
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, float16, median of {args.repeats} forwards")
    print("| model | Linear layers converted | dense (ms) | 2:4 semi-structured (ms) | speed-up | max abs difference |")
    print("|---|---:|---:|---:|---:|---:|")
    print(measure(f"Linear 4096x4096, batch {args.batch}", nn.Sequential(nn.Linear(4096, 4096)),
                  torch.randn(args.batch, 4096), args.repeats))
    print(measure(f"vit-tiny, batch {args.vit_batch}", create_model("vit-tiny"),
                  torch.randn(args.vit_batch, 3, 32, 32), args.repeats))


if __name__ == "__main__":
    main()
