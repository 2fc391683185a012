"""`FlexTrainer`: one `transformers.Trainer` run trains the shared weights, routers and modulation (DESIGN.md §4).

Each micro-batch samples a budget (the full model with its own probability, else a trained budget), routes
it (soft Gumbel-Softmax, masked forward; or hard straight-through, sliced forward), and adds up

    distillation_weight · KL(parent ‖ student) + lm_loss_weight · CE + budget_loss_weight · budget loss.

The budget and the Gumbel noise come from a generator seeded with (sampling_seed, global step, micro-step),
so every rank runs the same architecture in a step (no hanging collectives under ZeRO-3), and a resumed run
draws exactly what the uninterrupted one would have.
"""

from __future__ import annotations

import contextlib
import logging
from collections import defaultdict

import torch
import torch.nn.functional as F
from transformers import Trainer
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

from .arguments import FlexTrainingArguments
from .callbacks import SCHEDULES, _flex

logger = logging.getLogger(__name__)

GROUPS = ("llm", "router", "modulation")


def parameter_group(name: str) -> str:
    """Which optimizer group a parameter belongs to, by name."""
    if ".router." in f".{name}":
        return "router"
    if ".modulation." in f".{name}":
        return "modulation"
    return "llm"


class BudgetSampler:
    """Draws (budget, hard?) and a Gumbel generator from (seed, step, micro-step): the same on every rank."""

    def __init__(self, budgets: list[float], weights: list[float] | None, full_probability: float, seed: int):
        if weights is not None and len(weights) != len(budgets):
            raise ValueError(f"budget_weights has {len(weights)} entries but the model has {len(budgets)} budgets {budgets}")
        self.budgets = list(budgets)
        self.weights = torch.tensor(weights if weights is not None else [1.0] * len(budgets), dtype=torch.float64)
        self.full_probability = full_probability
        self.seed = seed

    def sample(self, step: int, micro: int, hard_probability: float) -> tuple[float, bool, torch.Generator]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step * 1_009 + micro)
        u_full, u_hard = torch.rand(2, generator=generator, dtype=torch.float64).tolist()
        index = int(torch.multinomial(self.weights, 1, generator=generator))
        budget = 1.0 if (u_full < self.full_probability or not self.budgets) else self.budgets[index]
        return budget, u_hard < hard_probability, generator


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None, temperature: float) -> torch.Tensor:
    """Forward KL(teacher ‖ student) per token, averaged over the tokens of `mask`."""
    s = F.log_softmax(student.float() / temperature, dim=-1)
    t = F.log_softmax(teacher.float() / temperature, dim=-1)
    per_token = (t.exp() * (t - s)).sum(-1) * temperature**2
    if mask is None:
        return per_token.mean()
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


@contextlib.contextmanager
def gathered(module: torch.nn.Module):
    """Whole parameters of `module` for use outside its forward (a no-op without ZeRO-3)."""
    if is_deepspeed_zero3_enabled():
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            yield
    else:
        yield


