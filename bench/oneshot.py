"""The one-shot family (no training): the old rule (largest size within tolerance) against the quality-ranked
search, on a grid of budgets, scored by held-out loss (issue 11, bench/QUALITY.md).

    python bench/oneshot.py --parent smollm2-135m --out bench/results/oneshot_smollm2.json
    python bench/oneshot.py --parent runs/toy-parent --out bench/results/oneshot_toy.json

Both families come from the same parent and calibration blocks (training text). "size rule" is what
`from_llama` did first: activation importance, and the largest exportable combination within ±5% of each
budget, no RMSNorm gains. "quality" is today's default: `--importance` scorers, and the candidates ranked by measured KL to the
parent on the last `--score` calibration blocks (`modeling_llamaflex.search`), scored for every budget of the grid;
`--with_norm_gains` adds the same family with the hidden widths' RMSNorm gains (`convert.calibrate_norm_gains`). Each sub-model
is run sliced on held-out blocks (the validation plays) and its mean next-token loss is reported with the
standard error over blocks of its difference to the parent's loss (paired: the same blocks).
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
import torch.nn.functional as F

from modeling_llamaflex import Compensation, LlamaFlexForCausalLM
from modeling_llamaflex.architecture import smallest_budget
from modeling_llamaflex.configuration_llamaflex import LlamaFlexConfig, default_choices

from bench.common import CALIBRATION_TEXTS, CHOICES_HELP, EVAL_TEXTS, load_parent_and_blocks, parse_choices


OLD_IMPORTANCE = {"hidden": "activation", "heads": "activation", "mlp": "activation", "depth": "block_influence"}


@torch.no_grad()
def block_losses(model, blocks: torch.Tensor, batch_size: int = 4, **forward) -> torch.Tensor:
    """(blocks,): mean next-token loss of each block."""
    model.eval()
    out = []
    for start in range(0, len(blocks), batch_size):
        ids = blocks[start : start + batch_size]
        logits = model(input_ids=ids, use_cache=False, **forward).logits[:, :-1].float()
        loss = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        out.append(loss.mean(-1))
    return torch.cat(out)


def family(flex, grid, held_out, parent_losses, batch_size, compensation=None) -> list[dict]:
    rows = []
    for budget in grid:
        if compensation is None:
            arch = flex.architecture(budget)
            losses = block_losses(flex, held_out, batch_size, architecture=arch)
        else:  # the extracted plain Llama, o_proj and down_proj refitted (modeling_llamaflex.compensation)
            arch = compensation.architecture(flex, budget)
            losses = block_losses(flex.extract(arch, compensation=compensation), held_out, batch_size)
        diff = losses - parent_losses
        rows.append({"budget": budget, "hidden": arch.hidden, "heads": arch.heads, "mlp": arch.mlp, "depth": arch.depth,
                     "fraction": arch.num_parameters / flex.config.parent_parameters(), "note": arch.note,
                     "loss": float(losses.mean()), "delta": float(diff.mean()),
                     "delta_se": float(diff.std() / len(diff) ** 0.5)})
        print(f"  {budget:.3f}: {arch.hidden}/{arch.heads}/{arch.mlp}/{arch.depth}  loss {rows[-1]['loss']:.3f} "
              f"(+{rows[-1]['delta']:.3f} ± {rows[-1]['delta_se']:.3f})", flush=True)
    return rows


def size_rule_grid(parent_config, points: int) -> list[float]:
    """`points` budgets from the smallest the first release's choices reach (MLP and depth in eighths) to 1."""
    first = default_choices(parent_config, steps=8)
    config = LlamaFlexConfig.from_llama_config(parent_config, mlp_choices=first["mlp_choices"],
                                               depth_choices=first["depth_choices"])
    return torch.linspace(smallest_budget(config), 1.0, points).tolist()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parent", default="smollm2-135m")
    p.add_argument("--calibration", default="32x256", help="importance calibration blocks NxT (training text)")
    p.add_argument("--score", default="8x256", help="the last N calibration blocks score the candidates (N of NxT)")
    p.add_argument("--eval", default="16x256", help="held-out blocks NxT (validation text)")
    p.add_argument("--eval_text", default="shakespeare", choices=EVAL_TEXTS,
                   help="held-out text: the validation plays; modern news prose (the Lee corpus, from PyPI's gensim), "
                        "all of it or the 120 articles that news calibration never sees (news_heldout)")
    p.add_argument("--calibration_text", default="shakespeare", choices=CALIBRATION_TEXTS,
                   help="calibration (and scoring) text: the training plays, or the first 180 news articles")
    p.add_argument("--importance", default=None, help="scorer name or JSON {axis: name} (default: the library's)")
    p.add_argument("--grid", type=int, default=20, help="budgets from the smallest reachable to 1")
    p.add_argument("--top_k", type=int, default=8)
    p.add_argument("--choices", default=None, help="for the quality families: " + CHOICES_HELP)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--keep", action="store_true",
                   help="keep the families already in --out that this run does not measure (e.g. the size rule)")
    p.add_argument("--label", default="quality", help="the name of the quality family in the results")
    p.add_argument("--skip_size_rule", action="store_true", help="do not measure the size rule (its grid is kept)")
    p.add_argument("--with_norm_gains", action="store_true",
                   help="also the quality family converted with norm_correction=True (RMSNorm gains per hidden width)")
    p.add_argument("--compensation_ridge", type=float, nargs="*", default=[],
                   help="also each quality family extracted with least-squares compensation on the calibration "
                        "blocks (modeling_llamaflex.Compensation), one family per ridge λ given")
    p.add_argument("--compensation_same_architectures", action="store_true",
                   help="compensate the quality family's own architectures instead of ranking the candidates by "
                        "their compensated KL (Compensation.score, the default)")
    p.add_argument("--compensation_data", default=None, metavar="NxT",
                   help="the compensation's covariances from this many blocks of the calibration text (default: "
                        "the --calibration blocks)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    start = time.time()
    parent, calib, held_out, info = load_parent_and_blocks(args.parent, args.calibration, args.eval,
                                                          eval_text=args.eval_text,
                                                          calibration_text=args.calibration_text)
    score = calib[-int(args.score.split("x")[0]):] if args.score else calib  # the last N calibration blocks
    parent_losses = block_losses(parent, held_out, args.batch_size)
    importance = json.loads(args.importance) if args.importance and args.importance.startswith("{") else args.importance
    choices = parse_choices(args.choices)
    result = {"parent": info, "args": vars(args), "parent_loss": float(parent_losses.mean()), "families": {}}
    print(f"parent {args.parent}: held-out loss {result['parent_loss']:.4f}")

    grid = None
    if not args.skip_size_rule:
        t0 = time.time()
        first = default_choices(parent.config, steps=8)  # the first release's choices: MLP and depth in eighths
        old = LlamaFlexForCausalLM.from_llama(parent, calib, importance=OLD_IMPORTANCE, top_k=0, progress=False,
                                              mlp_choices=first["mlp_choices"], depth_choices=first["depth_choices"],
                                              norm_correction=False)
        grid = size_rule_grid(parent.config, args.grid)
        print("size rule (activation importance, largest within tolerance):")
        result["families"]["size rule"] = {"convert_seconds": round(time.time() - t0, 1),
                                           "rows": family(old, grid, held_out, parent_losses, args.batch_size)}
        del old
    kept = {}
    if args.keep and os.path.exists(args.out):
        with open(args.out) as fh:
            kept = json.load(fh)
        grid = grid or kept["grid"]
    if grid is None:
        grid = size_rule_grid(parent.config, args.grid)
    result["grid"] = grid
    variants = [(args.label, False)] + ([(args.label + " + norm gains", True)] if args.with_norm_gains else [])
    for name, norm_correction in variants:
        t0 = time.time()
        new = LlamaFlexForCausalLM.from_llama(parent, calib, importance=importance, score_data=score,
                                              score_budgets=[b for b in grid if b < 1], top_k=args.top_k,
                                              norm_correction=norm_correction, **choices)
        seconds = round(time.time() - t0, 1)
        print(f"{name} (importance {importance or 'default'}, top {args.top_k}, {seconds}s to convert):")
        result["families"][name] = {"convert_seconds": seconds, "scored": len(new.config.architecture_scores["scored"]),
                                    "rows": family(new, grid, held_out, parent_losses, args.batch_size)}
        if args.compensation_ridge:
            t0 = time.time()
            blocks = calib
            if args.compensation_data:  # more blocks of the same text (the first 2M characters, evenly)
                blocks = load_parent_and_blocks(args.parent, args.compensation_data, args.eval, eval_text=args.eval_text,
                                                calibration_text=args.calibration_text)[1]
            compensation = Compensation.from_data(new, blocks, args.batch_size, progress=False)
            seconds = round(time.time() - t0, 1)
        for ridge in args.compensation_ridge:
            compensation.ridge, compensation.scores = ridge, None
            t1 = time.time()
            if not args.compensation_same_architectures:  # rank the candidates by their compensated KL
                compensation.score(new, score, budgets=[b for b in grid if b < 1], top_k=args.top_k,
                                   batch_size=args.batch_size, progress=False)
            label = f"{name} + compensation λ={ridge:g}" + (", same architectures" if args.compensation_same_architectures else "")
            label += f", statistics on {args.compensation_data}" if args.compensation_data else ""
            print(f"{label} (statistics {seconds}s, compensated search {time.time() - t1:.0f}s):")
            result["families"][label] = {
                "convert_seconds": seconds, "search_seconds": round(time.time() - t1, 1), "ridge": ridge,
                "rows": family(new, grid, held_out, parent_losses, args.batch_size, compensation)}
        del new
    for name, fam in kept.get("families", {}).items():
        if name not in result["families"]:
            result["families"][name] = {**fam, "kept_from_earlier_run": True}
    result["families"] = {n: result["families"][n] for n in sorted(result["families"], key=lambda n: n != "size rule")}
    result["seconds"] = round(time.time() - start, 1)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=2)
    print(table(result))
    return result


