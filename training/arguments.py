"""`FlexTrainingArguments`: `TrainingArguments` plus the knobs of elastic training (DESIGN.md §4)."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments


@dataclass
class FlexTrainingArguments(TrainingArguments):
    # ---- learning rates of the three parameter groups ----
    learning_rate: float = field(default=4e-5, metadata={"help": "LLM weights' peak learning rate (paper: 4e-5)."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Schedule of the LLM weights (paper: cosine)."})
    router_learning_rate: float = field(default=4e-2, metadata={"help": "Routers' learning rate (paper: 4e-2), constant after warmup."})
    modulation_learning_rate: float = field(
        default=4e-2, metadata={"help": "Modulation networks' learning rate (paper: 4e-2), constant after warmup."}
    )
    report_to: None | str | list[str] = field(
        default="tensorboard", metadata={"help": "Where logs go (TensorBoard by default; 'none' for the console only)."}
    )
    freeze_llm: bool = field(default=False, metadata={"help": "Train routers and modulation only."})

    # ---- budget sampling ----
    full_budget_probability: float = field(
        default=1 / 3, metadata={"help": "Probability that a step trains the full model (b = 1)."}
    )
    budget_weights: list[float] | None = field(
        default=None,
        metadata={"help": "Relative sampling weights of the model's trained budgets (config.budgets); default uniform."},
    )
    sampling_seed: int = field(
        default=1234, metadata={"help": "Seed of the budget / Gumbel stream; every rank draws the same from (seed, step)."}
    )

    # ---- loss ----
    distillation_weight: float = field(
        default=1.0, metadata={"help": "Weight of the forward KL from the frozen parent's logits (0 disables the teacher)."}
    )
    lm_loss_weight: float = field(default=0.0, metadata={"help": "Weight of the next-token cross-entropy."})
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
            "hard_phase_start": 0 <= self.hard_phase_start <= 1,
            "gumbel_temperature": self.gumbel_temperature > 0,
            "gumbel_temperature_decay": 0 < self.gumbel_temperature_decay <= 1,
            "distillation_temperature": self.distillation_temperature > 0,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(
                f"invalid {', '.join(f'{b}={getattr(self, b)!r}' for b in bad)}: probabilities and fractions lie in "
                "[0, 1], temperatures are positive, the decay lies in (0, 1]"
            )
        if self.budget_weights is not None and (not self.budget_weights or min(self.budget_weights) < 0 or sum(self.budget_weights) <= 0):
            raise ValueError(f"budget_weights must be non-negative with a positive sum, got {self.budget_weights}")
        if max(self.distillation_weight, self.lm_loss_weight, self.budget_loss_weight) <= 0:
            raise ValueError("every loss weight is 0: set distillation_weight, lm_loss_weight or budget_loss_weight above 0")
