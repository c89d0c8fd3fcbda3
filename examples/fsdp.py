"""Feather on a ViT sharded by FSDP2, on CPU processes:

    torchrun --nproc_per_node=2 examples/fsdp.py

create(), then fully_shard on every layer and the root, then the optimizer, then bind(); a checkpoint
through torch.distributed.checkpoint halfway; finalize() leaves an ordinary FSDP model.
"""

import os
import shutil
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import get_state_dict
from torch.distributed.fsdp import fully_shard

import sparsetrain as st
from sparsetrain.models import create_model

dist.init_process_group("gloo")
torch.manual_seed(0)
model = create_model("vit-micro")
method = st.create(model, "feather", sparsity=0.9, total_steps=12)
for layer in model.modules():
    if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
        fully_shard(layer)
fully_shard(model)
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
method.bind(optimizer)
gen = torch.Generator().manual_seed(dist.get_rank())  # each rank its own batches
checkpoint = [tempfile.mkdtemp() if dist.get_rank() == 0 else None]
dist.broadcast_object_list(checkpoint)  # one folder for every rank's part of the checkpoint
for step in range(12):
    x, y = torch.randn(16, 3, 32, 32, generator=gen), torch.randint(0, 10, (16,), generator=gen)
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    method.before_optimizer_step()
    optimizer.step()
    method.step()
    if step == 5:
        model_state, optimizer_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optimizer": optimizer_state, "method": method.state_dict()},
                 checkpoint_id=checkpoint[0])
sparsity = method.sparsity()  # over every rank's shards
model = method.finalize()
dist.barrier()
if dist.get_rank() == 0:
    print(f"fsdp: {dist.get_world_size()} ranks, sparsity {sparsity:.4f}, threshold {method.threshold:.5f}")
    shutil.rmtree(checkpoint[0])  # the example's own temporary folder
dist.destroy_process_group()
sys.stdout.flush()
os._exit(0)  # skip interpreter teardown: torch 2.13's FSDP2 on gloo aborts in it about 1 run in 10
