"""The methods of `bench/quality.py`: one-shot, pruned + distilled separately, and LlamaFlex runs (variants).

Every loss is measured per held-out block (`block_losses`), so that a difference between two models comes with
its paired standard error over blocks (`paired`). Sizes come from the one parameter counter
(`Architecture.num_parameters`, the config's closed form).
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from collections import Counter

import torch
import torch.nn.functional as F
from transformers import Trainer, TrainingArguments, set_seed

from modeling_llamaflex import Compensation, LlamaFlexForCausalLM
from modeling_llamaflex.architecture import Architecture, is_full, make_architecture, search_architecture
from modeling_llamaflex.search import fit_routers, router_fit_family, score_architectures
from training.arguments import FlexTrainingArguments
from training.trainer import INTERPOLATED, FlexTrainer, budget_key, distillation_loss, sorted_buckets

logger = logging.getLogger("bench.quality")


# ---------------------------------------------------------------- measuring

@torch.no_grad()
def block_losses(model, blocks: torch.Tensor, batch_size: int = 16, **forward) -> list[float]:
    """Mean next-token cross-entropy (nats/token) of each held-out block, fp32 (equal tokens per block)."""
    model.eval()
    out = []
    for start in range(0, len(blocks), batch_size):
        ids = blocks[start:start + batch_size]
        logits = model(input_ids=ids, use_cache=False, **forward).logits[:, :-1].float()
        ce = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")  # (batch, tokens)
        out += ce.mean(-1).tolist()
    return out


def mean(xs) -> float:
    return sum(xs) / len(xs)


def se(xs) -> float:
    m = mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs)) if len(xs) > 1 else float("nan")


def paired(a: list[float], b: list[float]) -> tuple[float, float]:
    """(mean of a − b, its standard error over blocks)."""
    d = [x - y for x, y in zip(a, b)]
    return mean(d), se(d)


def arch_row(arch: Architecture, parent_parameters: int) -> dict:
    return {"hidden": arch.hidden, "heads": arch.heads, "mlp": arch.mlp, "depth": arch.depth,
            "indices": dict(arch.indices), "parameters": arch.num_parameters,
            "fraction": arch.num_parameters / parent_parameters, "note": arch.note}


def short(arch) -> str:
    a = arch if isinstance(arch, dict) else arch_row(arch, 1)
    return f"{a['hidden']}/{a['heads']}/{a['mlp']}/{a['depth']}"


def measure_sub(flex, spec, blocks, batch_size, cache: dict | None = None, compensation=None) -> dict:
    """Extract `spec` (a budget or an Architecture) as a plain Llama and measure it per block (`cache`: the
    losses already measured for these weights, by architecture, since many budgets share one; `compensation`:
    extracted with least-squares compensation)."""
    arch = spec if isinstance(spec, Architecture) else flex.architecture(spec)
    key = tuple(sorted(arch.indices.items()))
    if cache is not None and key in cache:
        losses = cache[key]
    else:
        losses = block_losses(flex.extract(arch, compensation=compensation), blocks, batch_size)
        if cache is not None:
            cache[key] = losses
    return {**arch_row(arch, flex.config.parent_parameters()), "loss": mean(losses), "se": se(losses), "blocks": losses}


# ---------------------------------------------------------------- training

class DistillationTrainer(Trainer):
    """A plain `Trainer` whose loss is the forward KL from a frozen teacher's logits (separate distillation)."""

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


def training_kwargs(args, output_dir: str, steps: int, accumulation: int = 1) -> dict:
    """Identical optimisation for every trained method; warmup scales with the run's optimizer steps."""
    warmup = max(1, round(args.warmup_steps * steps / args.steps))
    return dict(output_dir=output_dir, max_steps=steps, per_device_train_batch_size=args.batch_size,
                gradient_accumulation_steps=accumulation, learning_rate=args.learning_rate, lr_scheduler_type="cosine",
                warmup_steps=warmup, weight_decay=0.0, max_grad_norm=1.0, logging_steps=args.logging_steps,
                save_strategy="no", eval_strategy="no", report_to="none", dataloader_num_workers=0, seed=args.seed,
                disable_tqdm=True, use_cpu=True)


