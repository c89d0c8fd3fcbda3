"""Run by test_lightning.py: Trainer(strategy=ModelParallelStrategy) on 2 CPU processes, the model sharded
by FSDP2 in configure_model, with a Sparsify callback; each rank saves the gathered final weights.
Lightning starts rank 1 by running this script again."""

import os
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).parent))
from test_lightning import Classifier, sample_loader  # noqa: E402

from sparsetrain.integrations.lightning import Sparsify  # noqa: E402


class ShardedClassifier(Classifier):
    def configure_model(self) -> None:
        mesh = self.device_mesh["data_parallel"]
        for module in self.net.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                fully_shard(module, mesh=mesh)
        fully_shard(self.net, mesh=mesh)


if __name__ == "__main__":
    out = Path(sys.argv[1])
    module = ShardedClassifier()
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", devices=2, logger=False, enable_checkpointing=False,
                         strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[Sparsify("feather", sparsity=0.9)])
    trainer.fit(module, sample_loader(shuffle=False))
    # the root keeps its own parameters (batch norms) unsharded after its last forward
    weights = {name: p.full_tensor() if isinstance(p, DTensor) else p.detach() for name, p in module.named_parameters()}
    torch.save({"weights": weights, "classes": sorted({type(m).__name__ for m in module.modules()})},
               out / f"rank{trainer.global_rank}.pt")
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown: torch 2.13's FSDP2 on gloo aborts in it about 1 run in 10
