"""The knobs of elastic training (docs/design.md, "Training"), shared by `FlexTrainingArguments` and TRL's `FlexSFTConfig`.

`FlexArguments` is a dataclass mixin holding every elastic-training field (budget sampling, losses, router
schedules, the router/modulation learning rates, LoRA); `FlexTrainingArguments` = it + `TrainingArguments`
with the paper's defaults, and `training/sft.py`'s `FlexSFTConfig` = it + TRL's `SFTConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments
from transformers.utils import is_peft_available

DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class FlexArguments:
    """Elastic-training fields; mix in before a `TrainingArguments` subclass (its `__post_init__` validates them)."""

    router_learning_rate: float = field(default=4e-2, metadata={"help": "Routers' learning rate (paper: 4e-2), constant after warmup."})
    modulation_learning_rate: float = field(
        default=4e-2, metadata={"help": "Modulation networks' learning rate (paper: 4e-2), constant after warmup."}
    )
    freeze_llm: bool = field(default=False, metadata={"help": "Train routers and modulation only."})

    # ---- LoRA (frozen base) ----
    lora_r: int = field(
        default=0,
        metadata={"help": "LoRA rank; > 0 freezes the base weights and trains LoRA adapters (sliced with the weights at "
                  "every budget) plus routers and modulation. 0: train the weights themselves."},
    )
    lora_alpha: float = field(default=32.0, metadata={"help": "LoRA scaling numerator (scale = lora_alpha / lora_r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: list(DEFAULT_LORA_TARGETS),
        metadata={"help": "Projections that get adapters (names of ElasticLinear modules; not lm_head)."},
    )

    # ---- budget sampling ----
    budgets: list[str] | None = field(
        default=None,
        metadata={"help": "Budgets to train (fractions in (0, 1] or sizes such as '3B'); default: the model's config.budgets."},
    )
    full_budget_probability: float = field(
        default=1 / 3, metadata={"help": "Probability that a step trains the full model (b = 1)."}
    )
    budget_weights: list[float] | None = field(
        default=None,
        metadata={"help": "Relative sampling weights of the trained budgets (in their order); default uniform."},
    )
    interpolated_budget_probability: float = field(
        default=0.0,
        metadata={"help": "Probability that a sub-model draw (b < 1) takes a budget uniform between the smallest "
                  "trained budget and 1 instead of a trained budget: the sub-models between trained budgets are "
                  "trained too (with hard_samples 'exported', exactly those architecture(b) exports). Logged and "
                  "counted as 'interpolated'."},
    )
    sampling_rule: str = field(
        default="random",
        metadata={"help": "'random': each micro-step draws the full model (full_budget_probability) or a budget "
                  "(budget_weights). 'sandwich': micro-steps cycle largest (full), smallest, random other budget "
                  "(use gradient_accumulation_steps a multiple of 3)."},
    )
    hard_samples: str = field(
        default="gumbel",
        metadata={"help": "What a hard sample trains: 'gumbel' (straight-through Gumbel one-hot, a random nearby "
                  "architecture) or 'exported' (exactly architecture(b), the sub-model that is exported)."},
    )
    router_budget_samples: int = field(
        default=0,
        metadata={"help": "Extra budgets per step, uniform between the smallest trained budget and 1, at which the "
                  "routers' budget loss is added (no LLM forward): routers that stay on budget between trained ones."},
    )
    refit_routers: bool = field(
        default=False,
        metadata={"help": "At the end of training, fit the routers to the family the model then exports "
                  "(architecture(b) at the trained budgets and at search.ROUTER_FIT_POINTS budgets from the smallest "
                  "trained one to 1), so that their own argmax is the exported sub-model there and between."},
    )
    sampling_seed: int = field(
        default=1234, metadata={"help": "Seed of the budget / Gumbel stream; every rank draws the same from (seed, step)."}
    )

    # ---- loss ----
    distillation_weight: float = field(
        default=1.0, metadata={"help": "Weight of the forward KL from the frozen parent's logits (0 disables the teacher)."}
    )
    lm_loss_weight: float = field(default=0.0, metadata={"help": "Weight of the next-token cross-entropy (on the labels)."})
    distillation_temperature: float = field(default=1.0, metadata={"help": "Softmax temperature of the distillation."})
    budget_loss_weight: float = field(default=1.0, metadata={"help": "Weight of the routers' budget loss."})

    # ---- router schedules (callbacks) ----
    gumbel_temperature: float = field(default=1.0, metadata={"help": "Initial Gumbel-Softmax temperature τ."})
    gumbel_temperature_decay: float = field(default=0.9999, metadata={"help": "τ is multiplied by this every step."})
    logit_scale_start: float = field(default=1.0, metadata={"help": "Router logit scale κ at step 0."})
    logit_scale_end: float = field(default=10.0, metadata={"help": "κ at the last step (linear in between)."})
    hard_sample_probability: float = field(
        default=0.2, metadata={"help": "Probability of a hard (straight-through, sliced) sample before the hard phase."}
    )
    hard_phase_start: float = field(
        default=0.8, metadata={"help": "Fraction of training after which every sample is hard (1 disables)."}
    )

    def __post_init__(self):
        super().__post_init__()
        checks = {
            "full_budget_probability": 0 <= self.full_budget_probability <= 1,
            "hard_sample_probability": 0 <= self.hard_sample_probability <= 1,
            "interpolated_budget_probability": 0 <= self.interpolated_budget_probability <= 1,
            "hard_phase_start": 0 <= self.hard_phase_start <= 1,
            "gumbel_temperature": self.gumbel_temperature > 0,
            "gumbel_temperature_decay": 0 < self.gumbel_temperature_decay <= 1,
            "distillation_temperature": self.distillation_temperature > 0,
            "lora_r": self.lora_r >= 0,
            "lora_dropout": 0 <= self.lora_dropout < 1,
            "sampling_rule": self.sampling_rule in ("random", "sandwich"),
            "hard_samples": self.hard_samples in ("gumbel", "exported"),
            "router_budget_samples": self.router_budget_samples >= 0,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(
                f"invalid {', '.join(f'{b}={getattr(self, b)!r}' for b in bad)}: probabilities and fractions lie in "
                "[0, 1], temperatures are positive, the decay lies in (0, 1], lora_r is 0 (off) or a positive rank, "
                "sampling_rule is random or sandwich, hard_samples gumbel or exported, router_budget_samples >= 0"
            )
        if self.budget_weights is not None and (not self.budget_weights or min(self.budget_weights) < 0 or sum(self.budget_weights) <= 0):
            raise ValueError(f"budget_weights must be non-negative with a positive sum, got {self.budget_weights}")
        if max(self.distillation_weight, self.lm_loss_weight, self.budget_loss_weight) <= 0:
            raise ValueError("every loss weight is 0: set distillation_weight, lm_loss_weight or budget_loss_weight above 0")
        if self.lora_r and not self.lora_target_modules:
            raise ValueError("lora_r > 0 needs lora_target_modules (e.g. q_proj v_proj)")

    def lora_config(self, model_config=None):
        """The `peft.LoraConfig` of these arguments (None when lora_r is 0), with the elastic LoRA mapping.

        Routers and modulation train alongside the adapters (`modules_to_save`), so the saved adapter
        holds everything the run changed.
        """
        if not self.lora_r:
            return None
        if not is_peft_available():
            raise ImportError(f"lora_r={self.lora_r} needs peft (pip install peft); lora_r=0 trains the weights")
        from modeling_llamaflex.lora import lora_config

        keep = ["router"] + (["modulation"] if model_config is None or getattr(model_config, "use_modulation", True) else [])
        return lora_config(
            r=self.lora_r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
            target_modules=list(self.lora_target_modules), modules_to_save=keep, task_type="CAUSAL_LM",
        )


@dataclass
class FlexTrainingArguments(FlexArguments, TrainingArguments):
    """`TrainingArguments` + `FlexArguments`, with the paper's defaults for the LLM weights."""

    learning_rate: float = field(default=4e-5, metadata={"help": "LLM weights' (or LoRA adapters') peak learning rate (paper: 4e-5)."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Schedule of the LLM weights (paper: cosine)."})
    report_to: None | str | list[str] = field(
        default="tensorboard", metadata={"help": "Where logs go (TensorBoard by default; 'none' for the console only)."}
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Train into an output_dir that already holds a run (its model, sub-models, summary and "
                          "checkpoints are replaced). Without it (or --resume_from_checkpoint) such a folder is refused."},
    )
