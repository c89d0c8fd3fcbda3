"""What the run folder's lock and the library's checks at its door cost, against a training step.

Per step, only GDP's check that its gates are finite is new work (FRS checks its scores once per
pruning event; the unstructured engine's check rides on its selection pass, issue 12). The lock,
the start-over check and bind()'s check of the optimizer run once per run.

    python benchmarks/door_checks.py [--steps 20] [--repeats 200]

Prints the median of each, and each as a share of the median training step (ResNet-20, batch
128, GDP: forward, backward, before_optimizer_step, SGD step, step()).
"""

from __future__ import annotations

import argparse
import platform
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from timing import median_ms  # benchmarks/timing.py

import sparsetrain as st
from sparsetrain.methods.protocol import check_finite
from sparsetrain.models import create_model
from sparsetrain.run.folder import RunFolder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    torch.manual_seed(0)
    x, y = torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,))
    model = create_model("resnet20")
    gdp = st.create(model, "gdp", total_steps=10_000, example_inputs=x[:2])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    gdp.bind(optimizer)

    def train_step() -> None:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        gdp.before_optimizer_step()
        optimizer.step()
        gdp.step()

    train_step()  # warm-up
    step = median_ms(train_step, args.steps)
    gates = lambda: check_finite(gdp.gates.detach().abs().split([c.channels for c in gdp.couplings]),  # noqa: E731
                                 [c.root for c in gdp.couplings], "gate group", "gate", 1)
    feather_model = create_model("resnet20")
    feather = st.create(feather_model, "feather", total_steps=100)
    feather_optimizer = torch.optim.SGD(feather_model.parameters(), lr=0.01)
    with tempfile.TemporaryDirectory() as tmp:
        folder = RunFolder(Path(tmp) / "run")
        folder.path.mkdir()
        (folder.path / "config.json").write_text("{}")
        (folder.path / "tensorboard").mkdir()
        (folder.path / "tensorboard" / "events.out.tfevents.1.host.1.0").write_bytes(b"\0")
        rows = [
            ("GDP's gate check, every step", median_ms(gates, args.repeats)),
            ("bind(): the optimizer's check, once", median_ms(lambda: feather.bind(feather_optimizer), args.repeats)),
            ("the folder's lock and unlock, once", median_ms(lambda: (folder.lock(), folder.unlock()), args.repeats)),
            ("the start-over check, once", median_ms(folder.check_start_over, args.repeats)),
        ]
    print(f"{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"median training step (ResNet-20, batch 128, gdp): {step:.1f} ms\n")
    print("| work | median (ms) | share of one step |")
    print("|---|---:|---:|")
    for name, ms in rows:
        print(f"| {name} | {ms:.4f} | {100 * ms / step:.4f} % |")


if __name__ == "__main__":
    main()