def compensation(ctx):
    """The least-squares compensation of the converted model on the `--compensation_blocks` (computed once)."""
    if "compensation" not in ctx:
        ctx["compensation"] = Compensation.from_data(ctx["flex0"], ctx["compensation_data"], progress=False)
    return ctx["compensation"]


def run_oneshot(ctx, args, compensated: bool = False) -> dict:
    """The one-shot sub-models of the trained budgets; `compensated`: the same architectures, extracted with
    least-squares compensation (modeling_llamaflex.Compensation on `--compensation_blocks` training blocks)."""
    flex0, comp = ctx["flex0"], compensation(ctx) if compensated else None
    return {"rows": {f"{b:g}": measure_sub(flex0, ctx["oneshot_arch"][b], ctx["val_blocks"], args.eval_batch_size,
                                           compensation=comp) for b in args.budgets}}


def run_separate(ctx, args, compensated: bool = False) -> dict:
    """Each trained budget's one-shot sub-model distilled from the frozen parent on T/N tokens (`compensated`:
    starting from the compensated one-shot sub-model, the baseline a user who compensates would train)."""
    flex0, n = ctx["flex0"], len(args.budgets)
    comp = compensation(ctx) if compensated else None
    steps = max(1, round(args.steps / n))
    rows, wall = {}, {}
    for b in args.budgets:
        arch = ctx["oneshot_arch"][b]
        student = flex0.extract(arch, compensation=comp).train().requires_grad_(True)
        set_seed(args.seed)
        name = "separate_compensated" if compensated else "separate"
        targs = TrainingArguments(**training_kwargs(args, os.path.join(args.out, f"{name}-b{b:g}"), steps))
        trainer = DistillationTrainer(model=student, args=targs, teacher=ctx["parent"], train_dataset=ctx["train"],
                                      data_collator=ctx["collator"])
        start = time.perf_counter()
        trainer.train()
        wall[f"{b:g}"] = round(time.perf_counter() - start, 1)
        losses = block_losses(student, ctx["val_blocks"], args.eval_batch_size)
        rows[f"{b:g}"] = {**arch_row(arch, flex0.config.parent_parameters()), "loss": mean(losses), "se": se(losses),
                          "blocks": losses, "train_tokens": steps * args.batch_size * args.block_size}
        logger.info("%s b=%g: %s -> %.4f (%.0f s)", name, b, arch, mean(losses), wall[f"{b:g}"])
    return {"rows": rows, "train_s": wall, "steps_per_budget": steps,
            "train_tokens": steps * n * args.batch_size * args.block_size}


def variant_model(ctx, variant: dict) -> LlamaFlexForCausalLM:
    """The converted model, as this variant starts: with or without modulation, sinusoidal or one-hot routers.
    Everything it shares with the converted model (weights, ranking, scores, fitted routers) is copied."""
    flex0 = ctx["flex0"]
    modulation = variant.get("use_modulation", True)
    embedding = variant.get("router_budget_embedding", "sinusoidal")
    # "oneshot": the routers start at the one-shot export at the trained budgets (what `separate` trains; a
    # smaller architecture that scored better may be taken); "oneshot_dense": the same, and between the trained
    # budgets the best within tolerance at conversion's ROUTER_FIT_POINTS budgets (`search.router_fit_family`); "within": conversion's fit
    fit = variant.get("fit_routers", "within")
    family = {b: (ctx["oneshot_arch"][b].indices if fit.startswith("oneshot") else
                  search_architecture(flex0.config, b, allow_smaller=False)[0]) for b in flex0.config.budgets if b < 1}
    if fit == "oneshot_dense":
        family = router_fit_family(flex0.config, trained=family)
    if modulation == flex0.config.use_modulation and embedding == flex0.config.router_budget_embedding:
        flex = copy.deepcopy(flex0)
        if fit != "within":
            fit_routers(flex, family)
        return flex.eval()
    config = copy.deepcopy(flex0.config)
    config.use_modulation, config.router_budget_embedding = modulation, embedding
    torch.manual_seed(0)
    flex = LlamaFlexForCausalLM(config)
    keep = {k: v for k, v in flex0.state_dict().items()
            if ".modulation." not in k and (embedding == flex0.config.router_budget_embedding or ".router." not in k)}
    missing, unexpected = flex.load_state_dict(keep, strict=False)
    if unexpected or [k for k in missing if ".router." not in k and ".modulation." not in k and k != "lm_head.weight"]:
        raise RuntimeError(f"variant {variant}: weights do not fit ({missing}, {unexpected})")
    flex.tie_weights()
    if embedding != flex0.config.router_budget_embedding or fit != "within":
        fit_routers(flex, family)
    return flex.eval()


