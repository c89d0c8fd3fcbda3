"""One rank of tests/methods/test_fsdp.py: every case of CASES on models sharded by FSDP2's fully_shard
(create(), then fully_shard on every prunable layer and the root, then the optimizer, then bind()).

Each rank writes, per case, what the test checks: at every step the method's threshold and the one
``select`` gives on the gathered weights at the method's target, the gathered finalized weights, and
whether the finalized model still trains. The cases of MIXED run with bf16 parameters in the forward
(FSDP's MixedPrecisionPolicy): there ``select`` reads the gathered weights rounded to bf16, and each step's
forward weights are checked against what that selection prunes.

    python -m torch.distributed.run --standalone --nproc_per_node=N tests/methods/fsdp_run.py OUT
"""

import json
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

import sparsetrain as st
from sparsetrain.methods.unstructured.weight import stored
from sparsetrain.nm import select_groups
from sparsetrain.operators import kept_mask
from sparsetrain.prunable import out_in
from sparsetrain.selection import layer_sigma, prune_count, select

STEPS = 8
CASES = [  # (name, model, method, options, tied)
    ("mlp-feather", "mlp", "feather", {"sparsity": 0.8}, False),
    ("mlp-st3-sigma", "mlp", "st3-sigma", {"sparsity": 0.8}, False),
    ("mlp-sr-ste", "mlp", "sr-ste", {}, False),
    ("cnn-gmp", "cnn", "gmp", {"sparsity": 0.9}, False),
    ("cnn-st3", "cnn", "st3", {"sparsity": 0.9}, False),
    ("cnn-sr-ste", "cnn", "sr-ste", {}, False),
    ("conv1d-st3", "conv1d", "st3", {"sparsity": 0.8}, False),
    ("conv1d-feather-nm", "conv1d", "feather-nm", {}, False),
    ("gpt2-feather", "gpt2", "feather", {"sparsity": 0.9}, False),
    ("llama-sr-ste", "llama", "sr-ste", {}, False),
    ("tied-feather", "mlp", "feather", {"sparsity": 0.6, "start": 2}, True),
    ("tied-st3-sigma", "mlp", "st3-sigma", {"sparsity": 0.6, "start": 2}, True),
    ("cnn-erk", "cnn", "feather", {"sparsity": 0.9, "scope": "erk"}, False),
    ("tied-erk", "mlp", "feather", {"sparsity": 0.6, "start": 2, "scope": "erk"}, True),
    ("mlp-sr-ste-every4", "mlp", "sr-ste", {"update_every": 4}, False),
    ("conv1d-sr-ste-every4", "conv1d", "sr-ste", {"update_every": 4}, False),
    ("tied-sr-ste-every4", "mlp", "sr-ste", {"update_every": 4}, True),
    ("mlp-st3-nm-every3", "mlp", "st3-nm", {"update_every": 3}, False),
    ("mlp-feather-bf16", "mlp", "feather", {"sparsity": 0.8}, False),
    ("mlp-sr-ste-every4-bf16", "mlp", "sr-ste", {"update_every": 4}, False),
]
MIXED = {"mlp-feather-bf16", "mlp-sr-ste-every4-bf16"}


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(32, 52), nn.ReLU(), nn.Linear(52, 47), nn.ReLU(), nn.Linear(47, 12))


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 20, 3, padding=1)
        self.fc = nn.Linear(20, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


def conv1d() -> nn.Module:
    """Layers stored (in, out) like GPT-2's: rows (input features) per shard a multiple of 4 on 2 and 3 ranks,
    but for the last layer's 10 rows, which form no groups of 4 (on 3 ranks its first two shards hold 4 each)."""
    from transformers.pytorch_utils import Conv1D

    return nn.Sequential(Conv1D(96, 48), nn.ReLU(), Conv1D(10, 96), nn.ReLU(), Conv1D(12, 10))


def gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=100, n_positions=32, n_embd=32, n_layer=2, n_head=2))


def llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32))


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of a classifier, or a causal language model's own loss on token ids ``x``."""
    return model(input_ids=x, labels=x).loss if hasattr(model, "get_output_embeddings") else F.cross_entropy(model(x), y)


def batch(model_name: str, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    if model_name in ("gpt2", "llama"):
        ids = torch.randint(0, 100, (4, 16), generator=gen)
        return ids, ids
    width = {"mlp": 32, "conv1d": 48}
    x = torch.randn(8, width[model_name], generator=gen) if model_name in width else torch.randn(4, 3, 8, 8, generator=gen)
    return x, torch.randint(0, 12, (len(x),), generator=gen)


def run(name: str, model_name: str, method: str, options: dict, tied: bool, rank: int) -> dict:
    torch.manual_seed(0)
    model = {"mlp": mlp, "cnn": CNN, "conv1d": conv1d, "gpt2": gpt2, "llama": llama}[model_name]()
    if tied:  # magnitudes on a grid of 1/32, kept there (lr 0): ties straddle the k-th position across shards
        with torch.no_grad():
            for p in model.parameters():
                p.copy_((p * 32).round() / 32)
    method_object = st.create(model, method, total_steps=STEPS, **options)
    dtype = torch.bfloat16 if name in MIXED else torch.float32  # the weights' dtype in the forward
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for module in model.modules():
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if (isinstance(module, (nn.Linear, nn.Conv2d)) or type(module).__name__ == "Conv1D") and module is not head:
            fully_shard(module, mp_policy=policy)  # a language model's head stays with the root, beside the embedding it may share
    fully_shard(model, mp_policy=policy)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0 if tied else 0.05, momentum=0.9)
    method_object.bind(optimizer)
    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own data, as in data-parallel training
    thresholds, tie_steps, held_forwards, held_ties, exact_forwards = [], 0, [], False, []
    every = options.get("update_every", 1)
    held = held_groups(method_object, model_name, dtype) if method == "sr-ste" and every > 1 else None
    seen = forward_weights(method_object) if name in MIXED else None
    for _ in range(STEPS):
        x, y = batch(model_name, gen)
        if seen is not None:  # the forward weights, bf16, against the selection on the rounded gathered weights
            rounded = [w.full_tensor().detach().to(dtype) for w in method_object.dense_weights()]
            target = method_object.target
            seen.clear()
            loss = loss_of(model, x, y)
            if held is None:
                zeros = sum(int((out == 0).sum()) for out in seen)
                exact_forwards.append(zeros == round(target * method_object.numel()))
            else:
                exact_forwards.append(all(torch.equal(out != 0, kept_mask(w, threshold, pruned)) for out, w, (threshold, pruned, _)
                                          in zip(seen, rounded, held)))
        elif held is not None:  # N:M held between updates: the training forward against a plain copy's
            expected = pruned_by_held(method_object, model, model_name, held)(x)
            output = model(x)
            held_forwards.append(torch.allclose(output, expected, rtol=1e-5, atol=1e-6))
            held_ties |= any(tied for _, _, tied in held)
            loss = F.cross_entropy(output, y)
        else:
            loss = loss_of(model, x, y)
        optimizer.zero_grad()
        loss.backward()
        method_object.before_optimizer_step()
        optimizer.step()
        method_object.step()
        if held is not None and method_object.step_count % every == 0:
            held = held_groups(method_object, model_name, dtype)
        scope = method_object.config.scope
        if scope != "nm" and not method_object.fixed:
            full = [w.full_tensor().to(dtype) for w in method_object.dense_weights()]
            norms = [1.0 / layer_sigma(w.shape) if scope == "sigma" else 1.0 for w in full]
            expected = select([w.abs() * n for w, n in zip(full, norms)], method_object.target, scope)
            thresholds.append([list(method_object.thresholds.values()), expected.thresholds])
            tie_steps += any(t is not None for t in expected.ties)
    sparsity = method_object.sparsity()
    finalized = method_object.finalize()
    weights = {key: p.full_tensor() for key, p in finalized.named_parameters()}
    torch.save(weights, f"{sys.argv[1]}/{name}-rank{rank}.pt")
    x, y = batch(model_name, gen)  # the finalized model is an ordinary FSDP model: it still trains
    loss = loss_of(finalized, x, y)
    loss.backward()
    return {"thresholds": thresholds, "tie_steps": tie_steps, "held_forwards": held_forwards, "held_ties": held_ties,
            "exact_forwards": exact_forwards, "sparsity": sparsity, "target": method_object.schedule.final,
            "n": method_object.numel(), "layers": [n for n, _, _ in method_object.layer_stats()],
            "trains": bool(torch.isfinite(loss)) and all(p.grad is not None for p in finalized.parameters()),
            "classes": sorted({type(m).__name__ for m in finalized.modules()})}


