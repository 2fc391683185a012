"""Router schedules as small callbacks, each a pure function of `state.global_step` (so resuming restores them).

* `GumbelTemperatureCallback`: τ = τ₀ · decay^step (paper: ×0.9999 per step)
* `LogitScaleCallback`: κ linear from κ_start to κ_end over training (paper: 1 → 10)
* `HardSampleCallback`: probability of a hard (straight-through, sliced) sample; 1 in the final phase
"""

from __future__ import annotations

from transformers import TrainerCallback


def _flex(model):
    """The LlamaFlexModel inside whatever wrapper (DeepSpeed engine, DDP, PEFT) the trainer holds."""
    while not hasattr(model, "gumbel_temperature"):
        for attr in ("module", "base_model", "model"):
            if hasattr(model, attr):
                model = getattr(model, attr)
                break
        else:
            raise TypeError(f"no LlamaFlex model inside {type(model).__name__}")
    return model


class _StepSchedule(TrainerCallback):
    """Sets one value from the step at the start of every step (and at train begin, for resumes)."""

    def value(self, args, step: int, max_steps: int) -> float:
        raise NotImplementedError

    def apply(self, model, value: float) -> None:
        raise NotImplementedError

    def _update(self, args, state, model):
        if model is not None:
            self.apply(model, self.value(args, state.global_step, max(state.max_steps, 1)))

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._update(args, state, model)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self._update(args, state, model)


class GumbelTemperatureCallback(_StepSchedule):
    def value(self, args, step, max_steps):
        return args.gumbel_temperature * args.gumbel_temperature_decay**step

    def apply(self, model, value):
        _flex(model).gumbel_temperature = value


class LogitScaleCallback(_StepSchedule):
    def value(self, args, step, max_steps):
        return args.logit_scale_start + (args.logit_scale_end - args.logit_scale_start) * min(step / max_steps, 1.0)

    def apply(self, model, value):
        _flex(model).logit_scale = value


class HardSampleCallback(_StepSchedule):
    """Stores the probability on the trainer-visible model; `FlexTrainer` reads it when sampling."""

    def value(self, args, step, max_steps):
        return 1.0 if step >= args.hard_phase_start * max_steps else args.hard_sample_probability

    def apply(self, model, value):
        _flex(model).hard_sample_probability = value


SCHEDULES = (GumbelTemperatureCallback, LogitScaleCallback, HardSampleCallback)
