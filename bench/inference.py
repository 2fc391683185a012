"""Inference speed and load memory of the family, as ratios measured in one run.

    python bench/inference.py --model runs/flex                  # a trained LlamaFlex checkpoint
    python bench/inference.py --memory_only --hidden 1024        # load memory on a larger random model

Speed: for the parent (budget 1) and each budget, prompt processing (one forward over `--prompt` tokens) and
greedy generation (`--new` tokens with the KV cache) in tokens/s, medians of `--repeats` interleaved runs,
for the extracted plain `LlamaForCausalLM` and for `from_pretrained(..., budget=b)`, next to the ratios of
their parameter counts (the physical limit on a CPU is about the ratio of total parameters).

Memory: peak resident memory of a fresh process that loads the full checkpoint, loads it at budget 0.5,
or loads the extracted sub-model, minus that of a process that only imports the libraries.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from modeling_llamaflex import LlamaFlexForCausalLM


def count(model) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    embed = model.get_input_embeddings().weight.numel()
    head = 0 if model.config.tie_word_embeddings else model.get_output_embeddings().weight.numel()
    return total, total - embed - head


@torch.no_grad()
def timings(model, ids: torch.Tensor, new: int) -> tuple[float, float]:
    start = time.perf_counter()
    model(ids, use_cache=False)
    prompt = time.perf_counter() - start
    start = time.perf_counter()
    model.generate(ids[:, :8], max_new_tokens=new, min_new_tokens=new, do_sample=False)
    return prompt, time.perf_counter() - start


def speed(args) -> None:
    flex = LlamaFlexForCausalLM.from_pretrained(args.model).eval()
    budgets = [float(b) for b in args.budgets] if args.budgets else list(flex.config.budgets)
    torch.manual_seed(0)
    ids = torch.randint(3, flex.config.vocab_size, (1, args.prompt))
    models = {"parent": flex.extract(1.0)}
    for b in budgets:
        models[f"extract {b:g}"] = flex.extract(b)
        models[f"load {b:g}"] = LlamaFlexForCausalLM.from_pretrained(args.model, budget=b).eval()
    for m in models.values():  # warm-up
        timings(m, ids, 4)
    runs = {k: [] for k in models}
    for _ in range(args.repeats):
        for name, m in models.items():
            runs[name].append(timings(m, ids, args.new))
    med = {k: (statistics.median(r[0] for r in v), statistics.median(r[1] for r in v)) for k, v in runs.items()}
    total0, nonemb0 = count(models["parent"])
    print(f"threads {torch.get_num_threads()}; prompt {args.prompt} tokens; {args.new} generated tokens; median of {args.repeats}\n")
    print("| model | non-emb. params (ratio) | total params (ratio) | prompt tok/s (speed-up) | generation tok/s (speed-up) |")
    print("|---|---:|---:|---:|---:|")
    for name, m in models.items():
        total, nonemb = count(m)
        p, g = med[name]
        pp, gp = med["parent"]
        print(f"| {name} | {nonemb:,} ({nonemb / nonemb0:.2f}) | {total:,} ({total / total0:.2f}) | "
              f"{args.prompt / p:,.0f} ({pp / p:.2f}x) | {args.new / g:,.0f} ({gp / g:.2f}x) |")


MEASURE = """
import sys, torch
from transformers import AutoModelForCausalLM
import modeling_llamaflex
kind, path = sys.argv[1], sys.argv[2]
if kind == "full":
    m = AutoModelForCausalLM.from_pretrained(path)
elif kind == "budget":
    m = AutoModelForCausalLM.from_pretrained(path, budget=0.5)
elif kind == "extracted":
    m = AutoModelForCausalLM.from_pretrained(path)
if kind != "baseline":  # a forward touches every weight: lazily mapped pages become resident
    with torch.no_grad():
        m(torch.ones(1, 8, dtype=torch.long))
# VmHWM, not ru_maxrss: the latter is inherited from the (large) parent process across fork and exec
print([int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")][0])
"""


def memory(args) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 3,
                             num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                             num_key_value_heads=max(1, args.hidden // 256), head_dim=64)
        flex = LlamaFlexForCausalLM.from_llama(LlamaForCausalLM(config))
        flex.save_pretrained(os.path.join(tmp, "flex"))
        flex.extract(0.5).save_pretrained(os.path.join(tmp, "sub"))
        total = sum(p.numel() for p in flex.parameters())
        del flex
        script = MEASURE
        rss = {}
        for kind, path in [("baseline", "-"), ("full", "flex"), ("budget", "flex"), ("extracted", "sub")]:
            out = subprocess.run([sys.executable, "-c", script, kind, os.path.join(tmp, path)], capture_output=True, text=True, check=True)
            rss[kind] = int(out.stdout.strip().splitlines()[-1]) / 1024  # MiB (VmHWM is in KiB)
        print(f"random LlamaFlex: hidden {args.hidden}, {args.layers} layers, {total / 1e6:.0f}M parameters, fp32\n")
        print("| load | peak RSS MiB | above baseline MiB | ratio to full |\n|---|---:|---:|---:|")
        base = rss["baseline"]
        for kind in ("full", "budget", "extracted"):
            print(f"| {kind} | {rss[kind]:,.0f} | {rss[kind] - base:,.0f} | {(rss[kind] - base) / (rss['full'] - base):.2f} |")
        print(json.dumps(rss))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="runs/flex")
    parser.add_argument("--budgets", nargs="*")
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--memory_only", action="store_true")
    parser.add_argument("--speed_only", action="store_true")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=4096)
    args = parser.parse_args()
    if not args.memory_only:
        speed(args)
    if not args.speed_only:
        memory(args)


if __name__ == "__main__":
    main()
