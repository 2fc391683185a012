"""`FlexTrainer`: one `transformers.Trainer` run trains the shared weights, routers and modulation (docs/design.md).

The elastic part lives in `FlexTrainingMixin`, which `FlexTrainer` (on `Trainer`) and `training/sft.py`'s
`FlexSFTTrainer` (on TRL's `SFTTrainer`) share.

Each micro-batch samples a budget (the full model with its own probability, else a trained budget), routes
it (soft Gumbel-Softmax, masked forward; or hard straight-through, sliced forward), and adds up

    distillation_weight · KL(parent ‖ student) + lm_loss_weight · CE + budget_loss_weight · budget loss.

The budget and the Gumbel noise come from a generator seeded with (sampling_seed, global step, micro-step),
so every rank runs the same architecture in a step (no hanging collectives under ZeRO-3), and a resumed run
draws exactly what the uninterrupted one would have.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections import defaultdict

import torch
import torch.nn.functional as F
from transformers import Trainer
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

from modeling_llamaflex import budget_loss, expected_parameters, parse_budget
from modeling_llamaflex.lora import add_lora as elastic_add_lora
from modeling_llamaflex.lora import active_copy, flex_model, has_peft_layers, merged_state_dict
from modeling_llamaflex.router import BudgetRouter

from .arguments import FlexArguments, FlexTrainingArguments
from .callbacks import CALLBACKS

logger = logging.getLogger(__name__)

GROUPS = ("llm", "lora", "router", "modulation")


def parameter_group(name: str) -> str:
    """Which optimizer group a parameter belongs to, by name ("lora": PEFT's LoRA factors)."""
    if ".router." in f".{name}":
        return "router"
    if ".modulation." in f".{name}":
        return "modulation"
    if ".lora_" in name:
        return "lora"
    return "llm"


INTERPOLATED = "interpolated"  # the key of budgets drawn between the trained ones (logs, tokens_per_budget)


class BudgetSampler:
    """Draws (budget, hard?) and a Gumbel generator from (seed, step, micro-step): the same on every rank.

    rule "random": the full model with `full_probability`, else a trained budget by `weights`.
    rule "sandwich" (BigNAS / OFA / MatFormer): the micro-steps of an optimizer step cycle through the largest
    (the full model), the smallest trained budget and a random other trained budget (by `weights`), so that
    with gradient accumulation a multiple of 3 every step trains all three; `full_probability` is unused.
    With `interpolate` > 0, a draw of a trained budget below 1 is replaced, with that probability, by a budget
    uniform between the smallest trained budget and 1 (the budgets between trained ones get trained too).
    """

    RULES = ("random", "sandwich")

    def __init__(self, budgets: list[float], weights: list[float] | None, full_probability: float, seed: int,
                 rule: str = "random", interpolate: float = 0.0):
        if weights is not None and len(weights) != len(budgets):
            raise ValueError(f"budget_weights has {len(weights)} entries but the model has {len(budgets)} budgets {budgets}")
        if rule not in self.RULES:
            raise ValueError(f"sampling_rule must be one of {self.RULES}, got {rule!r}")
        self.budgets = list(budgets)
        self.weights = torch.tensor(weights if weights is not None else [1.0] * len(budgets), dtype=torch.float64)
        self.full_probability = full_probability
        self.seed = seed
        self.rule = rule
        if not 0 <= interpolate <= 1:
            raise ValueError(f"interpolated_budget_probability must lie in [0, 1], got {interpolate}")
        self.interpolate = interpolate
        self._smallest = min(range(len(self.budgets)), key=lambda i: self.budgets[i]) if self.budgets else None

    def sample(self, step: int, micro: int, hard_probability: float) -> tuple[float, bool, torch.Generator]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step * 1_009 + micro)
        u_full, u_hard = torch.rand(2, generator=generator, dtype=torch.float64).tolist()
        if self.rule == "sandwich" and self.budgets:
            position, smallest = micro % 3, self._smallest
            if position == 0:
                budget = 1.0
            elif position == 1 or len(self.budgets) == 1:
                budget = self.budgets[smallest]
            else:
                weights = self.weights.clone()
                weights[smallest] = 0.0
                if weights.sum() <= 0:
                    weights = torch.ones_like(weights)
                budget = self.budgets[int(torch.multinomial(weights, 1, generator=generator))]
            return self._between(budget, generator), u_hard < hard_probability, generator
        index = int(torch.multinomial(self.weights, 1, generator=generator))
        budget = 1.0 if (u_full < self.full_probability or not self.budgets) else self.budgets[index]
        return self._between(budget, generator), u_hard < hard_probability, generator

    def _between(self, budget: float, generator: torch.Generator) -> float:
        """`budget`, or with probability `interpolate` (below 1 only) a budget between the smallest trained and 1.
        Draws nothing when `interpolate` is 0, so that the stream (and every earlier run) stays as it was."""
        if not self.interpolate or budget >= 1.0:
            return budget
        u_pick, u_budget = torch.rand(2, generator=generator, dtype=torch.float64).tolist()
        if u_pick >= self.interpolate:
            return budget
        low = self.budgets[self._smallest]
        return low + (1.0 - low) * u_budget

    def bucket(self, budget: float) -> float | str:
        """How a sampled budget is counted in the logs and `tokens_per_budget`: itself if trained (or 1), else
        "interpolated"."""
        return budget if budget >= 1.0 or budget in self.budgets else INTERPOLATED