def table(result: dict) -> str:
    fams = result["families"]
    names = list(fams)
    lines = [f"Parent held-out loss {result['parent_loss']:.3f} nats/token. Loss above the parent's "
             f"(± standard error over {result['args']['eval']} held-out blocks of "
             f"{result['args'].get('eval_text', 'shakespeare')}); architecture hidden/heads/mlp/depth.", "",
             "| budget | " + " | ".join(f"{n}: arch | {n}: Δ loss" for n in names) + " |",
             "|---:|" + "---|---:|" * len(names)]
    for i, budget in enumerate(result["grid"]):
        cells = []
        for n in names:
            r = fams[n]["rows"][i]
            cells += [f"{r['hidden']}/{r['heads']}/{r['mlp']}/{r['depth']} ({r['fraction']:.2f})",
                      f"+{r['delta']:.3f} ± {r['delta_se']:.3f}"]
        lines.append(f"| {budget:.3f} | " + " | ".join(cells) + " |")
    for n in names:
        deltas = [r["delta"] for r in fams[n]["rows"]]
        bad = [f"{result['grid'][i + 1]:.3f}" for i in range(len(deltas) - 1) if deltas[i + 1] > deltas[i] + 1e-9]
        lines.append(f"\n{n}: larger budget with a higher loss than the one below it at: {', '.join(bad) or 'none'}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
