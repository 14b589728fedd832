"""Learning-rate schedules with linear warmup, stepped per batch."""

import math

import keras
from keras import ops

from hypermodel.space import LR_SCHEDULES


@keras.saving.register_keras_serializable(package="transfer_tuner")
class WarmupSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup, then constant / cosine / exponential / step decay.

    Args:
        initial_learning_rate: The peak rate, reached at the end of warmup.
        kind: One of LR_SCHEDULES.
        total_steps: Steps (batches) the schedule spans; `end_at` moves its end while
            a fit runs.
        warmup_steps: Steps of linear warmup from ~0 to the peak.
    """

    def __init__(self, initial_learning_rate, kind, total_steps, warmup_steps=0):
        if kind not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule {kind!r} is not one of {LR_SCHEDULES}")
        self.initial_learning_rate = float(initial_learning_rate)
        self.kind = kind
        self.total_steps = max(1, int(total_steps))
        self.warmup_steps = max(0, min(int(warmup_steps), self.total_steps - 1))
        # A variable, not a number: the traced train step reads it at every step, so
        # `end_at` takes effect in a fit that is already running.
        self._end = keras.Variable(float(self.total_steps), trainable=False, name="schedule_end")

    def end_at(self, total_steps):
        """Moves the end of the decay to step `total_steps` (never into the warmup)."""
        self.total_steps = max(self.warmup_steps + 1, int(total_steps))
        self._end.assign(float(self.total_steps))

    def __call__(self, step):
        step = ops.cast(step, "float32")
        peak = self.initial_learning_rate
        decay_steps = self._end - float(self.warmup_steps)
        progress = ops.clip((step - self.warmup_steps) / decay_steps, 0.0, 1.0)
        if self.kind == "constant":
            rate = peak * ops.ones_like(progress)
        elif self.kind == "cosine":
            rate = peak * 0.5 * (1.0 + ops.cos(math.pi * progress))
        elif self.kind == "exponential":
            rate = peak * ops.power(0.01, progress)  # ends at 1 % of the peak
        else:  # step: ÷10 at 50 % and again at 75 % of the run
            rate = peak * ops.where(progress < 0.5, 1.0, ops.where(progress < 0.75, 0.1, 0.01))
        if self.warmup_steps:
            warm = peak * (step + 1.0) / float(self.warmup_steps)
            rate = ops.where(step < self.warmup_steps, warm, rate)
        return rate

    def get_config(self):
        return {
            "initial_learning_rate": self.initial_learning_rate,
            "kind": self.kind,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
        }