def sorted_buckets(per_bucket: dict) -> list[tuple[float | str, object]]:
    """The items of a dict keyed by budget (and maybe "interpolated", last), in order."""
    return sorted(per_bucket.items(), key=lambda kv: (isinstance(kv[0], str), 0.0 if isinstance(kv[0], str) else kv[0]))


def bucket_name(bucket: float | str) -> str:
    """"b0.5" for a budget, "interpolated" for the budgets between trained ones."""
    return bucket if isinstance(bucket, str) else f"b{bucket:g}"


def budget_key(bucket: float | str) -> str:
    """How a budget is written in summaries and JSON: "0.5", "1", "interpolated"."""
    return bucket if isinstance(bucket, str) else f"{bucket:g}"


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None, temperature: float) -> torch.Tensor:
    """Forward KL(teacher ‖ student) per token, averaged over the tokens of `mask`."""
    s = F.log_softmax(student.float() / temperature, dim=-1)
    t = F.log_softmax(teacher.float() / temperature, dim=-1)
    per_token = (t.exp() * (t - s)).sum(-1) * temperature**2
    if mask is None:
        return per_token.mean()
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


def add_lora(model, lora_config):
    """`modeling_llamaflex.lora.add_lora` for frozen-base elastic training: LoRA adapters sliced with the weights
    at every budget; routers and modulation train too when `lora_config` lists them in `modules_to_save`."""
    if is_deepspeed_zero3_enabled():
        raise NotImplementedError(
            "LoRA with DeepSpeed ZeRO-3 is not supported: the adapters are small, use ZeRO-2 or no DeepSpeed (lora_r=0 "
            "trains the full weights under ZeRO-3)"
        )
    return elastic_add_lora(model, lora_config)


@contextlib.contextmanager
def gathered(module: torch.nn.Module, modify: bool = False):
    """Whole parameters of `module` for use outside its forward (a no-op without ZeRO-3); with `modify`, what
    rank 0 writes into them is kept and sent to every rank."""
    if is_deepspeed_zero3_enabled():
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=0 if modify else None):
            yield
    else:
        yield


