"""Train a CIFAR ResNet-20 to 90 % sparsity with Feather on the bundled CIFAR-10 sample.

    python examples/quickstart.py [--epochs 8] [--method feather] [--sparsity 0.9]
"""

import argparse
import time

import torch
import torch.nn.functional as F

import sparsetrain as st
from sparsetrain.data import BatchLoader, load_dataset
from sparsetrain.models import create_model


@torch.no_grad()
def accuracy(model: torch.nn.Module, loader: BatchLoader) -> float:
    model.eval()
    correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in loader.batches(0))
    model.train()
    return correct / loader.samples_per_rank


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--method", default="feather", choices=st.list_methods())
    parser.add_argument("--sparsity", type=float, default=0.9)
    args = parser.parse_args()

    torch.manual_seed(0)
    data = load_dataset()
    train = BatchLoader(data.x_train, data.y_train, 128, data.mean, data.std, augment=True)
    test = BatchLoader(data.x_test, data.y_test, 256, data.mean, data.std, shuffle=False)
    model = create_model("resnet20", num_classes=data.num_classes)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    total = args.epochs * len(train)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total)
    sp = st.Sparsifier(model, args.method, args.sparsity, total_steps=total)
    for epoch in range(args.epochs):
        start = time.perf_counter()
        for x, y in train.batches(epoch):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            sp.step()
        print(
            f"epoch {epoch + 1}/{args.epochs}  loss {loss.item():.3f}  test acc {accuracy(model, test):.2%}  "
            f"sparsity {sp.sparsity():.2%}  threshold {sp.threshold:.4g}  {time.perf_counter() - start:.1f} s"
        )
    model = sp.finalize()
    print(st.sparsity_report(model))
    print(f"final: test accuracy {accuracy(model, test):.2%} at {st.sparsity_report(model).sparsity:.2%} sparsity")


if __name__ == "__main__":
    main()
