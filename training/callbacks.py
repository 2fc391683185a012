"""Router schedules as small callbacks, each a pure function of `state.global_step` (so resuming restores them).

* `GumbelTemperatureCallback`: τ = τ₀ · decay^step (paper: ×0.9999 per step)
* `LogitScaleCallback`: κ linear from κ_start to κ_end over training (paper: 1 → 10)
* `HardSampleCallback`: probability of a hard (straight-through, sliced) sample; 1 in the final phase
* `RouterRefitCallback`: with `refit_routers`, fits the routers to the exported family when training ends

Each sets one attribute of the `FlexTrainer` that owns it (as TRL's trainers keep `beta` on the trainer), which
the trainer passes to the routed forward; the model holds no training state.
"""

from __future__ import annotations

from transformers import TrainerCallback


class _FlexCallback(TrainerCallback):
    """A callback that acts on the `FlexTrainer` that owns it (bound by `FlexTrainingMixin.__init__`)."""

    def __init__(self, trainer=None):
        self.trainer = trainer

    def bound(self):
        if self.trainer is None:
            raise RuntimeError(f"{type(self).__name__} is not bound to a FlexTrainer (pass it in FlexTrainer's callbacks)")
        return self.trainer


class _StepSchedule(_FlexCallback):
    """Sets `trainer.<attribute>` from the step at the start of every step (and at train begin, for resumes)."""

    attribute: str = ""

    def value(self, args, step: int, max_steps: int) -> float:
        raise NotImplementedError

    def _update(self, args, state):
        setattr(self.bound(), self.attribute, self.value(args, state.global_step, max(state.max_steps, 1)))

    def on_train_begin(self, args, state, control, **kwargs):
        self._update(args, state)

    def on_step_begin(self, args, state, control, **kwargs):
        self._update(args, state)


class GumbelTemperatureCallback(_StepSchedule):
    attribute = "gumbel_temperature"

    def value(self, args, step, max_steps):
        return args.gumbel_temperature * args.gumbel_temperature_decay**step


class LogitScaleCallback(_StepSchedule):
    attribute = "logit_scale"

    def value(self, args, step, max_steps):
        return args.logit_scale_start + (args.logit_scale_end - args.logit_scale_start) * min(step / max_steps, 1.0)


class HardSampleCallback(_StepSchedule):
    attribute = "hard_sample_probability"

    def value(self, args, step, max_steps):
        return 1.0 if step >= args.hard_phase_start * max_steps else args.hard_sample_probability


class RouterRefitCallback(_FlexCallback):
    """With `refit_routers`, at the end of training (before the final save) the routers are fitted to the family
    the model exports then (`FlexTrainingMixin.refit_routers`)."""

    def on_train_end(self, args, state, control, **kwargs):
        if args.refit_routers:
            self.bound().refit_routers()


SCHEDULES = (GumbelTemperatureCallback, LogitScaleCallback, HardSampleCallback)
CALLBACKS = (*SCHEDULES, RouterRefitCallback)  # what every FlexTrainer gets, bound to it
