"""Size of a sparse model stored densely vs with the compressed export (bitmask / index / packed N:M layouts).

For each finished run folder given (or, with none, ResNet-20 made sparse at 0.9/0.95/0.98/0.99
by the feather method and at 2:4 and 1:4 by sr-ste), writes its final weights to a temporary folder
as a dense safetensors file and as a `sparsetrain.run.export` file, checks the export loads back to
identical tensors, and prints the sizes: the whole file, and the packed N:M weights alone (their
values and positions against their dense bytes).

    python benchmarks/export_size.py [RUN_DIR ...]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import sparsetrain as st
from sparsetrain.models import create_model
from sparsetrain.run.export import _layout_sizes, load_sparse, save_sparse, smallest_layout
from sparsetrain.run.folder import RunFolder, final_weights, nm_pattern

State = dict[str, torch.Tensor]


def states() -> dict[str, tuple[State, tuple[int, int] | None]]:
    """label -> (final weights, N:M pattern or None)."""
    if len(sys.argv) > 1:
        return {run: (load_file(str(final_weights(run))), nm_pattern(RunFolder(Path(run)).config())) for run in sys.argv[1:]}
    found = {}
    for sparsity in (0.9, 0.95, 0.98, 0.99):
        torch.manual_seed(0)
        model = create_model("resnet20")
        method = st.create(model, "feather", total_steps=1, sparsity=sparsity, schedule="constant")
        found[f"resnet20 at {sparsity:.0%}"] = (method.finalize().state_dict(), None)
    for n, m in ((2, 4), (1, 4)):
        torch.manual_seed(0)
        model = create_model("resnet20")
        method = st.create(model, "sr-ste", total_steps=1, nm=f"{n}:{m}")
        found[f"resnet20 at {n}:{m}"] = (method.finalize().state_dict(), (n, m))
    return found


def packed_share(state: State, nm: tuple[int, int] | None) -> str:
    """Bytes of the tensors stored in the nm layout against their dense bytes."""
    sizes = [_layout_sizes(v, nm) for v in state.values()]
    packed = [size for size in sizes if smallest_layout(size) == "nm"]
    if not packed:
        return "—"
    return f"{sum(s['nm'] for s in packed) / sum(s['dense'] for s in packed):.3f}"


def main() -> None:
    print("| model | sparsity of prunable weights | dense safetensors (KiB) | sparse export (KiB) | ratio | N:M weights packed / dense |")
    print("|---|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for label, (state, nm) in states().items():
            dense, sparse = Path(tmp) / "dense.safetensors", Path(tmp) / "sparse.safetensors"
            save_file({k: v.contiguous() for k, v in state.items()}, dense)
            save_sparse(sparse, state, nm=nm)
            back = load_sparse(sparse)
            assert all(torch.equal(back[k], v) for k, v in state.items())
            weights = [v for k, v in state.items() if k.endswith("weight") and v.dim() > 1]
            zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
            d, s = dense.stat().st_size, sparse.stat().st_size
            print(f"| {label} | {zeros:.2%} | {d / 1024:.0f} | {s / 1024:.0f} | {s / d:.1%} | {packed_share(state, nm)} |")


if __name__ == "__main__":
    main()
