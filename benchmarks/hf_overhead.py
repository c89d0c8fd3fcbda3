"""Step overhead of sparsifying small Hugging Face language models (GPT-2 with its Conv1D layers, Llama)
over dense training, on the CPU: one interleaved run, the methods taking turns step by step (the order
rotating), reported as the ratio of medians, the median of paired ratios and the mean paired difference
with its 95 % interval, over the mean dense step.

A step: forward (causal LM loss on random token ids), backward, ``before_optimizer_step``, SGD step,
``step()``. The schedules run over ``--total-steps`` (default: the steps timed plus warm-up, so the timed
steps cover the whole ramp and the final sparsity). ``--compile``: every model runs through
``torch.compile`` (inductor), its first step, the compile, among the warm-up steps.

    python benchmarks/hf_overhead.py [--models gpt2,llama] [--methods dense,feather,sr-ste] [--steps 30] [--compile]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from timing import paired_overhead
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import sparsetrain as st

VOCAB, SEQUENCE, BATCH, WARMUP = 2000, 128, 8, 3


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=SEQUENCE, n_embd=256, n_layer=4, n_head=4))
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=SEQUENCE))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="gpt2,llama")
    parser.add_argument("--methods", default="dense,feather,sr-ste")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--total-steps", type=int, default=0, help="the schedules' length (0: steps + warm-up)")
    parser.add_argument("--compile", action="store_true", help="run every model through torch.compile")
    args = parser.parse_args()
    methods = args.methods.split(",")
    total = args.total_steps or args.steps + WARMUP
    ids = torch.randint(0, VOCAB, (BATCH, SEQUENCE), generator=torch.Generator().manual_seed(0))
    print(f"{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads, batch {BATCH} x {SEQUENCE} tokens"
          f"{', compiled' if args.compile else ''}")
    print("| model | method | median step (ms) | over dense (medians) | over dense (median of paired ratios) | "
          "over dense (mean paired difference, 95 % interval) |")
    print("|---|---|---:|---:|---:|---:|")
    for name in args.models.split(","):
        runs = {}
        for method in methods:
            model = build(name)
            attached = st.create(model, method, total_steps=total)
            optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
            attached.bind(optimizer)
            runs[method] = (torch.compile(model) if args.compile else model, attached, optimizer)

        def step(method: str, runs: dict = runs) -> float:
            model, attached, optimizer = runs[method]
            start = time.perf_counter()
            loss = model(input_ids=ids, labels=ids).loss
            optimizer.zero_grad()
            loss.backward()
            attached.before_optimizer_step()
            optimizer.step()
            attached.step()
            return time.perf_counter() - start

        times: dict[str, list[float]] = {method: [] for method in methods}
        for index in range(WARMUP + args.steps):
            turn = index % len(methods)  # interleaved, the order rotating: every method sees the same moments
            for method in methods[turn:] + methods[:turn]:
                elapsed = step(method)
                if index >= WARMUP:
                    times[method].append(elapsed)
        dense = statistics.median(times["dense"])
        for method in methods:
            median = statistics.median(times[method])
            paired = statistics.median(t / d for t, d in zip(times[method], times["dense"]))
            print(f"| {name} | {method} | {1e3 * median:.1f} | {100 * (median / dense - 1):+.1f} % | {100 * (paired - 1):+.1f} % | "
                  f"{paired_overhead(times[method], times['dense'])} |")


if __name__ == "__main__":
    main()
