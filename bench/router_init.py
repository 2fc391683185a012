"""Do routers fitted to the one-shot family train better than uniform ones? (issue 11, bench/QUALITY.md)

    python -m bench.router_init --parent runs/toy-parent --out runs/bench-router-init

The parent is converted once (default importance and quality-ranked search, `from_llama`); two copies are
trained elastically with the same data, seed and steps (`training/run.py` with the CPU default config,
teacher = the parent): **fitted** (conversion's default: router argmax at every trained budget = the one-shot
architecture) and **uniform** (the routers' last layers zeroed, as before conversion fitted them). After
training each family is extracted at its routers' architectures for the trained budgets and scored on
held-out blocks (mean next-token loss; ± the standard error over blocks of the paired difference to the
parent). One seed per variant: the spread over seeds is not measured here.
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

from modeling_llamaflex import LlamaFlexForCausalLM

from bench.common import load_parent_and_blocks
from bench.oneshot import block_losses


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parent", required=True)
    p.add_argument("--config", default="training/configs/cpu.yaml")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--calibration", default="64x256")
    p.add_argument("--score", default="8x256", help="the last N calibration blocks score the candidates")
    p.add_argument("--eval", default="32x256")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    from training.run import main as train

    parent, calib, held_out, _ = load_parent_and_blocks(args.parent, args.calibration, args.eval)
    n = int(args.score.split("x")[0])
    flex = LlamaFlexForCausalLM.from_llama(parent, calib[:-n], score_data=calib[-n:], progress=False,
                                           budgets=[0.5, 0.625, 0.75, 0.875])
    one_shot = {b: flex.architecture(b) for b in flex.config.budgets}
    os.makedirs(args.out, exist_ok=True)
    flex.save_pretrained(os.path.join(args.out, "converted-fitted"))
    with torch.no_grad():
        for head in flex.model.router.heads.values():
            head[-1].weight.zero_()
            head[-1].bias.zero_()
    flex.save_pretrained(os.path.join(args.out, "converted-uniform"))
    parent_losses = block_losses(parent, held_out)
    result = {"args": vars(args), "parent_loss": float(parent_losses.mean()),
              "one_shot": {f"{b:g}": a.to_dict() for b, a in one_shot.items()}, "variants": {}}
    for variant in ("fitted", "uniform"):
        out = os.path.join(args.out, variant)
        if not os.path.exists(os.path.join(out, "training_summary.json")):
            train([args.config, "--parent", os.path.join(args.out, f"converted-{variant}"), "--teacher", args.parent,
                   "--tokenizer", os.path.join(".cache", "shakespeare", "tokenizer-4096"), "--output_dir", out,
                   "--max_steps", str(args.steps), "--report_to", "none", "--save_strategy", "no",
                   "--overwrite_output_dir", "true"])
        trained = LlamaFlexForCausalLM.from_pretrained(out)
        rows = {}
        for b in trained.config.budgets:
            arch = trained.architecture(b)
            diff = block_losses(trained, held_out, architecture=arch) - parent_losses
            rows[f"{b:g}"] = {"arch": f"{arch.hidden}/{arch.heads}/{arch.mlp}/{arch.depth}", "note": arch.note,
                              "fraction": arch.num_parameters / trained.config.parent_parameters(),
                              "delta": float(diff.mean()), "delta_se": float(diff.std() / len(diff) ** 0.5),
                              "same_as_one_shot": arch.indices == one_shot[b].indices}
            print(variant, b, rows[f"{b:g}"], flush=True)
        result["variants"][variant] = rows
    with open(os.path.join(args.out, "results.json"), "w") as fh:
        json.dump(result, fh, indent=2)
    print(table(result))
    return result


def table(result: dict) -> str:
    lines = [f"Parent held-out loss {result['parent_loss']:.3f}; loss above it (± SE over blocks), after "
             f"{result['args']['steps']} elastic steps.", "",
             "| budget | one-shot arch | fitted: arch | fitted: Δ loss | uniform: arch | uniform: Δ loss |",
             "|---:|---|---|---:|---|---:|"]
    for b, shot in result["one_shot"].items():
        f, u = result["variants"]["fitted"][b], result["variants"]["uniform"][b]
        arch = f"{shot['hidden']}/{shot['heads']}/{shot['mlp']}/{shot['depth']}"
        lines.append(f"| {b} | {arch} | {f['arch']} | +{f['delta']:.3f} ± {f['delta_se']:.3f} | {u['arch']} | "
                     f"+{u['delta']:.3f} ± {u['delta_se']:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
