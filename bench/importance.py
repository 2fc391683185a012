"""Does importance match harm? Drop costs of every axis under every scorer (issue 11, bench/QUALITY.md).

    python bench/importance.py --parent smollm2-135m --out bench/results/importance_smollm2.json
    python bench/importance.py --parent runs/pipeline-toy/parent --out bench/results/importance_toy.json

For each scorer in `modeling_llamaflex.importance.SCORERS` the parent is converted (`from_llama`, ranked on
calibration blocks of the training text) and these are measured on *other* held-out blocks (the validation
plays), as mean next-token loss (nats/token):

* heads: zero, in every layer, the query head at rank position p of every KV group (p = 0 is the head ranked
  most important): a good ranking makes the last position the cheapest to drop;
* every axis: the sub-model that cuts only that axis to each of its choices (the others full), run sliced.

A scorer that matches harm gives the lowest loss at every cut. Results go to --out as JSON and to stdout as
Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

from modeling_llamaflex import LlamaFlexForCausalLM
from modeling_llamaflex.architecture import make_architecture
from modeling_llamaflex.configuration_llamaflex import AXES
from modeling_llamaflex.importance import SCORERS

from bench.common import held_out_loss, load_parent_and_blocks


def head_position_costs(flex, blocks, batch_size) -> list[float]:
    """Loss with the head at rank position p of every KV group zeroed in every layer, for each p."""
    cfg = flex.config
    per_group, d = cfg.num_attention_heads // cfg.num_key_value_heads, cfg.head_dim
    costs = []
    for p in range(per_group):
        def zero(module, args, p=p):
            x = args[0].clone()
            view = x.view(*x.shape[:-1], cfg.num_key_value_heads, per_group, d)
            view[..., p, :] = 0
            return (x,)

        hooks = [layer.self_attn.o_proj.register_forward_pre_hook(zero) for layer in flex.model.layers]
        try:
            costs.append(held_out_loss(flex, blocks, batch_size))
        finally:
            for h in hooks:
                h.remove()
    return costs


def single_axis_costs(flex, blocks, batch_size) -> dict[str, dict[int, float]]:
    """Loss of the sub-model that cuts one axis to each of its choices (the others at their full size)."""
    cfg = flex.config
    full = {a: len(cfg.choices[a]) - 1 for a in AXES}
    out = {}
    for axis in AXES:
        out[axis] = {}
        for i, value in enumerate(cfg.choices[axis][:-1]):
            idx = dict(full, **{axis: i})
            arch = make_architecture(cfg, idx)
            out[axis][value] = {
                "loss": held_out_loss(flex, blocks, batch_size, architecture=arch),
                "fraction": arch.num_parameters / cfg.parent_parameters(),
            }
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parent", default="smollm2-135m")
    p.add_argument("--calibration", default="8x128", help="calibration blocks, NxT (training text)")
    p.add_argument("--eval", default="8x256", help="held-out blocks, NxT (validation text)")
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--scorers", nargs="*", help="scorer names to compare (default: every one)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    start = time.time()
    parent, calib, held_out, info = load_parent_and_blocks(args.parent, args.calibration, args.eval)
    names = args.scorers or sorted({n for ns in SCORERS.values() for n in ns})
    result = {"parent": info, "calibration": args.calibration, "eval": args.eval,
              "parent_loss": held_out_loss(parent, held_out, args.batch_size), "scorers": {}}
    print(f"parent {info['name']}: held-out loss {result['parent_loss']:.4f}")
    for name in names:
        importance = {a: name for a, ns in SCORERS.items() if name in ns}
        t0 = time.time()
        flex = LlamaFlexForCausalLM.from_llama(parent, calib, batch_size=args.batch_size, importance=importance,
                                              top_k=0)
        entry = {"axes": list(importance), "convert_seconds": round(time.time() - t0, 1)}
        if "heads" in importance:
            entry["head_positions"] = head_position_costs(flex, held_out, args.batch_size)
        costs = single_axis_costs(flex, held_out, args.batch_size)
        entry["single_axis"] = {a: costs[a] for a in importance}
        result["scorers"][name] = entry
        print(name, json.dumps(entry))
        del flex
    result["seconds"] = round(time.time() - start, 1)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=2)
    print(tables(result))
    return result


def tables(result: dict) -> str:
    positions = max((len(e["head_positions"]) for e in result["scorers"].values() if "head_positions" in e), default=0)
    lines = [f"Parent held-out loss {result['parent_loss']:.3f} nats/token; calibration {result['calibration']}, "
             f"held-out {result['eval']}.", "", "Head rank position dropped in every KV group (0 = ranked first):", "",
             "| scorer | " + " | ".join(f"drop pos. {i}" for i in range(positions)) + " |",
             "|---|" + "---:|" * positions]
    for name, e in result["scorers"].items():
        if "head_positions" in e:
            lines.append(f"| {name} | " + " | ".join(f"{c:.3f}" for c in e["head_positions"]) + " |")
    for axis in AXES:
        rows = [(n, e["single_axis"][axis]) for n, e in result["scorers"].items() if axis in e["single_axis"]]
        if not rows:
            continue
        values = list(rows[0][1])
        lines += ["", f"Cutting only `{axis}` (loss; fraction of non-embedding parameters):", "",
                  "| scorer | " + " | ".join(f"{v} ({rows[0][1][v]['fraction']:.2f})" for v in values) + " |",
                  "|---|" + "---:|" * len(values)]
        for name, costs in rows:
            lines.append(f"| {name} | " + " | ".join(f"{costs[v]['loss']:.3f}" for v in values) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