class FlexTrainer(Trainer):
    """`Trainer` for LlamaFlex models; `teacher_model` is the frozen parent (needed when distilling)."""

    def __init__(self, model=None, args: FlexTrainingArguments = None, teacher_model=None, **kwargs):
        if not isinstance(args, FlexTrainingArguments):
            raise TypeError(f"FlexTrainer needs FlexTrainingArguments, got {type(args).__name__}")
        if args.distillation_weight > 0 and teacher_model is None:
            raise ValueError("distillation_weight > 0 needs teacher_model (the frozen parent), or set distillation_weight=0")
        callbacks = list(kwargs.pop("callbacks", None) or [])
        callbacks += [cls() for cls in SCHEDULES if not any(isinstance(c, cls) for c in callbacks)]
        super().__init__(model=model, args=args, callbacks=callbacks, **kwargs)
        self.loss_is_scaled_for_ga = False  # our losses are per-micro-batch means: Trainer divides by GA steps
        flex = _flex(self.model)
        flex.hard_sample_probability = args.hard_sample_probability
        self.sampler = BudgetSampler(self.model.config.budgets, args.budget_weights, args.full_budget_probability, args.sampling_seed)
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
        self._micro = (-1, 0)
        self._eval_budget: float | None = None
        self._stats = defaultdict(lambda: defaultdict(float))
        self.tokens_per_budget: dict[float, int] = defaultdict(int)
        self.sample_log: list[tuple[int, int, float, bool]] = []  # (step, micro-step, budget, hard) per forward

    # ---- optimizer: three groups ----
    def create_optimizer(self, model=None):
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            lrs = {"llm": self.args.learning_rate, "router": self.args.router_learning_rate,
                   "modulation": self.args.modulation_learning_rate}
            params = {g: [] for g in GROUPS}
            for name, p in opt_model.named_parameters():
                if p.requires_grad:
                    params[parameter_group(name)].append(p)
            groups = [
                {"params": params[g], "lr": lrs[g], "weight_decay": self.args.weight_decay if g == "llm" else 0.0, "name": g}
                for g in GROUPS
                if params[g]
            ]
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """The LLM group follows `lr_scheduler_type` (cosine); routers and modulation stay constant after warmup."""
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
        forward = {"input_ids": inputs["input_ids"], "attention_mask": mask}
        if self._eval_budget is not None or not model.training:
            budget = self._eval_budget if self._eval_budget not in (None, 1.0) else None
            outputs = model(**forward, labels=labels, budget=budget)
            return (outputs.loss, outputs) if return_outputs else outputs.loss

        step = self.state.global_step
        hard_probability = getattr(_flex(model), "hard_sample_probability", args.hard_sample_probability)
        micro = self._next_micro(step)
        budget, hard, generator = self.sampler.sample(step, micro, hard_probability)
        self.sample_log.append((step, micro, budget, bool(hard)))
        if budget < 1.0 or args.freeze_llm:  # (a frozen LLM at b = 1 has only the routers left to train)
            forward.update(budget=budget, route_mode="hard" if hard else "soft", generator=generator)
        outputs = model(**forward, labels=labels if args.lm_loss_weight > 0 else None)

        loss = torch.zeros((), device=outputs.logits.device)
        stats = self._stats[budget]
        if args.lm_loss_weight > 0:
            loss = loss + args.lm_loss_weight * outputs.loss
            stats["lm_loss"] += outputs.loss.item()
        if self.teacher is not None:
            with torch.no_grad():
                teacher_logits = self.teacher(**{k: v for k, v in forward.items() if k in ("input_ids", "attention_mask")}).logits
            kd = distillation_loss(outputs.logits, teacher_logits, mask, args.distillation_temperature)
            loss = loss + args.distillation_weight * kd
            stats["kd_loss"] += kd.item()
        if outputs.budget_loss is not None:
            loss = loss + args.budget_loss_weight * outputs.budget_loss
            stats["budget_loss"] += outputs.budget_loss.item()
            stats["params_ratio"] += (outputs.expected_parameters / (budget * self.model.config.parent_parameters())).item()
            stats["hard"] += float(hard)
        stats["loss"] += loss.item()
        stats["count"] += 1
        tokens = int(mask.sum()) if mask is not None else inputs["input_ids"].numel()
        self.tokens_per_budget[budget] += tokens * max(1, args.world_size)
        return (loss, outputs) if return_outputs else loss

    # ---- logging ----
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._stats:  # a training log: add per-budget figures since the last one
            flex = _flex(self.model)
            logs["gumbel_temperature"] = flex.gumbel_temperature
            logs["logit_scale"] = flex.logit_scale
            for budget, stats in sorted(self._stats.items()):
                n = max(stats.pop("count"), 1)
                for key, value in stats.items():
                    logs[f"b{budget:g}/{key}"] = value / n
                logs[f"b{budget:g}/tokens"] = self.tokens_per_budget[budget]
            self._stats.clear()
            report = self.architecture_report()  # on every rank: gathering the router is a collective
            if self.is_world_process_zero():
                for line in report:
                    logger.info(line)
        super().log(logs, start_time)

    def architecture_report(self) -> list[str]:
        """The routers' current architecture for each trained budget, one line each."""
        flex = _flex(self.model)
        with gathered(flex.router):
            return [f"step {self.state.global_step} budget {b:g}: {flex.architecture(b)}" for b in self.model.config.budgets]

    # ---- evaluation: every trained budget and the full model ----
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        metrics = {}
        for budget in [1.0] + list(self.model.config.budgets):
            self._eval_budget = budget
            try:
                metrics.update(super().evaluate(eval_dataset, ignore_keys, f"{metric_key_prefix}_b{budget:g}"))
            finally:
                self._eval_budget = None
        return metrics


__all__ = ["BudgetSampler", "FlexTrainer", "distillation_loss", "gathered", "parameter_group"]
