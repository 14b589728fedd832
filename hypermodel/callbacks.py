"""Keras callbacks the training loop adds: divergence, deadlines, progress, safe checkpoints."""

import math
import time

import keras
import keras_tuner as kt
import numpy as np

from common import atomic, shims


class FailOnNaN(keras.callbacks.Callback):
    """Ends a diverging trial as FAILED (KerasTuner does not retry FailedTrialError)."""

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            raise kt.errors.FailedTrialError(f"loss became {loss} at batch {batch}: training diverged")


class FitToDeadline(keras.callbacks.Callback):
    """Ends a time-fitted run by `deadline`, with its learning-rate decay ending too.

    `epochs_that_fit` plans the epochs from a few timed steps; whole epochs can run
    slower or faster (6-35 % on a 2-core machine: the input pipeline and validation
    compete for the cores, a shared machine's speed drifts), and a deadline that cuts the
    last planned epochs leaves a cosine decay unfinished. After each epoch this estimates
    the epochs that fit from the median of the recent epochs (one slow epoch does not
    cut the plan, and the estimate recovers when epochs speed up again, never past the
    planned epochs), moves the end of the schedule's decay (`WarmupSchedule.end_at`) to
    the last epoch that fits, and stops when the next epoch, as slow as the slower of
    that median and the last epoch, would end past the deadline.

    Args:
        deadline: A `time.time()`.
        planned_epoch_s: The plan's seconds per epoch, the estimate until an epoch after
            the first is measured (the first also traces the graphs: on a slow machine
            that can take longer than several short epochs).
        log: Where a changed estimate is reported.
        clock: Returns the time in `deadline`'s seconds (`time.time` unless a test
            controls it).
        recent: Epochs the median is taken over.

    Attributes:
        revisions: {"after_epoch", "epoch_s", "epochs"} for each change of the epochs
            that fit.
    """

    def __init__(self, deadline, planned_epoch_s=None, log=print, clock=time.time, recent=5):
        super().__init__()
        self.deadline = deadline
        self.planned_epoch_s = planned_epoch_s
        self.log = log
        self.clock = clock
        self.recent = recent
        self.revisions = []
        self.epoch_started = None

    def on_train_begin(self, logs=None):
        self.steady_s = []
        self.planned = self.epochs = self.params["epochs"]
        self.schedule = shims.learning_rate_schedule(self.model.optimizer)

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch_started = self.clock()

    def on_epoch_end(self, epoch, logs=None):
        now = self.clock()
        took = now - self.epoch_started
        if epoch > 0 or self.planned_epoch_s is None:
            self.steady_s.append(took)
        epoch_s = float(np.median(self.steady_s[-self.recent:])) if self.steady_s else self.planned_epoch_s
        left = max(0.0, self.deadline - now)
        last_s = self.steady_s[-1] if self.steady_s else epoch_s
        if left < max(epoch_s, last_s):
            self.model.stop_training = True
        fit = max(epoch + 1, min(self.planned, epoch + 1 + int(left // epoch_s)))
        # Epochs jitter by a second or two: a change of an epoch or two either way is
        # noise, unless the run is ending.
        if fit == self.epochs or (abs(fit - self.epochs) < max(2, 0.05 * self.planned)
                                  and not self.model.stop_training):
            return
        self.epochs = fit
        self.revisions.append({"after_epoch": epoch + 1, "epoch_s": round(epoch_s, 1), "epochs": fit})
        movable = hasattr(self.schedule, "end_at")
        if movable:
            self.schedule.end_at(fit * self.params["steps"])
        self.log(f"  epochs take {epoch_s:.0f} s: {fit} epochs fit before the deadline"
                 + (", the learning rate's decay now ends with them" if movable else ""))


class StepTimer(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.ends = []

    def on_train_batch_end(self, batch, logs=None):
        self.ends.append(time.perf_counter())


class AtomicCheckpoint(keras.callbacks.Callback):
    """Wraps KerasTuner's best-epoch checkpoint (`SaveBestEpoch`).

    - The best epoch's weights are held in memory and written once, when training ends,
      as one .npz of `get_weights()` (`common.shims.NumpyCheckpointsMixin` reads it):
      Keras' `save_weights` takes ten times as long for a MobileNetV2 (one HDF5 dataset
      per variable), and a short trial pays it every round.
    - The write is atomic, so a kill mid-save never leaves a truncated checkpoint for
      the next Hyperband round to load.
    - `bind(model)` pins it to the end-to-end model while Keras trains only the top
      part (feature cache), so checkpoints stay loadable into `build(hp)`.
    """

    def __init__(self, callback):
        super().__init__()
        self.callback = callback
        self.full_model = None
        self.best_weights = None

    def bind(self, full_model):
        self.full_model = full_model
        return self

    def set_model(self, model):
        self.callback.set_model(self.full_model or model)

    def set_params(self, params):
        self.callback.set_params(params)

    def on_train_begin(self, logs=None):
        self.best_weights = None
        self.callback.on_train_begin(logs)

    def on_epoch_end(self, epoch, logs=None):
        objective = self.callback.objective
        if objective.has_value(logs):  # as SaveBestEpoch decides; without a value, every epoch is kept
            value = objective.get_value(logs)
            if not objective.better_than(value, self.callback.best_value):
                return
            self.callback.best_value = value
        self.best_weights = self.callback.model.get_weights()

    def on_train_end(self, logs=None):
        self.callback.on_train_end(logs)
        if self.best_weights is not None:
            atomic.write_arrays(self.callback.filepath, self.best_weights)
        self.best_weights = None


class TrialClock(keras.callbacks.Callback):
    """Where a fit's time goes: tracing, training steps, validation.

    The first training step of a fit includes tracing the step function; it counts as
    `trace` beyond the median step's time. Validation passes count as `validate`
    (the first includes tracing the test step); the time between two steps of an epoch
    (waiting for data, other callbacks' batch hooks) as `between_steps`.

    Args:
        seconds: The dict the figures are added to.
    """

    def __init__(self, seconds):
        super().__init__()
        self.seconds = seconds
        self.steps = []
        self.started = self.ended = None

    def on_train_begin(self, logs=None):
        self.steps = []

    def on_epoch_begin(self, epoch, logs=None):
        self.ended = None

    def on_train_batch_begin(self, batch, logs=None):
        self.started = time.perf_counter()
        if self.ended is not None:
            _add(self.seconds, "between_steps", self.started - self.ended)

    def on_train_batch_end(self, batch, logs=None):
        self.ended = time.perf_counter()
        self.steps.append(self.ended - self.started)

    def on_test_begin(self, logs=None):
        self.started = time.perf_counter()

    def on_test_end(self, logs=None):
        _add(self.seconds, "validate", time.perf_counter() - self.started)

    def on_train_end(self, logs=None):
        if not self.steps:
            return
        typical = sorted(self.steps)[len(self.steps) // 2]
        trace = max(0.0, self.steps[0] - typical) if len(self.steps) > 1 else 0.0
        _add(self.seconds, "trace", trace)
        _add(self.seconds, "train", sum(self.steps) - trace)


class Timed(keras.callbacks.Callback):
    """Runs `callback`, adding the seconds its hooks take to `seconds[bucket]`."""

    def __init__(self, callback, seconds, bucket):
        super().__init__()
        self.callback = callback
        self.seconds = seconds
        self.bucket = bucket

    def set_model(self, model):
        self.callback.set_model(model)

    def set_params(self, params):
        self.callback.set_params(params)


def _timed_hook(name):
    def hook(self, *args, **kwargs):
        started = time.perf_counter()
        try:
            return getattr(self.callback, name)(*args, **kwargs)
        finally:
            _add(self.seconds, self.bucket, time.perf_counter() - started)

    hook.__name__ = name
    return hook


for _name in ("on_train_begin", "on_train_end", "on_epoch_begin", "on_epoch_end", "on_train_batch_begin",
              "on_train_batch_end", "on_test_begin", "on_test_end", "on_test_batch_begin", "on_test_batch_end"):
    setattr(Timed, _name, _timed_hook(_name))


def _add(seconds, key, value):
    seconds[key] = seconds.get(key, 0.0) + value


class EpochProgress(keras.callbacks.Callback):
    """Epoch lines for long runs, at a readable rate: accuracy, validation accuracy, time left.

    A short epoch (a small dataset's) would print thousands of lines: after the first,
    a line is printed only when `every_s` seconds have passed since the last one, and the
    last epoch run always gets its line.

    Args:
        label: What is training (e.g. "phase2"), printed first.
        log: Where the line goes.
        deadline: Optional `time.time()` the job must end by; the line then says how
            long is left to it.
        every_s: Seconds between two lines at least.
    """

    def __init__(self, label, log=print, deadline=None, every_s=10.0):
        super().__init__()
        self.label = label
        self.log = log
        self.deadline = deadline
        self.every_s = every_s
        self.epoch_started = None
        self.last_line_at = None
        self.unprinted = None

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch_started = time.time()

    def on_epoch_end(self, epoch, logs=None):
        now = time.time()
        line = self._line(epoch, logs or {}, now)
        if self.last_line_at is None or now - self.last_line_at >= self.every_s:
            self.log(line)
            self.last_line_at, self.unprinted = now, None
        else:
            self.unprinted = line

    def on_train_end(self, logs=None):
        if self.unprinted:
            self.log(self.unprinted)

    def _line(self, epoch, logs, now):
        left = f", {max(0.0, self.deadline - now) / 60:.1f} min left in the job" if self.deadline else ""
        return (f"  {self.label} epoch {epoch + 1}/{self.params.get('epochs')}: accuracy "
                f"{logs.get('accuracy', float('nan')):.4f}, val_accuracy {logs.get('val_accuracy', float('nan')):.4f} "
                f"({now - self.epoch_started:.0f} s{left})")
