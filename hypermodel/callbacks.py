"""Keras callbacks the training loop adds: divergence, deadlines, progress, safe checkpoints."""

import math
import os
import time

import keras
import keras_tuner as kt


class FailOnNaN(keras.callbacks.Callback):
    """Ends a diverging trial as FAILED (KerasTuner does not retry FailedTrialError)."""

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            raise kt.errors.FailedTrialError(f"loss became {loss} at batch {batch}: training diverged")


class StopAtDeadline(keras.callbacks.Callback):
    """Stops training when another epoch as long as the last one would end past `deadline`.

    The safety net of a time-fitted run (`epochs_that_fit` plans the epochs; a machine
    that slows down mid-run still ends on time, one epoch short).
    """

    def __init__(self, deadline):
        super().__init__()
        self.deadline = deadline
        self.epoch_started = None

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch_started = time.time()

    def on_epoch_end(self, epoch, logs=None):
        now = time.time()
        if now + (now - self.epoch_started) > self.deadline:
            self.model.stop_training = True


class StepTimer(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.ends = []

    def on_train_batch_end(self, batch, logs=None):
        self.ends.append(time.perf_counter())


class AtomicCheckpoint(keras.callbacks.Callback):
    """Wraps KerasTuner's best-epoch checkpoint (`SaveBestEpoch`).

    - Saves go to a temporary file renamed over the checkpoint, so a kill mid-save
      never leaves a truncated checkpoint for the next Hyperband round to load.
    - `bind(model)` pins it to the end-to-end model while Keras trains only the top
      part (feature cache), so checkpoints stay loadable into `build(hp)`.
    """

    def __init__(self, callback):
        super().__init__()
        self.callback = callback
        self.full_model = None

    def bind(self, full_model):
        self.full_model = full_model
        return self

    def set_model(self, model):
        self.callback.set_model(self.full_model or model)

    def set_params(self, params):
        self.callback.set_params(params)

    def on_train_begin(self, logs=None):
        self.callback.on_train_begin(logs)

    def on_epoch_end(self, epoch, logs=None):
        final = self.callback.filepath
        tmp = final.replace(".weights.h5", ".tmp.weights.h5")
        self.callback.filepath = tmp
        try:
            self.callback.on_epoch_end(epoch, logs)
        finally:
            self.callback.filepath = final
        if os.path.exists(tmp):
            os.replace(tmp, final)

    def on_train_end(self, logs=None):
        self.callback.on_train_end(logs)




class EpochProgress(keras.callbacks.Callback):
    """One line per epoch for long runs: accuracy, validation accuracy, time left.

    Args:
        label: What is training (e.g. "phase2"), printed first.
        log: Where the line goes.
        deadline: Optional `time.time()` the job must end by; the line then says how
            long is left to it.
    """

    def __init__(self, label, log=print, deadline=None):
        super().__init__()
        self.label = label
        self.log = log
        self.deadline = deadline
        self.epoch_started = None

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch_started = time.time()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        epochs = self.params.get("epochs")
        left = f", {max(0.0, self.deadline - time.time()) / 60:.1f} min left in the job" if self.deadline else ""
        self.log(
            f"  {self.label} epoch {epoch + 1}/{epochs}: accuracy {logs.get('accuracy', float('nan')):.4f}, "
            f"val_accuracy {logs.get('val_accuracy', float('nan')):.4f} ({time.time() - self.epoch_started:.0f} s{left})"
        )