def held_groups(method_object, model_name: str, dtype: torch.dtype) -> list:
    """Per weight, the 2:4 thresholds of the gathered weights now (rounded to ``dtype``, as the forward sees
    them), as a single process selects them, the entries they prune (held with them until the next update:
    a group gains no non-zero in between), and whether tied magnitudes decided some of those."""
    transposed = model_name == "conv1d"
    k = prune_count(method_object.target, 4)
    full = [out_in(w.full_tensor().detach().to(dtype).abs(), transposed) for w in method_object.dense_weights()]
    chosen = select_groups(full, k, 4)
    return [(stored(t, transposed), stored(~kept_mask(m, t, ties), transposed) if isinstance(t, torch.Tensor) else None,
             ties is not None) for m, t, ties in zip(full, chosen.thresholds, chosen.ties)]


def forward_weights(method_object) -> list:
    """A list that every layer's forward weight (gathered, as the forward computes it) is appended to."""
    seen: list = []
    for module in method_object._holders:  # cloned: FSDP frees the unsharded weight after the forward
        module.parametrizations.weight[0].register_forward_hook(lambda m, i, out: seen.append(out.detach().clone()))
    return seen


def pruned_by_held(method_object, model: nn.Module, model_name: str, held: list) -> nn.Module:
    """A plain copy of the sharded model whose weights are the gathered weights pruned by ``held``
    (sr-ste's forward: w where kept, else 0)."""
    plain = {"mlp": mlp, "conv1d": conv1d}[model_name]()
    with torch.no_grad():
        for name, w, (threshold, pruned, _) in zip(method_object.names, method_object.dense_weights(), held):
            full = w.full_tensor()
            plain.get_submodule(name).weight.copy_(full * kept_mask(full, threshold, pruned))
            plain.get_submodule(name).bias.copy_(model.get_submodule(name).bias.full_tensor())
    return plain


def non_finite(bad: float, rank: int, world: int, method: str, options: dict) -> str:
    """The error of step() (sr-ste with update_every=4: of refresh(), each rank selecting its rows' groups)
    when the last rank's shard of the second layer holds ``bad``."""
    torch.manual_seed(0)
    model = mlp()
    method_object = st.create(model, method, total_steps=STEPS, **options)
    for module in model:
        if isinstance(module, nn.Linear):
            fully_shard(module)
    fully_shard(model)
    method_object.bind(torch.optim.SGD(model.parameters(), lr=0.0))
    if rank == world - 1:
        with torch.no_grad():
            method_object.dense_weights()[1].to_local()[0, 0] = bad
    try:
        if method == "sr-ste":
            method_object.refresh()
        else:
            method_object.step()
    except FloatingPointError as error:
        return str(error)
    return "no error"


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    report = {name: run(name, *case, rank) for name, *case in CASES}
    with open(f"{sys.argv[1]}/report-rank{rank}.json", "w") as f:
        json.dump(report, f)
    errors = [non_finite(bad, rank, dist.get_world_size(), method, options) for method, options in
              (("feather", {"sparsity": 0.5}), ("sr-ste", {"update_every": 4})) for bad in (float("inf"), float("nan"))]
    with open(f"{sys.argv[1]}/non-finite-rank{rank}.json", "w") as f:
        json.dump(errors, f)
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown: torch 2.13's FSDP2 on gloo aborts in it about 1 run in 10


if __name__ == "__main__":
    main()