def router_pick(flex, budget: float) -> Architecture:
    """The routers' own argmax at `budget` (what `architecture(b)` exports when it is on budget and exportable)."""
    with torch.no_grad():
        logits = flex.model.router(torch.tensor(float(budget)))
    return make_architecture(flex.config, {a: int(v.argmax()) for a, v in logits.items()}, budget=budget)


def modulation_gains(flex, arch: Architecture) -> dict | None:
    """How far the modulation gains at `arch` (its one-hot policy) move from 1."""
    if flex.model.modulation is None:
        return None
    if is_full(flex.config, arch.indices):
        return {"max_abs": 0.0, "mean_abs": 0.0}
    with torch.no_grad():
        g = flex.model.modulation.for_indices(arch.indices) - 1.0
    kept = list(arch.kept_layers)
    g = g[:, kept]
    return {"max_abs": float(g.abs().max()), "mean_abs": float(g.abs().mean())}


def run_flex(ctx, args, name: str, variant: dict) -> dict:
    """One elastic run on T tokens with `variant`'s FlexTrainingArguments, then every measurement of the family."""
    flex = variant_model(ctx, variant)
    train_kwargs = {k: v for k, v in variant.items() if k not in ("use_modulation", "router_budget_embedding", "fit_routers")}
    accumulation = 3 if train_kwargs.get("sampling_rule") == "sandwich" else 1
    steps = max(1, round(args.steps / accumulation))  # equal tokens: a sandwich step is 3 micro-batches
    set_seed(args.seed)
    defaults = dict(router_learning_rate=args.router_learning_rate, modulation_learning_rate=args.modulation_learning_rate,
                    distillation_weight=1.0, lm_loss_weight=0.0)
    targs = FlexTrainingArguments(**training_kwargs(args, os.path.join(args.out, name), steps, accumulation),
                                  **{**defaults, **train_kwargs})
    trainer = FlexTrainer(model=flex, args=targs, teacher_model=ctx["parent"], train_dataset=ctx["train"],
                          data_collator=ctx["collator"])
    start = time.perf_counter()
    trainer.train()
    train_s = round(time.perf_counter() - start, 1)
    flex.eval()
    P, vb, bs, seen = flex.config.parent_parameters(), ctx["val_blocks"], args.eval_batch_size, {}
    rows = {f"{b:g}": measure_sub(flex, b, vb, bs, seen) for b in args.budgets}
    at_oneshot = {f"{b:g}": measure_sub(flex, make_architecture(flex.config, ctx["oneshot_arch"][b].indices, budget=b,
                                                                note="one-shot architecture"), vb, bs, seen)
                  for b in args.budgets}
    full = block_losses(flex, vb, bs)
    grid, picks = measure_grid(flex, ctx, args, full, seen)
    rescored = None
    if args.rescore:
        # the conversion-time scores are stale after training: measure the candidates again on the trained weights
        start = time.perf_counter()
        score_architectures(flex, ctx["score"], [b for b in ctx["grid"] if b < 1], progress=False)
        rescore_s = round(time.perf_counter() - start, 1)
        grid2, picks2 = measure_grid(flex, ctx, args, full, seen)
        rescored = {"grid": grid2, "picks": picks2, "router_agrees": all(p["agree"] for p in picks2.values()),
                    "rescore_s": rescore_s}
    # what each sample trained: soft mixtures, hard Gumbel samples, or the exported sub-models
    kinds = Counter()
    for _, _, b, hard in trainer.sample_log:
        kind = "full" if b >= 1 else ("soft" if not hard else ("exported" if targs.hard_samples == "exported" else "hard gumbel"))
        kinds[kind] += 1
    per_size = args.steps * args.batch_size * args.block_size / len(args.budgets)
    tokens = {budget_key(b): n for b, n in sorted_buckets(trainer.tokens_per_budget)}
    # training compute, approximate: 6·N per token for the student (a soft sample runs at full width), 2·P for the teacher
    flops = sum(6 * (P if (not hard or b >= 1) else b * P) + 2 * P for _, _, b, hard in trainer.sample_log)
    flops *= args.batch_size * args.block_size
    result = {
        "variant": variant, "rows": rows, "at_oneshot_architectures": at_oneshot, "grid": grid, "picks": picks,
        "router_agrees": all(p["agree"] for p in picks.values()),
        "full_model": {"loss": mean(full), "se": se(full)}, "train_s": train_s, "optimizer_steps": steps,
        "gradient_accumulation": accumulation, "train_tokens": sum(trainer.tokens_per_budget.values()),
        "tokens_per_budget": tokens, "token_share_of_separate": {b: n / per_size for b, n in tokens.items() if b not in ("1", INTERPOLATED)},
        "samples": dict(kinds), "approx_train_flops": flops,
        "modulation_gains": {f"{b:g}": modulation_gains(flex, flex.architecture(b)) for b in args.budgets},
        "architectures_at_end": trainer.architecture_report(),
    }
    if rescored is not None:
        result["rescored"] = rescored
    if args.compensated:  # the trained family's exports refitted by least squares too (statistics of the trained model)
        start = time.perf_counter()
        comp = Compensation.from_data(flex, ctx["compensation_data"], progress=False)
        result["compensated"] = {"rows": {f"{b:g}": measure_sub(flex, b, vb, bs, compensation=comp) for b in args.budgets},
                                 "seconds": round(time.perf_counter() - start, 1)}
    logger.info("%s: %s; full %.4f; router agrees %s; %s", name,
                {b: round(r["loss"], 4) for b, r in rows.items()}, mean(full), result["router_agrees"], dict(kinds))
    return result


