"""Quality of the family: one elastic LlamaFlex run against compressing every size separately, at equal tokens.

    python bench/quality.py --steps 4 --eval_blocks 8 --out runs/bench-quality/smoke \
        --plot runs/bench-quality/smoke/quality.png                          # smoke run (a few minutes)
    python bench/quality.py --steps 480 --out runs/bench-quality/steps480 \
        --plot runs/bench-quality/steps480/quality.png                       # longer run, T = 983,040
    python bench/quality.py --out runs/bench-quality/final \
        --also_plot runs/bench-quality/steps480                              # default, T = 245,760; bench/quality.png

Same parent, same data, the same number of training tokens T = steps x batch_size x block_size for every
trained method, and the same validation blocks for every model. The methods (see bench/QUALITY.md):

1. ``oneshot``: ``LlamaFlexForCausalLM.from_llama(parent, calibration blocks)`` then ``extract(b)``; no training.
   Untrained routers are uniform, so ``architecture(b)`` takes the largest exportable combination within the
   budget tolerance (its note says "searched").
2. ``separate``: for each trained budget, the one-shot sub-model of (1) distilled from the frozen parent
   (forward KL on logits) on T / 4 tokens with a plain ``transformers.Trainer``; same LR, schedule and batch
   as the elastic run (warmup scaled with the run length).
3. ``flex``: one ``FlexTrainer`` run on T tokens (teacher = the parent, KD only), then extraction at the
   trained budgets, at interpolated ones (router-chosen architectures), and at the architectures of (1)/(2).
   Where ``architecture(b)`` replaced the routers' own argmax (budget missed, or not exportable), that argmax
   is also measured, with the elastic model's sliced forward.
4. ``flex_nomod``: (3) with ``use_modulation=False`` (the paper's Table 4 ablation), same starting weights.
5. ``separate_router`` (control): as (2), but at the architectures that (3)'s routers exported.

Every number is the validation loss (mean nats/token over the first ``--eval_blocks`` held-out blocks) of the
*extracted plain LlamaForCausalLM*, i.e. of what a user deploys (except the routers' argmax rows). Each
method's results are written to ``<out>/results-<method>.json`` as soon as they exist; a rerun with
``--reuse`` skips methods already done with the same settings. The tables go to ``<out>/tables.md`` and the
plot to ``--plot`` (one row per run: this one, then any ``--also_plot`` folders).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, LlamaForCausalLM, Trainer, TrainingArguments, set_seed

from modeling_llamaflex import LlamaFlexForCausalLM
from modeling_llamaflex.architecture import Architecture, make_architecture, smallest_budget
from training.arguments import FlexTrainingArguments
from training.data import DataArguments, build_lm_datasets, lm_data_collator
from training.trainer import FlexTrainer, distillation_loss

logger = logging.getLogger("bench.quality")
METHODS = ("oneshot", "separate", "flex", "flex_nomod", "separate_router")
LABELS = {
    "parent": "parent (4.23M)",
    "oneshot": "1. one-shot pruning (no training)",
    "separate": "2. pruned + distilled separately (T/4 each)",
    "flex": "3. LlamaFlex (one run, T)",
    "flex_nomod": "4. LlamaFlex without modulation (one run, T)",
    "separate_router": "5. control: distilled separately at LlamaFlex's router architectures (T/4 each)",
}


# ---------------------------------------------------------------- helpers

def non_embedding_parameters(model: LlamaForCausalLM) -> int:
    """Parameters outside the token embedding and the LM head (the parent's tied embedding is not counted)."""
    skip = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


@torch.no_grad()
def validation_loss(model, blocks: torch.Tensor, batch_size: int, **forward) -> float:
    """Mean next-token cross-entropy (nats/token) over all predicted positions of `blocks` (fp32)."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        ids = blocks[start:start + batch_size]
        logits = model(input_ids=ids, **forward).logits[:, :-1].float()
        targets = ids[:, 1:]
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum").item()
        count += targets.numel()
    return total / count


def arch_fields(arch: Architecture) -> dict:
    return {"hidden": arch.hidden, "heads": arch.heads, "mlp": arch.mlp, "depth": arch.depth,
            "kept_layers": list(arch.kept_layers), "arch_parameters": arch.num_parameters,
            "indices": dict(arch.indices), "note": arch.note}


def evaluate_sub(flex, spec, blocks, args, **info) -> dict:
    """Extract `spec` (a budget or an Architecture) as a plain Llama and measure it."""
    arch = spec if isinstance(spec, Architecture) else flex.architecture(spec)
    start = time.perf_counter()
    sub = flex.extract(arch)
    loss = validation_loss(sub, blocks, args.eval_batch_size)
    params = non_embedding_parameters(sub)
    if params != arch.num_parameters:  # the closed form and the real model must agree
        raise RuntimeError(f"{arch}: extracted model has {params:,} non-embedding parameters")
    row = {**info, **arch_fields(arch), "non_embedding_parameters": params,
           "fraction_of_parent": params / flex.config.parent_parameters(), "val_loss": loss,
           "eval_s": round(time.perf_counter() - start, 1)}
    logger.info("  %s: %s -> val loss %.4f", info, arch, loss)
    return row


def save_json(path: str, data) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=2)
    os.replace(tmp, path)


def log_history(trainer) -> list[dict]:
    return [{k: v for k, v in entry.items()} for entry in trainer.state.log_history]


class DistillationTrainer(Trainer):
    """A plain `Trainer` whose loss is the forward KL from a frozen teacher's logits (method 2)."""

    def __init__(self, *args, teacher=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher = teacher.eval().requires_grad_(False)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        forward = {"input_ids": inputs["input_ids"], "attention_mask": inputs.get("attention_mask")}
        outputs = model(**forward)
        with torch.no_grad():
            teacher_logits = self.teacher(**forward).logits
        loss = distillation_loss(outputs.logits, teacher_logits, forward["attention_mask"], 1.0)
        return (loss, outputs) if return_outputs else loss


def common_training_kwargs(args, output_dir: str, steps: int) -> dict:
    """Identical optimisation settings for every trained method; warmup scales with the run length."""
    warmup = max(1, round(args.warmup_steps * steps / args.steps))
    return dict(output_dir=output_dir, max_steps=steps, per_device_train_batch_size=args.batch_size,
                learning_rate=args.learning_rate, lr_scheduler_type="cosine", warmup_steps=warmup,
                weight_decay=0.0, max_grad_norm=1.0, logging_steps=args.logging_steps, save_strategy="no",
                eval_strategy="no", report_to="none", dataloader_num_workers=0, seed=args.seed,
                disable_tqdm=True, use_cpu=True)


# ---------------------------------------------------------------- methods

def run_oneshot(ctx, args) -> dict:
    flex0, blocks = ctx["flex0"], ctx["val_blocks"]
    rows = []
    for b in args.budgets:
        rows.append(evaluate_sub(flex0, b, blocks, args, budget=b, kind="explicit", chooser="search (untrained router)"))
    for b in ctx["interpolated"]:
        rows.append(evaluate_sub(flex0, b, blocks, args, budget=b, kind="other budget", chooser="search (untrained router)"))
    return {"rows": rows}


def run_separate(ctx, args, router_architectures: dict | None = None) -> dict:
    """Method 2 at the one-shot architectures; with `router_architectures` (budget -> indices), the control 5."""
    flex0, parent, data = ctx["flex0"], ctx["parent"], ctx["datasets"]
    steps = max(1, round(args.steps / len(args.budgets)))
    rows, histories, wall = [], {}, {}
    chooser = "one-shot architecture" if router_architectures is None else "LlamaFlex router architecture"
    for b in args.budgets:
        if router_architectures is None:
            arch = flex0.architecture(b)
        else:
            arch = make_architecture(flex0.config, router_architectures[b], budget=b, note="LlamaFlex router architecture")
        student = flex0.extract(arch).train().requires_grad_(True)
        set_seed(args.seed)
        folder = f"separate-b{b:g}" if router_architectures is None else f"separate-router-b{b:g}"
        targs = TrainingArguments(**common_training_kwargs(args, os.path.join(args.out, folder), steps))
        trainer = DistillationTrainer(model=student, args=targs, teacher=parent, train_dataset=data["train"],
                                      data_collator=ctx["collator"])
        start = time.perf_counter()
        result = trainer.train()
        wall[f"{b:g}"] = round(time.perf_counter() - start, 1)
        histories[f"{b:g}"] = log_history(trainer)
        loss = validation_loss(student, ctx["val_blocks"], args.eval_batch_size)
        params = non_embedding_parameters(student)
        rows.append({"budget": b, "kind": "explicit", "chooser": chooser, **arch_fields(arch),
                     "non_embedding_parameters": params, "fraction_of_parent": params / flex0.config.parent_parameters(),
                     "val_loss": loss, "train_steps": steps, "train_tokens": steps * args.batch_size * args.block_size,
                     "train_s": wall[f"{b:g}"], "train_metrics": result.metrics})
        logger.info("separate b=%g: %s -> val loss %.4f (%.0f s)", b, arch, loss, wall[f"{b:g}"])
        del trainer, student
    return {"rows": rows, "train_s": wall, "steps_per_budget": steps,
            "train_tokens": steps * len(args.budgets) * args.batch_size * args.block_size, "log_history": histories}


def run_flex(ctx, args, use_modulation: bool) -> dict:
    name = "flex" if use_modulation else "flex_nomod"
    if use_modulation:
        flex = copy.deepcopy(ctx["flex0"])
    else:
        torch.manual_seed(args.seed)
        flex = LlamaFlexForCausalLM.from_llama(ctx["parent"], ctx["calibration"], progress=False,
                                               budgets=args.budgets, use_modulation=False)
        # the same starting point as `flex` (ranking, weights and router initialisation), modulation aside
        shared = {k: v for k, v in ctx["flex0"].state_dict().items() if ".modulation." not in k}
        flex.load_state_dict(shared, strict=True)
    set_seed(args.seed)
    targs = FlexTrainingArguments(
        **common_training_kwargs(args, os.path.join(args.out, name), args.steps),
        router_learning_rate=args.router_learning_rate, modulation_learning_rate=args.modulation_learning_rate,
        distillation_weight=1.0, lm_loss_weight=0.0, full_budget_probability=args.full_budget_probability,
        hard_sample_probability=args.hard_sample_probability, hard_phase_start=args.hard_phase_start,
    )
    trainer = FlexTrainer(model=flex, args=targs, teacher_model=ctx["parent"], train_dataset=ctx["datasets"]["train"],
                          data_collator=ctx["collator"])
    start = time.perf_counter()
    result = trainer.train()
    train_s = round(time.perf_counter() - start, 1)
    flex.eval()
    rows = []
    for b in args.budgets:
        rows.append(evaluate_sub(flex, b, ctx["val_blocks"], args, budget=b, kind="explicit", chooser="router"))
    for b in ctx["interpolated"]:
        kind = "interpolated" if min(args.budgets) <= b <= max(args.budgets) else "extrapolated"
        rows.append(evaluate_sub(flex, b, ctx["val_blocks"], args, budget=b, kind=kind, chooser="router"))
    # The routers' own argmax, when `architecture(b)` replaced it (it missed the budget tolerance, or its hidden
    # size is not a multiple of its head count, which transformers.LlamaConfig refuses): measured with the
    # elastic model's sliced forward, since it cannot be extracted. This is what hard samples trained.
    for r in list(rows):
        with torch.no_grad():
            logits = flex.model.router(torch.tensor(r["budget"]))
        raw = make_architecture(flex.config, {a: int(v.argmax()) for a, v in logits.items()}, budget=r["budget"])
        if raw.indices == r["indices"]:
            continue
        loss = validation_loss(flex, ctx["val_blocks"], args.eval_batch_size, policy=flex.model.policy_for(architecture=raw))
        exportable = raw.hidden % raw.heads == 0
        rows.append({"budget": r["budget"], "kind": r["kind"], "chooser": "router argmax, sliced forward", **arch_fields(raw),
                     "non_embedding_parameters": raw.num_parameters,
                     "fraction_of_parent": raw.num_parameters / flex.config.parent_parameters(), "val_loss": loss,
                     "exportable": exportable})
        logger.info("  router argmax at %g (%s): %s -> val loss %.4f (sliced)", r["budget"],
                    "exportable" if exportable else "NOT exportable", raw, loss)
    for b in args.budgets:  # the one-shot / separate architectures, for a comparison at equal size
        arch = make_architecture(flex.config, ctx["oneshot_arch"][b].indices, budget=b, note="one-shot architecture")
        rows.append(evaluate_sub(flex, arch, ctx["val_blocks"], args, budget=b, kind="explicit", chooser="one-shot architecture"))
    # the router's architectures with the untrained (one-shot) weights: is the choice or the training the gain?
    untrained = [evaluate_sub(ctx["flex0"], make_architecture(ctx["flex0"].config, r["indices"], budget=r["budget"]),
                              ctx["val_blocks"], args, budget=r["budget"], kind=r["kind"],
                              chooser=f"{name} router architecture, one-shot weights")
                 for r in rows if r["chooser"] == "router"]
    full = validation_loss(flex, ctx["val_blocks"], args.eval_batch_size)
    logger.info("%s: full model (b=1) val loss %.4f", name, full)
    if args.save_models:
        flex.save_pretrained(os.path.join(args.out, name, "model"))
    return {"rows": rows, "oneshot_at_router_architectures": untrained, "train_s": train_s, "train_metrics": result.metrics, "full_model_val_loss": full,
            "train_tokens": args.steps * args.batch_size * args.block_size,
            "tokens_per_budget": {f"{b:g}": n for b, n in sorted(trainer.tokens_per_budget.items())},
            "samples": trainer.sample_log, "architectures_at_end": trainer.architecture_report(),
            "log_history": log_history(trainer)}


# ---------------------------------------------------------------- report

def fmt_row(row: dict, parent_loss: float, parent_layers: int) -> str:
    layers = "" if row["depth"] == parent_layers else f" (layers {','.join(map(str, row['kept_layers']))})"
    if row.get("exportable") is False:
        layers += " **not exportable**"
    return (f"| {row['budget']:g} | {row['kind']} | {row['chooser']} | {row['hidden']} / {row['heads']} / {row['mlp']} / "
            f"{row['depth']}{layers} | {row['non_embedding_parameters']:,} ({row['fraction_of_parent']:.3f}) | "
            f"{row['val_loss']:.4f} | {row['val_loss'] - parent_loss:+.4f} |")


def tables(results: dict, meta: dict) -> str:
    parent_loss = meta["parent_val_loss"]
    head = ("| budget | kind | architecture from | hidden / heads / mlp / depth | non-emb. params (fraction) | "
            "val loss | vs parent |\n|---:|---|---|---|---:|---:|---:|")
    out = [f"Parent: {meta['parent_parameters']:,} non-embedding parameters, validation loss **{parent_loss:.4f}** "
           f"(first {meta['eval_blocks']} validation blocks, {meta['eval_tokens']:,} predicted tokens). "
           f"T = {meta['tokens_per_method']:,} training tokens per trained method. Wall time of the methods: "
           + ", ".join(f"{m} {s:.0f} s" for m, s in meta["method_wall_s"].items()) + ".\n"]
    for method in METHODS:
        if method not in results:
            continue
        res = results[method]
        extra = ""
        if "train_s" in res:
            t = res["train_s"] if not isinstance(res["train_s"], dict) else sum(res["train_s"].values())
            extra = f" Training: {res['train_tokens']:,} tokens, {t:.0f} s."
        if "full_model_val_loss" in res:
            extra += f" Full model (b = 1) after training: {res['full_model_val_loss']:.4f}."
        out.append(f"### {LABELS[method]}\n\n" + (f"{extra.strip()}\n\n" if extra else "") + head)
        order = {"router": 0, "router argmax, sliced forward": 1}
        layers = max(meta["choices"]["depth"])
        out += [fmt_row(r, parent_loss, layers)
                for r in sorted(res["rows"], key=lambda r: (order.get(r["chooser"], 2), r["kind"] != "explicit", r["budget"]))]
        out.append("")
    # side by side at equal architectures
    if "separate" in results:
        cols = [m for m in METHODS if m in results and m != "separate_router"]
        out.append("### Side by side at the one-shot architectures (equal size for every method)\n")
        out.append("| budget | architecture (h / heads / mlp / depth) | non-emb. params | " + " | ".join(LABELS[m].split(" (")[0] for m in cols) + " |")
        out.append("|---:|---|---:|" + "---:|" * len(cols))
        for row in results["separate"]["rows"]:
            b, cells = row["budget"], []
            for m in cols:
                match = [r for r in results[m]["rows"] if r["budget"] == b and r["kind"] == "explicit"
                         and (m == "oneshot" or r["chooser"] == "one-shot architecture")]
                cells.append(f"{match[0]['val_loss']:.4f}" if match else "-")
            out.append(f"| {b:g} | {row['hidden']} / {row['heads']} / {row['mlp']} / {row['depth']} | "
                       f"{row['non_embedding_parameters']:,} | " + " | ".join(cells) + " |")
        out.append("")
    if "flex" in results and "flex_nomod" in results:
        out.append("### Modulation ablation: every sub-network side by side\n")
        out.append("| budget | kind | architecture from | with modulation: arch, loss | without: arch, loss | without − with |")
        out.append("|---:|---|---|---|---|---:|")
        for r in results["flex"]["rows"]:
            if r["chooser"] == "router argmax, sliced forward":
                continue
            match = [s for s in results["flex_nomod"]["rows"] if s["budget"] == r["budget"] and s["chooser"] == r["chooser"]]
            if not match:
                continue
            s = match[0]
            a = lambda x: f"{x['hidden']}/{x['heads']}/{x['mlp']}/{x['depth']}"
            out.append(f"| {r['budget']:g} | {r['kind']} | {r['chooser']} | {a(r)}, {r['val_loss']:.4f} | "
                       f"{a(s)}, {s['val_loss']:.4f} | {s['val_loss'] - r['val_loss']:+.4f} |")
        out.append("")
    if "flex" in results and "separate_router" in results:
        out.append("### Side by side at LlamaFlex's router architectures (equal size: the training is the only difference)\n")
        out.append("| budget | architecture (h / heads / mlp / depth) | non-emb. params | one-shot weights | "
                   "distilled separately (T/4 each) | LlamaFlex (one run, T) | LlamaFlex − separate |")
        out.append("|---:|---|---:|---:|---:|---:|---:|")
        untrained = {(u["budget"], u["kind"]): u for u in results["flex"].get("oneshot_at_router_architectures", [])}
        for r in results["separate_router"]["rows"]:
            f = [x for x in results["flex"]["rows"] if x["budget"] == r["budget"] and x["chooser"] == "router"][0]
            u = untrained.get((r["budget"], "explicit"))
            out.append(f"| {r['budget']:g} | {r['hidden']} / {r['heads']} / {r['mlp']} / {r['depth']} | "
                       f"{r['non_embedding_parameters']:,} | {u['val_loss']:.4f} | {r['val_loss']:.4f} | {f['val_loss']:.4f} | "
                       f"{f['val_loss'] - r['val_loss']:+.4f} |" if u else "")
        out.append("")
    for method in ("flex", "flex_nomod"):
        if method not in results or "oneshot_at_router_architectures" not in results[method]:
            continue
        out.append(f"### {LABELS[method].split(' (')[0]}: its router's architectures with one-shot (untrained) weights\n")
        out.append("| budget | kind | hidden / heads / mlp / depth | non-emb. params | one-shot weights | after elastic training | gain |")
        out.append("|---:|---|---|---:|---:|---:|---:|")
        trained = [r for r in results[method]["rows"] if r["chooser"] == "router"]
        for r, u in zip(trained, results[method]["oneshot_at_router_architectures"]):
            out.append(f"| {r['budget']:g} | {r['kind']} | {r['hidden']} / {r['heads']} / {r['mlp']} / {r['depth']} | "
                       f"{r['non_embedding_parameters']:,} | {u['val_loss']:.4f} | {r['val_loss']:.4f} | "
                       f"{r['val_loss'] - u['val_loss']:+.4f} |")
        out.append("")
    return "\n".join(out)


def load_run(folder: str) -> tuple[dict, dict]:
    """The results and meta.json that an earlier run left in `folder`."""
    results = {}
    for method in METHODS:
        path = os.path.join(folder, f"results-{method}.json")
        if os.path.exists(path):
            with open(path) as fh:
                results[method] = json.load(fh)
    with open(os.path.join(folder, "meta.json")) as fh:
        return results, json.load(fh)


def plot(runs: list[tuple[dict, dict]], path: str) -> None:
    """One row of two panels (every method; trained methods zoomed) per run, e.g. two values of T."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {
        "oneshot": dict(color="tab:gray", marker="s"),
        "separate": dict(color="tab:blue", marker="o"),
        "flex": dict(color="tab:red", marker="^"),
        "flex_nomod": dict(color="tab:orange", marker="v"),
        "separate_router": dict(color="tab:green", marker="D"),
    }
    suffix = {None: "", "router": ", router-chosen", "one-shot architecture": ", at the one-shot architectures",
              "router argmax, sliced forward": ", routers' own argmax (sliced forward; mostly not exportable)"}
    fig, grid = plt.subplots(len(runs), 2, figsize=(14, 5.2 * len(runs) + 0.9), squeeze=False)
    for (results, meta), axes in zip(runs, grid):
        for ax, zoom in zip(axes, (False, True)):
            for method, res in results.items():
                if method not in styles or (zoom and method == "oneshot"):
                    continue
                st = styles[method]
                groups = [("router", "-"), ("one-shot architecture", "--"), ("router argmax, sliced forward", "")] \
                    if method.startswith("flex") else [(None, "-")]
                for chooser, ls in groups:
                    rows = sorted((r for r in res["rows"] if chooser is None or r["chooser"] == chooser),
                                  key=lambda r: r["non_embedding_parameters"])
                    if not rows:
                        continue
                    x = [r["non_embedding_parameters"] / 1e6 for r in rows]
                    y = [r["val_loss"] for r in rows]
                    label = LABELS[method] + suffix[chooser]
                    if not ls:  # the routers' own argmax: crosses, no line
                        ax.plot(x, y, "x", color=st["color"], ms=8, mew=2, label=label)
                        continue
                    ax.plot(x, y, ls=ls, color=st["color"], label=label, alpha=0.9 if ls == "-" else 0.6)
                    for r, xi, yi in zip(rows, x, y):
                        hollow = r["kind"] != "explicit"
                        ax.plot(xi, yi, st["marker"], color=st["color"], mfc="white" if hollow else st["color"],
                                ms=7 if ls == "-" else 5, alpha=0.9 if ls == "-" else 0.6)
            ax.axhline(meta["parent_val_loss"], color="black", ls=":",
                       label=f"parent ({meta['parent_parameters'] / 1e6:.2f}M): {meta['parent_val_loss']:.3f}")
            ax.set_xlabel("non-embedding parameters (M)")
            ax.set_ylabel(f"validation loss (nats/token, {meta['eval_blocks']} held-out blocks)")
            ax.grid(alpha=0.3)
            ax.set_title(f"T = {meta['tokens_per_method']:,} tokens per method: "
                         + ("all methods" if not zoom else "trained methods (zoom)"), fontsize=10)
    handles, labels = grid[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.suptitle("Family quality at equal training tokens (filled: trained budgets; hollow: interpolated / other budgets)",
                 fontsize=11)
    fig.tight_layout(rect=(0, 0.9 / (5.2 * len(runs) + 0.9) * 1.6, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- main

def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parent", default="runs/parent")
    p.add_argument("--train_file", default=".cache/shakespeare/train.txt")
    p.add_argument("--validation_file", default=".cache/shakespeare/validation.txt")
    p.add_argument("--block_size", type=int, default=256)
    p.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.625, 0.75, 0.875])
    p.add_argument("--interpolated", type=float, nargs="+", default=[0.45, 0.5625, 0.6875, 0.8125],
                   help="untrained budgets to query (skipped with a note if the choices cannot reach them)")
    p.add_argument("--steps", type=int, default=120, help="optimizer steps of each elastic run; the separate runs get steps/4 each")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--learning_rate", type=float, default=3e-4)
    p.add_argument("--router_learning_rate", type=float, default=2e-3)
    p.add_argument("--modulation_learning_rate", type=float, default=2e-3)
    p.add_argument("--warmup_steps", type=int, default=10, help="warmup of a --steps run; shorter runs scale it down")
    p.add_argument("--full_budget_probability", type=float, default=0.25)
    p.add_argument("--hard_sample_probability", type=float, default=0.2)
    p.add_argument("--hard_phase_start", type=float, default=0.8)
    p.add_argument("--calibration_blocks", type=int, default=128)
    p.add_argument("--eval_blocks", type=int, default=128, help="the first N validation blocks (same for every model)")
    p.add_argument("--eval_batch_size", type=int, default=16)
    p.add_argument("--logging_steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--reuse", action="store_true", help="skip methods whose results-<method>.json exists in --out")
    p.add_argument("--save_models", action="store_true", help="also save the trained elastic models")
    p.add_argument("--out", default="runs/bench-quality")
    p.add_argument("--plot", default="bench/quality.png")
    p.add_argument("--also_plot", nargs="*", default=[], metavar="DIR",
                   help="earlier runs' --out folders to draw as extra rows of the figure (e.g. a longer run)")
    args = p.parse_args(argv)

    os.makedirs(args.out, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        handlers=[logging.StreamHandler(), logging.FileHandler(os.path.join(args.out, "quality.log"))])
    logging.getLogger("transformers").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    tokenizer = AutoTokenizer.from_pretrained(args.parent)
    data = build_lm_datasets(DataArguments(train_file=args.train_file, validation_file=args.validation_file,
                                           block_size=args.block_size), tokenizer)
    val_blocks = torch.tensor(data["validation"][: args.eval_blocks]["input_ids"])
    calibration = torch.tensor(data["train"][: args.calibration_blocks]["input_ids"])
    parent = LlamaForCausalLM.from_pretrained(args.parent, dtype=torch.float32).eval()
    parent_loss = validation_loss(parent, val_blocks, args.eval_batch_size)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    flex0 = LlamaFlexForCausalLM.from_llama(parent, calibration, progress=False, budgets=args.budgets)
    convert_s = time.perf_counter() - start
    low = smallest_budget(flex0.config)
    interpolated = [b for b in args.interpolated if b >= low]
    if len(interpolated) < len(args.interpolated):
        logger.warning("skipping budgets below the smallest reachable (%.4f): %s", low,
                       [b for b in args.interpolated if b < low])
    tokens = args.steps * args.batch_size * args.block_size
    meta = {
        "command": "python bench/quality.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "args": vars(args), "parent_parameters": flex0.config.parent_parameters(), "parent_val_loss": parent_loss,
        "eval_blocks": len(val_blocks), "eval_tokens": int(val_blocks[:, 1:].numel()), "tokens_per_method": tokens,
        "choices": flex0.config.choices, "layer_ranking": flex0.config.layer_ranking, "smallest_budget": low,
        "interpolated": interpolated, "convert_s": round(convert_s, 1), "torch_threads": torch.get_num_threads(),
        "load_average_start": os.getloadavg(), "torch": torch.__version__,
    }
    logger.info("parent val loss %.4f on %d blocks; T = %d tokens per method; choices %s", parent_loss, len(val_blocks),
                tokens, flex0.config.choices)
    ctx = {"parent": parent, "flex0": flex0, "datasets": data, "val_blocks": val_blocks, "calibration": calibration,
           "collator": lm_data_collator(tokenizer), "interpolated": interpolated,
           "oneshot_arch": {b: flex0.architecture(b) for b in args.budgets}}

    # what a stored result must have been made with to be reused
    settings = {k: v for k, v in vars(args).items()
                if k not in ("methods", "reuse", "save_models", "out", "plot", "also_plot", "threads")}
    results, walls = {}, {}
    for method in METHODS:
        path = os.path.join(args.out, f"results-{method}.json")
        if args.reuse and os.path.exists(path):
            with open(path) as fh:
                stored = json.load(fh)
            if stored.get("settings") == settings:
                results[method] = stored
                logger.info("reusing %s", path)
                continue
            logger.warning("not reusing %s: it was made with other settings", path)
        if method not in args.methods:
            continue
        logger.info("==== %s (load average %s)", method, os.getloadavg())
        start = time.perf_counter()
        if method == "oneshot":
            res = run_oneshot(ctx, args)
        elif method == "separate":
            res = run_separate(ctx, args)
        elif method == "separate_router":
            if "flex" not in results:
                logger.warning("separate_router needs the flex results (run the flex method first); skipped")
                continue
            res = run_separate(ctx, args, {r["budget"]: r["indices"] for r in results["flex"]["rows"]
                                           if r["chooser"] == "router" and r["kind"] == "explicit"})
        else:
            res = run_flex(ctx, args, use_modulation=method == "flex")
        res["settings"] = settings
        res["wall_s"] = round(time.perf_counter() - start, 1)
        res["load_average_end"] = os.getloadavg()
        results[method] = res
        walls[method] = res["wall_s"]
        save_json(path, res)
        logger.info("==== %s done in %.0f s -> %s", method, res["wall_s"], path)

    meta["wall_s"] = round(time.perf_counter() - t0, 1)
    meta["method_wall_s"] = {m: r.get("wall_s") for m, r in results.items()}
    meta["methods_wall_s_total"] = round(sum(r.get("wall_s") or 0 for r in results.values()), 1)
    meta["load_average_end"] = os.getloadavg()
    save_json(os.path.join(args.out, "meta.json"), meta)
    text = tables(results, meta)
    with open(os.path.join(args.out, "tables.md"), "w") as fh:
        fh.write(text + "\n")
    if args.plot:
        plot([(results, meta)] + [load_run(folder) for folder in args.also_plot], args.plot)
    print(text)
    logger.info("total wall time %.0f s; tables in %s, plot in %s", meta["wall_s"], os.path.join(args.out, "tables.md"), args.plot)
    return {"meta": meta, "results": results}


if __name__ == "__main__":
    main()
