"""Quality of the family: one elastic LlamaFlex run against compressing every size separately, at equal tokens.

    python bench/quality.py --parent runs/toy-parent --out runs/bench-quality/toy \
        --json bench/results/quality_toy.json --plot bench/quality_toy.png   # T = 983,040 (480 steps x 8 x 256)
    python bench/quality.py --parent runs/toy-parent --steps 8 --eval_blocks 8 --variants exported \
        --out runs/bench-quality/smoke --plot ''                              # smoke run

Same parent, data, optimiser and held-out blocks for every method; every trained method sees T tokens in all:

* ``oneshot``: ``from_llama(parent, calibration, score_data=...)`` (the quality-ranked search), then ``extract(b)``.
* ``separate``: each trained budget's one-shot sub-model distilled from the frozen parent on T/N tokens.
* LlamaFlex variants (``--variants``; ``<name>_nomod``: the same without modulation, same starting weights):
  one ``FlexTrainer`` run on T tokens, then the trained budgets, a grid of ``--grid`` budgets from the smallest
  trained budget to 1, the one-shot architectures, the routers' own picks and the modulation gains.

Losses are nats/token on the extracted plain ``LlamaForCausalLM``, per held-out block; every difference comes
with its paired standard error over blocks. ``--json`` writes the summary (layout in bench/QUALITY.md), the
tables go to ``<out>/tables.md``; ``--reuse`` skips methods whose ``<out>/results-<name>.json`` has the same settings.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

from bench.common import CHOICES_HELP, ensure_shakespeare, parse_choices
from bench.quality_methods import block_losses, mean, paired, router_interpolation, run_flex, run_oneshot, run_separate, se
from modeling_llamaflex import LlamaFlexForCausalLM
from modeling_llamaflex.parents import load_parent_model, load_parent_tokenizer, resolve_parent
from modeling_llamaflex.search import ROUTER_FIT_POINTS
from training.data import DataArguments, build_lm_datasets, lm_data_collator

logger = logging.getLogger("bench.quality")

VARIANTS = {
    # the defaults before issue 12 (training/configs/cpu.yaml): 80% soft mixtures, Gumbel hard samples, hard last 20%
    "baseline": dict(full_budget_probability=0.25, hard_sample_probability=0.2, hard_phase_start=0.8,
                     hard_samples="gumbel"),
    # every sub-model sample trains exactly the sub-model that is exported; the full model as one of N + 1 sizes
    "exported": dict(full_budget_probability=0.2, hard_sample_probability=1.0, hard_samples="exported",
                     fit_routers="oneshot"),
    # as "exported", and half the sub-model draws take a budget uniform between the smallest trained and 1
    # (training the very sub-models architecture(b) exports there: the interpolated budgets)
    "exported_between": dict(full_budget_probability=0.2, hard_sample_probability=1.0, hard_samples="exported",
                             interpolated_budget_probability=0.5, fit_routers="oneshot"),
    # as "exported", with the routers also fitted between the trained budgets (41 budgets, each the best measured
    # within its tolerance: `search.router_fit_family`, what conversion now does), so their own argmax is on budget
    "exported_dense": dict(full_budget_probability=0.2, hard_sample_probability=1.0, hard_samples="exported",
                           fit_routers="oneshot_dense"),
    # as "exported_dense", and at the end of training the routers are fitted to the family the model then exports
    # (`refit_routers`: during training they follow their budget loss only and drift from it)
    "exported_dense_refit": dict(full_budget_probability=0.2, hard_sample_probability=1.0, hard_samples="exported",
                                 fit_routers="oneshot_dense", refit_routers=True),
    # both: routers fitted between the trained budgets, and half the sub-model draws at a budget between them
    "exported_dense_between": dict(full_budget_probability=0.2, hard_sample_probability=1.0, hard_samples="exported",
                                   interpolated_budget_probability=0.5, fit_routers="oneshot_dense"),
    # as "exported_dense_between" with the routers frozen at conversion's fit (no budget loss: with exported hard
    # samples it is their only gradient), so no trained budget's argmax moves while the budgets between train
    "exported_dense_between_frozen": dict(full_budget_probability=0.2, hard_sample_probability=1.0,
                                          hard_samples="exported", interpolated_budget_probability=0.5,
                                          fit_routers="oneshot_dense", budget_loss_weight=0.0),
    # the CPU recipes since session 11: as "exported_dense" with the routers held at conversion's fit (no budget loss)
    # and refitted to the exported family when training ends
    "exported_dense_frozen": dict(full_budget_probability=0.2, hard_sample_probability=1.0, hard_samples="exported",
                                  fit_routers="oneshot_dense", budget_loss_weight=0.0, refit_routers=True),
    # sandwich rule: every optimizer step trains the full model, the smallest budget and a random other one
    "sandwich": dict(sampling_rule="sandwich", hard_sample_probability=1.0, hard_samples="exported",
                     fit_routers="oneshot"),
    # as "exported", with Flextron's one-hot router input and routers held on budget between trained budgets
    "exported_onehot": dict(full_budget_probability=0.2, hard_sample_probability=1.0, hard_samples="exported",
                            router_budget_embedding="onehot", router_budget_samples=4, fit_routers="oneshot"),
}


def variant(name: str) -> dict:
    base = name[: -len("_nomod")] if name.endswith("_nomod") else name
    if base not in VARIANTS:
        raise SystemExit(f"unknown variant {name!r}: one of {sorted(VARIANTS)} (or <name>_nomod)")
    return {**VARIANTS[base], **({"use_modulation": False} if name.endswith("_nomod") else {})}


def fmt(loss, err=None) -> str:
    return f"{loss:.4f}" if err is None else f"{loss:.4f} ± {err:.4f}"


def diff(a: dict, b: dict) -> str:
    d, e = paired(a["blocks"], b["blocks"])
    return f"{d:+.4f} ± {e:.4f}"


def line_check(res: dict, budgets: list[float], x: str = "budget") -> list[dict]:
    """Each grid budget against the straight line between its trained neighbours (1 = the full model).

    `x` "budget": the line in nominal budget (a grid budget at b against the trained budgets around b);
    "size": the line in exported size, the fraction of the parent's non-embedding parameters on the plot's axis
    (each point where its sub-model really is: a grid budget that exports a trained budget's sub-model is that
    point, on the line).
    """
    def where(b: float, row: dict) -> float:
        return b if x == "budget" else row["fraction"]

    anchors = {b: res["rows"][f"{b:g}"] for b in budgets}
    anchors[1.0] = res["grid"][f"{1.0:.4g}"]
    points = sorted((where(b, row), b) for b, row in anchors.items())
    out, previous = [], None
    for key, row in sorted(res["grid"].items(), key=lambda kv: float(kv[0])):
        b = float(key)
        at = where(b, row)
        lo_at, lo = max((p for p in points if p[0] <= at), default=points[0])
        hi_at, hi = min((p for p in points if p[0] >= at), default=points[-1])
        w = 0.0 if hi_at == lo_at else (at - lo_at) / (hi_at - lo_at)
        line = [(1 - w) * x + w * y for x, y in zip(anchors[lo]["blocks"], anchors[hi]["blocks"])]
        d, e = paired(row["blocks"], line)
        step = None if previous is None else paired(row["blocks"], previous["blocks"])
        out.append({"budget": b, "row": row, "line": mean(line), "above_line": d, "se": e, "step": step,
                    "trained_neighbours": (lo, hi)})
        previous = row
    return out


def chord_gaps(res: dict, budgets: list[float]) -> list[tuple[float, float]]:
    """How convex the trained points are: each inner trained sub-model's loss below the straight line (in exported
    size) between its two neighbours (the full model at 1). Between two adjacent trained sizes a convex curve
    through them sits about a quarter of this below their chord (for a parabola, exactly): the most an untrained
    sub-model between them may lose to being less trained and still be on the line."""
    pts = [(res["rows"][f"{b:g}"]["fraction"], res["rows"][f"{b:g}"]["loss"], b) for b in sorted(budgets)]
    pts.append((1.0, res["grid"][f"{1.0:.4g}"]["loss"], 1.0))
    out = []
    for (x0, y0, _), (x1, y1, b), (x2, y2, _) in zip(pts, pts[1:], pts[2:]):
        out.append((b, y0 + (x1 - x0) / (x2 - x0) * (y2 - y0) - y1))
    return out


COMPENSATED = ("oneshot_compensated", "separate_compensated")  # opt-in baselines (--compensated)


def tables(results: dict, meta: dict, names: list[str]) -> str:
    budgets = meta["budgets"]
    out = [f"Parent: {meta['parent_label']}, held-out loss {fmt(meta['parent_loss'], meta['parent_se'])} on "
           f"{meta['eval_blocks']} blocks x {meta['block_size']}; T = {meta['tokens_per_method']:,} tokens per trained method.\n"]
    cols = [m for m in ("oneshot", "separate") + COMPENSATED if m in results] + names
    out.append("| budget | " + " | ".join(f"{c}: arch" + ("" if c == "oneshot" else "") + f" | {c}: loss" for c in cols)
               + "".join(f" | {n} − separate" for n in names if "separate" in results) + " |")
    out.append("|---:|" + "---|---:|" * len(cols) + "---:|" * (len(names) if "separate" in results else 0))
    for b in budgets:
        k = f"{b:g}"
        cells = []
        for c in cols:
            r = results[c]["rows"][k]
            cells += [short_arch(r), fmt(r["loss"], r["se"])]
        if "separate" in results:
            cells += [diff(results[n]["rows"][k], results["separate"]["rows"][k]) for n in names]
        out.append(f"| {k} | " + " | ".join(cells) + " |")
    out.append("")
    if "separate_compensated" in results:
        out.append("Against separate distillation from the compensated one-shot sub-models (same architectures): "
                   + "; ".join(f"{n}: " + ", ".join(f"{b:g}: {diff(results[n]['rows'][f'{b:g}'], results['separate_compensated']['rows'][f'{b:g}'])}"
                                                  for b in budgets) for n in names) + ".\n")
        for n in (n for n in names if "compensated" in results[n]):
            rows = results[n]["compensated"]["rows"]
            out.append(f"{n}'s exports compensated after training (statistics of the trained model; "
                       f"{results[n]['compensated']['seconds']:.0f} s): " + ", ".join(
                           f"{b:g}: {fmt(rows[f'{b:g}']['loss'], rows[f'{b:g}']['se'])} ({diff(rows[f'{b:g}'], results['separate_compensated']['rows'][f'{b:g}'])} "
                           f"vs separate_compensated, {diff(rows[f'{b:g}'], results[n]['rows'][f'{b:g}'])} vs uncompensated)"
                           for b in budgets) + ".\n")
    for n in names:
        res = results[n]
        out.append(f"### {n}: {res['variant']}\n")
        out.append(f"Full model {fmt(res['full_model']['loss'], res['full_model']['se'])}; samples {res['samples']}; "
                   f"{res['optimizer_steps']} optimizer steps x {res['gradient_accumulation']} micro-batches; "
                   f"{res['train_tokens']:,} tokens; train {res['train_s']:.0f} s; approx. {res['approx_train_flops']:.3g} "
                   f"training FLOPs; routers agree with the export at every budget: **{res['router_agrees']}**.\n")
        out.append("Token share of a separate run's T/N, per budget: " + ", ".join(
            f"{b}: {s:.2f}" for b, s in res["token_share_of_separate"].items()) + f" (full model: "
            f"{res['tokens_per_budget'].get('1', 0) / max(res['train_tokens'], 1):.2f} of all tokens).\n")
        if "separate" in results:
            out.append("At the one-shot architectures (equal sizes): " + ", ".join(
                f"{k}: {fmt(r['loss'])} ({diff(r, results['separate']['rows'][k])} vs separate)"
                for k, r in res["at_oneshot_architectures"].items()) + ".\n")
        gains = res.get("modulation_gains") or {}
        if any(gains.values()):
            out.append("Modulation gains |g − 1| at the exported architectures (max / mean): " + ", ".join(
                f"{k}: {g['max_abs']:.4f} / {g['mean_abs']:.4f}" for k, g in gains.items() if g) + ".\n")
        out.append("| budget | fraction | exported arch | router's own pick | agree | loss | line between trained "
                   "neighbours | above line | above the line in size | vs previous budget |")
        out.append("|---:|---:|---|---|---|---:|---:|---:|---:|---:|")
        by_budget, by_size = line_check(res, budgets), line_check(res, budgets, x="size")
        for c, z in zip(by_budget, by_size):
            pick = res["picks"].get(f"{c['budget']:.4g}", {})
            step = "" if c["step"] is None else f"{c['step'][0]:+.4f} ± {c['step'][1]:.4f}"
            out.append(f"| {c['budget']:.4g} | {c['row']['fraction']:.3f} | {short_arch(c['row'])} | "
                       f"{pick.get('router', 'parent')} | {pick.get('agree', True)} | {fmt(c['row']['loss'], c['row']['se'])} | "
                       f"{c['line']:.4f} | {c['above_line']:+.4f} ± {c['se']:.4f} | {z['above_line']:+.4f} ± {z['se']:.4f} | {step} |")
        worst = max((c["step"][0] for c in by_budget if c["step"] is not None), default=0.0)
        above = max(by_budget, key=lambda c: c["above_line"])
        above_size = max(by_size, key=lambda c: c["above_line"])
        out.append(f"\nLargest rise from one grid budget to the next larger: {worst:+.4f}; largest excess over the line: "
                   f"{above['above_line']:+.4f} ± {above['se']:.4f} (at {above['budget']:.4g}); in size: "
                   f"{above_size['above_line']:+.4f} ± {above_size['se']:.4f} (at {above_size['budget']:.4g}).\n")
        out.append("What the line leaves to spare: each inner trained sub-model lies below the chord of its outer "
                   "neighbours (in size) by " + ", ".join(f"{b:g}: {g:+.4f}" for b, g in chord_gaps(res, budgets))
                   + "; a convex curve through the trained points sits about a quarter of that below the chord of "
                   "two adjacent ones. Exported size / budget: trained " + ", ".join(
                       f"{res['rows'][f'{b:g}']['fraction'] / b:.3f}" for b in budgets) + "; grid " + ", ".join(
                       f"{c['row']['fraction'] / c['budget']:.3f}" for c in by_budget if c["budget"] < 1) + ".\n")
    mods = [(n, n + "_nomod") for n in names if n + "_nomod" in results and not n.endswith("_nomod")]
    for a, b in mods:
        out.append(f"### Modulation ablation: {a} against {b} (same starting weights, same architectures)\n")
        out.append("| budget | architecture | with modulation | without | without − with |")
        out.append("|---:|---|---:|---:|---:|")
        for k, r in results[a]["at_oneshot_architectures"].items():
            s = results[b]["at_oneshot_architectures"][k]
            out.append(f"| {k} | {short_arch(r)} | {fmt(r['loss'], r['se'])} | {fmt(s['loss'], s['se'])} | {diff(s, r)} |")
        out.append("")
    if "router_interpolation" in results:
        out.append("### Routers' own argmax between trained budgets, straight after conversion (fitted to the trained budgets)\n")
        out.append("| embedding | on budget (±5%) | same as the nearest trained budget's |")
        out.append("|---|---:|---:|")
        for emb in ("sinusoidal", "onehot"):
            r = results["router_interpolation"][emb]
            out.append(f"| {emb} | {r['on_budget']} of {r['of']} | {r['same_as_nearest_trained']} of {r['of']} |")
        out.append("")
    return "\n".join(out)


def short_arch(r: dict) -> str:
    return f"{r['hidden']}/{r['heads']}/{r['mlp']}/{r['depth']}" if "hidden" in r else "parent"


def summary(results: dict, meta: dict, flex: str) -> dict:
    """The layout of bench/results/quality_<parent>.json (issue 12)."""
    loss = lambda name: {k: r["loss"] for k, r in results[name]["rows"].items()} if name in results else {}
    # the modulation ablation: flex against <flex>_nomod, or else the first variant measured both ways (named)
    pairs = [n for n in results if n + "_nomod" in results]
    ablated = flex if flex in pairs else (pairs[0] if pairs else flex)
    out = {"parent": meta["parent"], "parent_loss": meta["parent_loss"], "tokens_per_method": meta["tokens_per_method"],
           "modulation_ablation": {"with": ablated, "without": ablated + "_nomod"},
           "methods": {"oneshot": loss("oneshot"), "separate": loss("separate"), "flex": loss(flex),
                       "flex_no_modulation": loss(ablated + "_nomod"),
                       **{m: loss(m) for m in COMPENSATED if m in results}},
           "grid": {k: r["loss"] for k, r in results[flex]["grid"].items()} if flex in results else {},
           "router_agrees": bool(results.get(flex, {}).get("router_agrees", False)),
           "flex_variant": flex, "variant_settings": {n: results[n]["variant"] for n in results if "variant" in results[n]},
           "variants": {n: loss(n) for n in results if "variant" in results[n]},
           "standard_errors": {m: {k: r["se"] for k, r in results[m]["rows"].items()} for m in results if "rows" in results[m]},
           "flex_minus_separate": {}, "meta": {k: v for k, v in meta.items() if k != "args"}}
    if flex in results:  # each grid budget's excess over the line between trained neighbours, (mean, SE)
        out["grid_above_line"] = {x: {f"{c['budget']:.4g}": [c["above_line"], c["se"]]
                                      for c in line_check(results[flex], meta["budgets"], x=x)} for x in ("budget", "size")}
    if "separate" in results:
        for n in out["variants"]:
            out["flex_minus_separate"][n] = {k: paired(r["blocks"], results["separate"]["rows"][k]["blocks"])
                                             for k, r in results[n]["rows"].items()}
    return out


def plot(results: dict, meta: dict, names: list[str], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    for m, st in (("oneshot", "s"), ("separate", "o")):
        if m in results:
            rows = sorted(results[m]["rows"].values(), key=lambda r: r["parameters"])
            ax.plot([r["parameters"] / 1e6 for r in rows], [r["loss"] for r in rows], st + "-", label=m)
    for n in names:
        rows = sorted(results[n]["grid"].values(), key=lambda r: r["parameters"])
        ax.plot([r["parameters"] / 1e6 for r in rows], [r["loss"] for r in rows], ".-", alpha=0.8, label=f"{n} (grid)")
    ax.axhline(meta["parent_loss"], color="black", ls=":", label=f"{meta['parent_label']}: {meta['parent_loss']:.3f}")
    ax.set_xlabel("non-embedding parameters (M)")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title(f"T = {meta['tokens_per_method']:,} tokens per method", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parent", default="runs/toy-parent", help="a Llama folder, a .gguf, or smollm2-135m")
    p.add_argument("--train_file", default=".cache/shakespeare/train.txt")
    p.add_argument("--validation_file", default=".cache/shakespeare/validation.txt")
    p.add_argument("--block_size", type=int, default=256)
    p.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.625, 0.75, 0.875])
    p.add_argument("--grid", type=int, default=20, help="budgets from the smallest trained one to 1")
    p.add_argument("--steps", type=int, default=480, help="micro-batches of each elastic run (T = steps x batch x block)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--learning_rate", type=float, default=3e-4)
    p.add_argument("--router_learning_rate", type=float, default=2e-3)
    p.add_argument("--modulation_learning_rate", type=float, default=2e-3)
    p.add_argument("--warmup_steps", type=int, default=10)
    p.add_argument("--calibration_blocks", type=int, default=128)
    p.add_argument("--score_blocks", type=int, default=16, help="training blocks after the calibration ones")
    p.add_argument("--eval_blocks", type=int, default=128)
    p.add_argument("--eval_batch_size", type=int, default=16)
    p.add_argument("--logging_steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", nargs="+", default=["exported", "exported_nomod", "baseline", "sandwich", "exported_onehot"])
    p.add_argument("--flex", default="exported", help="the variant reported as 'flex' in --json (the default recipe)")
    p.add_argument("--skip", nargs="*", default=[], help="methods not to run: oneshot, separate, router_interpolation")
    p.add_argument("--compensated", action="store_true",
                   help="also the baselines with least-squares compensation (modeling_llamaflex.Compensation, same "
                        "architectures): oneshot_compensated, separate_compensated")
    p.add_argument("--compensation_blocks", type=int, default=256,
                   help="the compensation's covariances from the first N training blocks (default 256, as "
                        "`extract --compensate_on`; session 9's runs used the 16 calibration blocks: too few tokens "
                        "per refitted input, see QUALITY.md)")
    p.add_argument("--reuse", action="store_true")
    p.add_argument("--rescore", action="store_true",
                   help="after each elastic run, score the candidates again on the trained weights and measure the grid "
                        "again (reported as <variant>+rescored)")
    p.add_argument("--choices", default="", help=CHOICES_HELP)
    p.add_argument("--out", default="runs/bench-quality")
    p.add_argument("--json", default="")
    p.add_argument("--plot", default="bench/quality_toy.png")
    args = p.parse_args(argv)
    for name in args.variants:
        variant(name)

    os.makedirs(args.out, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        handlers=[logging.StreamHandler(), logging.FileHandler(os.path.join(args.out, "quality.log"))])
    logging.getLogger("transformers").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    source = resolve_parent(args.parent)  # a folder, a .gguf or a built-in name (smollm2-135m)
    tokenizer = load_parent_tokenizer(source)
    ensure_shakespeare(os.path.dirname(args.train_file))
    data = build_lm_datasets(DataArguments(train_file=args.train_file, validation_file=args.validation_file,
                                           block_size=args.block_size), tokenizer)
    val_blocks = torch.tensor(data["validation"][: args.eval_blocks]["input_ids"])
    c, s = args.calibration_blocks, args.score_blocks
    calibration = torch.tensor(data["train"][:c]["input_ids"])
    score = torch.tensor(data["train"][c:c + s]["input_ids"])
    parent = load_parent_model(source).eval()
    parent_blocks = block_losses(parent, val_blocks, args.eval_batch_size)
    torch.manual_seed(args.seed)
    converted = os.path.join(args.out, "converted.pt")  # conversion takes minutes on busy cores: kept for --reuse
    if args.reuse and os.path.exists(converted):
        flex0 = torch.load(converted, weights_only=False)
    else:
        choices = parse_choices(args.choices)
        flex0 = LlamaFlexForCausalLM.from_llama(parent, calibration, score_data=score, progress=False, budgets=args.budgets,
                                                **choices)
        torch.save(flex0, converted)
    P = flex0.config.parent_parameters()
    low = min(args.budgets)
    grid = [low + (1 - low) * i / (args.grid - 1) for i in range(args.grid)]
    meta = {"command": "python bench/quality.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "parent": os.path.basename(os.path.normpath(args.parent)), "parent_parameters": P,
            "parent_label": f"parent ({P / 1e6:.2f}M non-embedding)", "parent_loss": mean(parent_blocks),
            "parent_se": se(parent_blocks), "budgets": args.budgets, "grid": grid, "eval_blocks": len(val_blocks),
            "block_size": args.block_size, "tokens_per_method": args.steps * args.batch_size * args.block_size,
            "choices": flex0.config.choices, "layer_ranking": flex0.config.layer_ranking, "torch": torch.__version__}
    logger.info("parent loss %.4f; T = %d; one-shot: %s", meta["parent_loss"], meta["tokens_per_method"],
                {b: str(flex0.architecture(b)) for b in args.budgets})
    ctx = {"parent": parent, "flex0": flex0, "train": data["train"], "val_blocks": val_blocks, "grid": grid,
           "collator": lm_data_collator(tokenizer), "score": score, "calibration": calibration,
           "compensation_data": torch.tensor(data["train"][: args.compensation_blocks]["input_ids"]),
           "oneshot_arch": {b: flex0.architecture(b) for b in args.budgets}}
    settings = {k: v for k, v in vars(args).items()
                if k not in ("variants", "flex", "skip", "reuse", "out", "json", "plot", "threads", "rescore", "compensated",
                             "compensation_blocks")
                and (k != "choices" or v)}  # (results made before --choices existed stay reusable)
    results = {}
    baselines = ("oneshot", "separate", "router_interpolation") + (COMPENSATED if args.compensated else ())
    todo = [m for m in baselines if m not in args.skip] + list(args.variants)
    for name in todo:
        path = os.path.join(args.out, f"results-{name}.json")
        # (a variant run with --compensated also measures its exports compensated; without, it is reused as it is)
        own = {**settings, "compensation_blocks": args.compensation_blocks} if name in COMPENSATED else settings
        spec = {} if name in baselines else variant(name)  # the dense fit and the refit both use the fit points
        if spec.get("fit_routers") == "oneshot_dense" or spec.get("refit_routers"):  # (41 before 2026-12-08)
            own = {**own, "router_fit_points": ROUTER_FIT_POINTS}
        if args.reuse and os.path.exists(path):
            with open(path) as fh:
                stored = json.load(fh)
            if stored.get("settings") == own:
                results[name] = stored
                logger.info("reusing %s", path)
                continue
        logger.info("==== %s (load average %s)", name, os.getloadavg())
        start = time.perf_counter()
        if name in ("oneshot", "oneshot_compensated"):
            res = run_oneshot(ctx, args, compensated=name.endswith("_compensated"))
        elif name in ("separate", "separate_compensated"):
            res = run_separate(ctx, args, compensated=name.endswith("_compensated"))
        elif name == "router_interpolation":
            res = router_interpolation(ctx, args)
        else:
            res = run_flex(ctx, args, name, variant(name))
        res["settings"], res["wall_s"], res["load_average"] = own, round(time.perf_counter() - start, 1), os.getloadavg()
        results[name] = res
        with open(path + ".tmp", "w") as fh:
            json.dump(res, fh)
        os.replace(path + ".tmp", path)
        logger.info("==== %s done in %.0f s", name, res["wall_s"])
    names = [n for n in args.variants if n in results]
    for n in list(names):  # --rescore: the same run, its grid exported with scores measured after training
        if "rescored" in results[n]:
            extra = results[n]["rescored"]
            results[n + "+rescored"] = {**results[n], **extra, "variant": {**results[n]["variant"], "rescored": True}}
            names.append(n + "+rescored")
    meta["wall_s"] = round(time.perf_counter() - t0, 1)
    text = tables(results, meta, names)
    with open(os.path.join(args.out, "tables.md"), "w") as fh:
        fh.write(text + "\n")
    if args.json and args.flex in results:
        with open(args.json, "w") as fh:
            json.dump(summary(results, meta, args.flex), fh, indent=1)
    if args.plot and names:
        plot(results, meta, names, args.plot)
    print(text)
    return {"meta": meta, "results": results}


if __name__ == "__main__":
    main()