def measure_grid(flex, ctx, args, full: list[float], seen: dict) -> tuple[dict, dict]:
    """The exported sub-model of every grid budget (measured), and the routers' own pick next to it."""
    P, vb, bs = flex.config.parent_parameters(), ctx["val_blocks"], args.eval_batch_size
    grid, picks = {}, {}
    for b in ctx["grid"]:
        key = f"{b:.4g}"
        grid[key] = measure_sub(flex, b, vb, bs, seen) if b < 1 else {"loss": mean(full), "se": se(full), "blocks": full,
                                                                "parameters": P, "fraction": 1.0}
    for b in sorted(set(args.budgets) | set(ctx["grid"])):
        if b >= 1:
            continue
        exported, raw = flex.architecture(b), router_pick(flex, b)
        picks[f"{b:.4g}"] = {"exported": short(exported), "router": short(arch_row(raw, P)),
                             "router_parameters": raw.num_parameters, "router_fraction": raw.num_parameters / P,
                             "agree": exported.indices == raw.indices, "note": exported.note}
    return grid, picks


def router_interpolation(ctx, args) -> dict:
    """Conversion's routers (fitted to the trained budgets' one-shot architectures), no elastic training:
    their argmax on the grid, for each budget embedding. On budget? The nearest trained budget's pick?"""
    out = {}
    for embedding in ("sinusoidal", "onehot"):
        flex = variant_model(ctx, {"router_budget_embedding": embedding, "fit_routers": "oneshot"})
        P, tol = flex.config.parent_parameters(), flex.config.budget_tolerance
        trained = {b: router_pick(flex, b).indices for b in args.budgets}
        rows = {}
        for b in ctx["grid"]:
            if b >= 1 or b in args.budgets:
                continue
            raw = router_pick(flex, b)
            nearest = min(args.budgets, key=lambda t: abs(t - b))
            rows[f"{b:.4g}"] = {"router": short(arch_row(raw, P)), "fraction": raw.num_parameters / P,
                                "on_budget": abs(raw.num_parameters / (b * P) - 1) <= tol,
                                "same_as_nearest_trained": raw.indices == trained[nearest]}
        out[embedding] = {"rows": rows, "on_budget": sum(r["on_budget"] for r in rows.values()),
                          "same_as_nearest_trained": sum(r["same_as_nearest_trained"] for r in rows.values()),
                          "of": len(rows)}
    return out


__all__ = ["block_losses", "paired", "router_interpolation", "run_flex", "run_oneshot", "run_separate"]