class FlexTrainingMixin:
    """Budget sampling, routed forward, losses, parameter groups, per-budget logs and evaluation.

    Mixed in before a `transformers.Trainer` subclass (`FlexTrainer`, `FlexSFTTrainer`); `args` must be an
    `args_class` instance (a `FlexArguments` dataclass). `teacher_model` is the frozen parent, needed when
    distilling. The model is a `LlamaFlexForCausalLM`, bare or with a PEFT adapter (frozen-base training).
    """

    args_class: type = FlexArguments

    def __init__(self, model=None, args=None, teacher_model=None, **kwargs):
        name = type(self).__name__
        if not isinstance(args, self.args_class):
            raise TypeError(f"{name} needs {self.args_class.__name__}, got {type(args).__name__}")
        if args.distillation_weight > 0 and teacher_model is None:
            raise ValueError("distillation_weight > 0 needs teacher_model (the frozen parent), or set distillation_weight=0")
        flex = flex_model(model, name)
        self._check_budgets(flex, args)
        if args.lora_r and not has_peft_layers(model):
            model = add_lora(model, args.lora_config(flex.config))
        callbacks = list(kwargs.pop("callbacks", None) or [])
        callbacks += [cls() for cls in CALLBACKS if not any(isinstance(c, cls) for c in callbacks)]
        super().__init__(model=model, args=args, callbacks=callbacks, **kwargs)
        self.loss_is_scaled_for_ga = False  # our losses are per-micro-batch means: Trainer divides by GA steps
        self.flex = flex_model(self.model, name)
        self.budgets = self._check_budgets(self.flex, args)
        # the router schedules (callbacks bound to this trainer) update these at every step
        self.gumbel_temperature = args.gumbel_temperature
        self.logit_scale = args.logit_scale_start
        self.hard_sample_probability = args.hard_sample_probability
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, CALLBACKS):
                callback.trainer = self
        self.sampler = BudgetSampler(self.budgets, args.budget_weights, args.full_budget_probability, args.sampling_seed,
                                     args.sampling_rule, args.interpolated_budget_probability)
        if args.freeze_llm:
            for name, p in self.model.named_parameters():
                if parameter_group(name) == "llm":
                    p.requires_grad_(False)
        self.teacher = None
        if teacher_model is not None and args.distillation_weight > 0:
            teacher_model.requires_grad_(False)
            if self.is_deepspeed_enabled:
                from trl.models.utils import prepare_deepspeed

                self.teacher = prepare_deepspeed(teacher_model, self.accelerator)
            else:
                self.teacher = teacher_model.to(self.args.device).eval()
        self._routers = [m for m in self.model.modules() if isinstance(m, BudgetRouter)]  # PEFT keeps a copy
        self._router_steps_before = max(int(m.trained_steps) for m in self._routers)
        self._micro = (-1, 0)
        self._eval_budget: float | None = None
        self._stats = defaultdict(lambda: defaultdict(float))
        self.tokens_per_budget: dict[float, int] = defaultdict(int)
        self.sample_log: list[tuple[int, int, float, bool]] = []  # (step, micro-step, budget, hard) per forward

    @staticmethod
    def _check_budgets(flex, args) -> list[float]:
        """The budgets to train (`args.budgets`, else the model's), each checked against the model's choices."""
        budgets = args.budgets if args.budgets else flex.config.budgets
        parent = flex.config.parent_parameters()
        out = []
        for budget in budgets:
            try:
                b = parse_budget(budget, parent)
                if b < 1.0:
                    with gathered(flex.model.router):
                        flex.architecture(b)  # raises if the choices cannot reach it, naming the allowed range
            except (TypeError, ValueError) as err:
                source = "budgets" if args.budgets else "the model's config.budgets"
                raise ValueError(f"cannot train budget {budget!r} (from {source}): {err}") from None
            out.append(b)
        return out

    # ---- resuming: the per-budget token counts go with each checkpoint ----
    TOKENS_FILE = "tokens_per_budget.json"

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.is_world_process_zero():
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

            folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            if os.path.isdir(folder):
                with open(os.path.join(folder, self.TOKENS_FILE), "w") as fh:
                    json.dump({str(b): n for b, n in sorted_buckets(self.tokens_per_budget)}, fh, indent=1)

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """Trainer.train; resuming also restores `tokens_per_budget` as the checkpoint saved it."""
        checkpoint = resume_from_checkpoint
        if isinstance(checkpoint, bool) and checkpoint:
            from transformers.trainer_utils import get_last_checkpoint

            checkpoint = get_last_checkpoint(self.args.output_dir)
        if checkpoint:
            path = os.path.join(checkpoint, self.TOKENS_FILE)
            if os.path.isfile(path):
                with open(path) as fh:
                    self.tokens_per_budget = defaultdict(int, {b if b == INTERPOLATED else float(b): int(n)
                                                               for b, n in json.load(fh).items()})
            else:
                logger.warning("%s has no %s (saved by an earlier version): tokens_per_budget restarts from zero",
                               checkpoint, self.TOKENS_FILE)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    # ---- the routers made the exported family's own (refit_routers) ----
    def refit_routers(self) -> dict[float, bool]:
        """Fit the routers to the family the model exports now: `architecture(b)` at the trained budgets and at
        `search.ROUTER_FIT_POINTS` budgets from the smallest trained one to 1. Their own argmax then is the
        exported sub-model at those budgets (the export there does not change) and, being smooth in the budget,
        at the budgets between. During training the routers follow their budget loss only when every sample is
        an exported sub-model, so they drift from the family (bench/QUALITY.md). Returns {budget: matched}."""
        from modeling_llamaflex.search import fit_routers, router_fit_budgets

        flex = self.flex
        budgets = sorted({b for b in self.budgets if b < 1} | set(router_fit_budgets(self.budgets)))
        with gathered(flex.model.router):
            family = {b: flex.architecture(b).indices for b in budgets}
        # from fresh weights, as at conversion: trained routers can be saturated (normalised logits whose raw scale
        # has grown), where a few thousand small Adam steps no longer move the argmax. The fit runs on a plain
        # module (under ZeRO-3 the model's router re-partitions its weights after every forward, even when
        # gathered), then its weights are written into the router that runs (PEFT: the active copy); the router's
        # step count is kept
        live = active_copy(flex.model.router)
        weight = next(live.parameters())
        fresh = type(live)(flex.config).to(device=weight.device, dtype=weight.dtype)
        fresh.apply(flex._init_weights)
        matched = fit_routers(flex, family, router=fresh)
        with gathered(flex.model.router, modify=True), torch.no_grad():
            for name, param in live.named_parameters():
                param.copy_(fresh.get_parameter(name))
        missed = [b for b, ok in matched.items() if not ok]
        if missed:
            logger.warning("refit_routers: the routers' argmax misses the exported sub-model at budgets %s", missed)
        logger.info("refit_routers: routers fitted to the exported family at %d budgets", len(family))
        return matched

    # ---- saving: always a plain LlamaFlex checkpoint ----
    def save_flex_model(self, output_dir: str) -> None:
        """Save the trained model as a LlamaFlex checkpoint in `output_dir` (with auto_map and code).

        With LoRA, that checkpoint has the adapter merged into the weights (the model in memory is left as it
        is), and the PEFT adapter itself (LoRA factors, routers, modulation) goes to `output_dir/adapter`.
        """
        if not has_peft_layers(self.model):
            self.save_model(output_dir)
            return
        self.save_model(os.path.join(output_dir, "adapter"))
        if self.is_world_process_zero():
            self.flex.save_pretrained(output_dir, state_dict=merged_state_dict(self.flex))
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)

    # ---- optimizer: LLM weights (or LoRA adapters), routers, modulation ----
    def create_optimizer(self, model=None):
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            lrs = {"llm": self.args.learning_rate, "lora": self.args.learning_rate,
                   "router": self.args.router_learning_rate, "modulation": self.args.modulation_learning_rate}
            params = {g: [] for g in GROUPS}
            for name, p in opt_model.named_parameters():
                if p.requires_grad:
                    params[parameter_group(name)].append(p)
            groups = [
                {"params": params[g], "lr": lrs[g], "weight_decay": self.args.weight_decay if g in ("llm", "lora") else 0.0, "name": g}
                for g in GROUPS
                if params[g]
            ]
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """LLM (or LoRA) group: `lr_scheduler_type` (cosine); routers and modulation stay constant after warmup."""
        if self.lr_scheduler is None:
            scheduler = super().create_scheduler(num_training_steps, optimizer)
            warmup = max(1, self.args.get_warmup_steps(num_training_steps))
            optimizer = optimizer or self.optimizer
            if hasattr(scheduler, "lr_lambdas"):
                for i, group in enumerate(optimizer.param_groups):
                    if group.get("name") in ("router", "modulation"):
                        scheduler.lr_lambdas[i] = lambda step, w=warmup: min(1.0, (step + 1) / w)
        return self.lr_scheduler

    # ---- loss ----
    def _next_micro(self, step: int) -> int:
        last_step, micro = self._micro
        self._micro = (step, micro + 1 if step == last_step else 0)
        return self._micro[1]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        args = self.args
        labels = inputs.get("labels")
        mask = inputs.get("attention_mask")
        forward = {"input_ids": inputs["input_ids"], "attention_mask": mask, "use_cache": False}
        if self._eval_budget is not None or not model.training:
            budget = self._eval_budget if self._eval_budget not in (None, 1.0) else None
            outputs = model(**forward, labels=labels, budget=budget)
            return (outputs.loss, outputs) if return_outputs else outputs.loss

        step = self.state.global_step
        micro = self._next_micro(step)
        budget, hard, generator = self.sampler.sample(step, micro, self.hard_sample_probability)
        self.sample_log.append((step, micro, budget, bool(hard)))
        exported = hard and budget < 1.0 and args.hard_samples == "exported"
        if exported:  # the very sub-model `architecture(b)` exports (no Gumbel noise), sliced
            with torch.no_grad(), gathered(self.flex.model.router):
                arch = self.flex.architecture(budget)
            forward["architecture"] = arch
        elif budget < 1.0 or args.freeze_llm:  # (a frozen LLM at b = 1 has only the routers left to train)
            forward.update(budget=budget, route_mode="hard" if hard else "soft", generator=generator,
                           gumbel_temperature=self.gumbel_temperature, logit_scale=self.logit_scale)
        outputs = model(**forward, labels=labels if args.lm_loss_weight > 0 else None)
        if exported and args.router_learning_rate > 0:  # the routers still learn their budget at this budget
            outputs.budget_loss, outputs.expected_parameters = self._router_budget_loss(budget, generator)
        if args.router_budget_samples and args.router_learning_rate > 0 and outputs.budget_loss is not None:
            # Flextron-style: the routers also meet budgets between the trained ones (budget loss only, no forward)
            low = min(self.budgets) if self.budgets else 1.0
            for u in torch.rand(args.router_budget_samples, generator=generator, dtype=torch.float64).tolist():
                extra, _ = self._router_budget_loss(low + (1.0 - low) * u, generator)
                outputs.budget_loss = outputs.budget_loss + extra / args.router_budget_samples
        if outputs.budget_loss is not None and args.router_learning_rate > 0:  # from now on the routers choose
            for router in self._routers:
                router.trained_steps.fill_(self._router_steps_before + step + 1)

        loss = torch.zeros((), device=outputs.logits.device)
        bucket = self.sampler.bucket(budget)
        stats = self._stats[bucket]
        if args.lm_loss_weight > 0:
            loss = loss + args.lm_loss_weight * outputs.loss
            stats["lm_loss"] += outputs.loss.item()
        if self.teacher is not None:
            with torch.no_grad():
                teacher_logits = self.teacher(input_ids=forward["input_ids"], attention_mask=mask).logits
            kd = distillation_loss(outputs.logits, teacher_logits, mask, args.distillation_temperature)
            loss = loss + args.distillation_weight * kd
            stats["kd_loss"] += kd.item()
        if outputs.budget_loss is not None:
            loss = loss + args.budget_loss_weight * outputs.budget_loss
            stats["budget_loss"] += outputs.budget_loss.item()
            stats["params_ratio"] += (outputs.expected_parameters / (budget * self.flex.config.parent_parameters())).item()
            stats["hard"] += float(hard)
        stats["loss"] += loss.item()
        stats["count"] += 1
        tokens = int(mask.sum()) if mask is not None else inputs["input_ids"].numel()
        self.tokens_per_budget[bucket] += tokens * max(1, args.world_size)
        return (loss, outputs) if return_outputs else loss

    def _router_budget_loss(self, budget: float, generator: torch.Generator):
        """Budget loss (and expected size) of the routers' soft Gumbel policy at `budget`, without an LLM forward."""
        policy = self.flex.route(budget, "soft", generator, temperature=self.gumbel_temperature, logit_scale=self.logit_scale)
        return budget_loss(self.flex.config, policy.probs, budget), expected_parameters(self.flex.config, policy.probs)

    # ---- logging ----
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._stats:  # a training log: add per-budget figures since the last one
            logs["gumbel_temperature"] = self.gumbel_temperature
            logs["logit_scale"] = self.logit_scale
            for bucket, stats in sorted_buckets(self._stats):
                name = bucket_name(bucket)
                n = max(stats.pop("count"), 1)
                for key, value in stats.items():
                    logs[f"{name}/{key}"] = value / n
                logs[f"{name}/tokens"] = self.tokens_per_budget[bucket]
            self._stats.clear()
            report = self.architecture_report()  # on every rank: gathering the router is a collective
            if self.is_world_process_zero():
                for line in report:
                    logger.info(line)
        super().log(logs, start_time)

    def architecture_report(self) -> list[str]:
        """The routers' current architecture for each trained budget, one line each."""
        with gathered(self.flex.model.router):
            return [f"step {self.state.global_step} budget {b:g}: {self.flex.architecture(b)}" for b in self.budgets]

    # ---- evaluation: every trained budget and the full model ----
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        metrics = {}
        for budget in [1.0] + [b for b in self.budgets if b < 1.0]:
            self._eval_budget = budget
            try:
                metrics.update(super().evaluate(eval_dataset, ignore_keys, f"{metric_key_prefix}_b{budget:g}"))
            finally:
                self._eval_budget = None
        return metrics


class FlexTrainer(FlexTrainingMixin, Trainer):
    """`Trainer` for LlamaFlex models (`FlexTrainingArguments`); `teacher_model` is the frozen parent (needed when distilling)."""

    args_class = FlexTrainingArguments


__all__ = ["INTERPOLATED", "BudgetSampler", "budget_key", "sorted_buckets", "FlexTrainer", "FlexTrainingMixin", "add_lora", "distillation_loss", "gathered", "parameter_group"]
