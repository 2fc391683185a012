"""Training-step time of the elastic model against a plain `LlamaForCausalLM` of the parent's size, in one run.

    python bench/train_step.py                 # the CPU parent's shape, batch 8 x 256, fp32
    python bench/train_step.py --repeats 20 --budget 0.5

Each step is forward + backward + AdamW step on the same batch. Steps of the four kinds are interleaved
(plain, elastic at full size, masked at `--budget`, sliced at `--budget`) and the median of `--repeats` is
reported, as a ratio to the plain step: machine noise cancels out of the ratios, not out of the seconds.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from modeling_llamaflex import LlamaFlexForCausalLM


def parent_config(args) -> LlamaConfig:
    return LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.mlp,
                       num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                       head_dim=args.hidden // args.heads, tie_word_embeddings=True, max_position_embeddings=args.seq)


def main(argv=None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--mlp", type=int, default=704)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv_heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--budget", type=float, default=0.625)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    plain = LlamaForCausalLM(parent_config(args)).train()
    flex = LlamaFlexForCausalLM.from_llama(LlamaForCausalLM(parent_config(args)), budgets=[args.budget]).train()
    ids = torch.randint(3, args.vocab, (args.batch, args.seq))
    optimizers = {"plain": torch.optim.AdamW(plain.parameters(), lr=1e-4), "flex": torch.optim.AdamW(flex.parameters(), lr=1e-4)}
    generator = torch.Generator().manual_seed(0)
    arch = flex.architecture(args.budget)

    def step(kind: str) -> float:
        model = plain if kind == "plain" else flex
        optimizer = optimizers["plain" if kind == "plain" else "flex"]
        start = time.perf_counter()
        if kind == "plain" or kind == "full":
            loss = model(ids, labels=ids).loss
        elif kind == "masked":
            loss = flex(ids, labels=ids, budget=args.budget, route_mode="soft", generator=generator).loss
        else:  # sliced: the benchmark's architecture, as a hard sample runs it
            loss = flex(ids, labels=ids, architecture=arch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    kinds = ["plain", "full", "masked", "sliced"]
    for kind in kinds:  # warm-up
        step(kind)
    times = {k: [] for k in kinds}
    for _ in range(args.repeats):
        for kind in kinds:
            times[kind].append(step(kind))
    median = {k: statistics.median(v) for k, v in times.items()}
    params = {"parent": flex.config.parent_parameters(), "sub": arch.num_parameters}
    print(f"shape: hidden {args.hidden}, mlp {args.mlp}, {args.layers} layers, {args.heads}/{args.kv_heads} heads, "
          f"vocab {args.vocab}; batch {args.batch} x {args.seq}; torch threads {torch.get_num_threads()}")
    print(f"sliced architecture at budget {args.budget}: {arch}")
    print(f"non-embedding parameters: sub-model / parent = {params['sub'] / params['parent']:.3f}\n")
    print("| step | median s | ratio to plain Llama |\n|---|---:|---:|")
    labels = {"plain": "plain LlamaForCausalLM (parent size)", "full": "LlamaFlex, full model (b = 1)",
              "masked": f"LlamaFlex, masked (soft, b = {args.budget})", "sliced": f"LlamaFlex, sliced (hard, b = {args.budget})"}
    for kind in kinds:
        print(f"| {labels[kind]} | {median[kind]:.3f} | {median[kind] / median['plain']:.2f} |")
    return {k: median[k] / median["plain"] for k in kinds}


if __name__ == "__main__":
    main()
