"""One rank of the FSDP checkpoint tests (tests/methods/test_fsdp.py): a run killed after FIRST steps
and resumed through ``torch.distributed.checkpoint`` (model, optimizer and the method's state), against
one never killed.

    python -m torch.distributed.run --standalone --nproc_per_node=N tests/methods/fsdp_resume.py OUT PHASE METHODS

PHASE is ``whole`` (all STEPS steps), ``first`` (FIRST steps, then a checkpoint) or ``rest`` (load it,
then the other steps), for each of the comma-separated METHODS (files under OUT/METHOD; ``NAME@K``:
with ``update_every=K``). The batch of a step depends on the step and the rank only.
"""

import json
import os
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard

import sparsetrain as st

STEPS, FIRST = 8, 4


def build(method: str):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 52), nn.ReLU(), nn.Linear(52, 48), nn.ReLU(), nn.Linear(48, 12))
    name, _, every = method.partition("@")
    options = {} if name in ("sr-ste", "feather-nm") else {"sparsity": 0.8}
    created = st.create(model, name, total_steps=STEPS, update_every=int(every or 1), **options)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    created.bind(optimizer)
    return model, created, optimizer


def train(model, created, optimizer, steps: range, rank: int) -> None:
    for step in steps:
        gen = torch.Generator().manual_seed(1000 * step + rank)
        x, y = torch.randn(8, 32, generator=gen), torch.randint(0, 12, (8,), generator=gen)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        created.before_optimizer_step()
        optimizer.step()
        created.step()


def states(model, created, optimizer) -> dict:
    model_state, optimizer_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optimizer_state, "method": created.state_dict()}


def run(out: str, phase: str, method: str, rank: int) -> None:
    model, created, optimizer = build(method)
    record = {}
    if phase == "rest":
        state = states(model, created, optimizer)
        dcp.load(state, checkpoint_id=f"{out}/checkpoint")
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        created.load_state_dict(state["method"])
        record["loaded"] = summary(created)
    steps = {"whole": range(STEPS), "first": range(FIRST), "rest": range(FIRST, STEPS)}[phase]
    train(model, created, optimizer, steps, rank)
    if phase == "first":
        record["saved"] = summary(created)
        dcp.save(states(model, created, optimizer), checkpoint_id=f"{out}/checkpoint")
    else:
        finalized = created.finalize()
        torch.save({k: p.full_tensor() for k, p in finalized.named_parameters()}, f"{out}/{phase}-rank{rank}.pt")
    with open(f"{out}/{phase}-rank{rank}.json", "w") as f:
        json.dump(record, f)


def summary(created) -> dict:
    """What the state holds at this point: the step, the thresholds (none for N:M) and the sparsity."""
    thresholds = [] if created.config.scope == "nm" else [float(t) for t in created.thresholds.values()]
    return {"step": created.step_count, "thresholds": thresholds, "sparsity": created.sparsity()}


def main() -> None:
    out, phase, methods = sys.argv[1:4]
    dist.init_process_group("gloo")
    for method in methods.split(","):
        run(f"{out}/{method}", phase, method, dist.get_rank())
    dist.barrier()  # no rank leaves while another is still inside a collective
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown: torch 2.13's FSDP2 on gloo aborts in it about 1 run in 10


if __name__ == "__main__":
    main()
