"""Every place the tool leans on private KerasTuner or TensorFlow internals, in one module.

Written for keras-tuner 1.4.8 and TensorFlow 2.21 (see `WRITTEN_FOR`). Importing this
module checks the installed versions and that each internal still exists, so a library
upgrade fails with one line saying what to do, not with an AttributeError deep in a
trial. `tests/test_shims.py` has one test per shim that fails when the library's
behaviour changes.

The shims:
1. `synchronized`: the oracle's lock decorator (KerasTuner's lock and owner tables), for
   methods a distributed chief runs concurrently with its gRPC threads; unlike
   KerasTuner's own decorator, an exception releases the lock (KerasTuner's would
   keep it held, and every later call from every worker would wait forever).
2. `SaveBestEpoch`: KerasTuner's best-epoch checkpoint callback class, to recognise it
   among the callbacks KerasTuner hands to `HyperModel.fit`.
3. `route_keras_tuner_json_writes`: KerasTuner writes trial.json / oracle.json through
   `keras_tuner.src.utils.save_json`; routing it through an atomic writer means a kill
   mid-write never leaves a truncated file that breaks resume.
4. `init_tuner`: `kt.Tuner.__init__` called directly, so a Hyperband tuner can be given
   an oracle of our own (kt.Hyperband's constructor always builds its own).
5. `DeclaredSpaceMixin`: replaces `Tuner._populate_initial_space`, which builds (and
   loads weights for) a whole model only to discover conditional hyperparameters; the
   tool's space has none, so declaring it is enough.
6. `custom_gradient_keys` / `forget_custom_gradients`: TensorFlow's global gradient
   registry pins every traced Keras train step forever (tensorflow/tensorflow#80895,
   20-40 MB per trial); the tuner drops a finished trial's entries.
7. `hide_failed_trial_tracebacks`: KerasTuner prints every failed trial's traceback
   (`keras_tuner.src.config.DEBUG`, on by default); the tuner prints them itself, except
   for trials rejected by a deployment limit, which are not errors.
8. `build_before_tracing`: without a distribution strategy, Keras' TensorFlow trainer
   creates the optimizer's and metrics' variables inside the first trace of the train
   step, and `tf.function` then traces the whole step a second time (seconds per trial
   for a fine-tuned top); `Trainer._symbolic_build` creates them first, as Keras itself
   does under a strategy.
9. `NumpyCheckpointsMixin`: a trial's best-epoch checkpoint is one .npz of the model's
   weights (`common.atomic.write_arrays`), not Keras' `.weights.h5`; it replaces
   `Tuner._get_checkpoint_fname`, the checkpoint load in `Hyperband._build_hypermodel`
   (through `Tuner._build_hypermodel`) and `Tuner.load_model`.
10. `InterruptibleCallbackCopyMixin`: `Tuner._deepcopy_callbacks` copies the callbacks
   at each trial's start inside a bare `except:`, so a Ctrl-C landing there became a
   `FatalValueError` (exit 1 with a traceback, not the CLI's "interrupted", exit 130).
11. `learning_rate_schedule`: a Keras optimizer keeps the schedule it was given in
   `_learning_rate` (its public `learning_rate` is the current value); a time-fitted
   run moves the end of its schedule's decay while it trains (`FitToDeadline`).
12. `FusedAdamStepMixin`: Adam's per-variable update as TensorFlow's fused kernel, which
   reads the moments from `Adam._momentums` / `_velocities`; Keras' own update builds
   about fifteen ops per variable, and tracing them was a second of a 17-block top's
   train step.
13. `requeue_trial`: hands a running trial back to the oracle's retry queue
   (`Oracle._retry_queue`, which `create_trial` serves before any new trial), so the
   trial of a worker that died runs again on another worker.
14. `running_trials`, `waiting_workers`, `ended_trial_ids`, `started_trial_ids`: the
   oracle's undocumented bookkeeping (`Oracle.ongoing_trials`, `tuner_ids`, `end_order`,
   `start_order`): which worker runs which trial, the workers a distributed chief waits
   for before it ends the search (a worker kept there waits with the others; one dropped
   is no longer waited for), and the orders trials ended and started in (both saved in
   oracle.json).
15. `proposal_undone`: `Oracle.get_state` / `set_state` restore every effect of a
   `populate_space` call (Hyperband's bracket bookkeeping, the random state, the tried
   values), so a proposal the time budget cannot afford is taken back as if never made.
16. `IdleAskPauseMixin`: `BaseTuner.search` calls the undocumented `pre_create_trial`
   before each ask for a trial; a worker the oracle answers IDLE asks again at once,
   flooding the chief, unless this hook pauses it.
17. `tflite_converter`: `TFLiteConverter.from_concrete_functions` writes the function to a
   temporary SavedModel and converts that (`experimental_lower_to_saved_model`, on by
   default and undocumented); freezing the function directly gives the same file without
   writing every weight to disk and reading it back (4.6x faster on a MobileNetV2,
   benchmarks/tflite_conversion.py).
"""

import copy
import functools
import os
import threading
import time

import keras
import keras_tuner as kt
import tensorflow as tf
from keras_tuner.src import config as _kt_config
from keras_tuner.src import utils as _kt_utils
from keras_tuner.src.engine import oracle as _kt_oracle
from keras_tuner.src.engine import tuner_utils as _kt_tuner_utils
from tensorflow.python.framework import ops as _tf_ops

from common import atomic
from common.errors import UserError

WRITTEN_FOR = {"keras-tuner": ("1.4", kt.__version__), "tensorflow": ("2.21", tf.__version__),
               "keras": ("3.15", keras.__version__)}


class LibraryVersionError(UserError):
    """An installed library is not the version the shims were written for."""


def check_versions(written_for=WRITTEN_FOR):
    """Raises `LibraryVersionError` unless each library's version starts as expected."""
    for name, (expected, installed) in written_for.items():
        if installed != expected and not installed.startswith(expected + "."):
            raise LibraryVersionError(
                f"{name} {installed} is installed, but this tool's library shims (common/shims.py) were "
                f"written for {name} {expected}.x: run `pip install -r requirements.txt`"
            )


def _require(owner, name):
    if not hasattr(owner, name):
        raise LibraryVersionError(
            f"{getattr(owner, '__name__', owner)} has no {name}: the installed library changed under "
            "common/shims.py; run `pip install -r requirements.txt`"
        )
    return getattr(owner, name)


check_versions()

# 1.
_kt_locks = _require(_kt_oracle, "LOCKS")
_kt_lock_owners = _require(_kt_oracle, "THREADS")


def synchronized(method):
    """Runs an oracle method holding the oracle's lock, as KerasTuner's `synchronized`
    does (re-entrant per thread, shared with KerasTuner's own decorated methods), and
    releases it however the method ends."""

    @functools.wraps(method)
    def locked(oracle, *args, **kwargs):
        thread = threading.current_thread().name
        if _kt_lock_owners[oracle] == thread:
            return method(oracle, *args, **kwargs)
        with _kt_locks[oracle]:
            _kt_lock_owners[oracle] = thread
            try:
                return method(oracle, *args, **kwargs)
            finally:
                _kt_lock_owners[oracle] = None

    return locked

# 2.
SaveBestEpoch = _require(_kt_tuner_utils, "SaveBestEpoch")


# 3.
def route_keras_tuner_json_writes(write_text):
    """Makes KerasTuner write its JSON files with `write_text(path, text)`."""
    _require(_kt_utils, "save_json")

    def save_json(path, obj):
        import json

        text = json.dumps(obj)
        write_text(path, text)
        return text

    _kt_utils.save_json = save_json


# 4.
def init_tuner(tuner, oracle, hypermodel, **kwargs):
    """Runs `kt.Tuner.__init__` on `tuner`, skipping its subclasses' constructors."""
    kt.Tuner.__init__(tuner, oracle, hypermodel, **kwargs)


# 5.
_require(kt.Tuner, "_populate_initial_space")


class DeclaredSpaceMixin:
    """A Tuner mixin: the space is whatever `hypermodel.declare_hyperparameters` declares."""

    def _populate_initial_space(self):
        hp = self.oracle.get_space()
        self.hypermodel.declare_hyperparameters(hp)
        self.oracle.update_space(hp)


# 6.
_gradient_registry = _require(_tf_ops, "_gradient_registry")
_require(_gradient_registry, "_registry")


def custom_gradient_keys():
    """The `CustomGradient-*` entries of TensorFlow's global gradient registry."""
    return {k for k in _gradient_registry._registry if k.startswith("CustomGradient-")}


def forget_custom_gradients(keep):
    """Drops every custom gradient registered since `keep = custom_gradient_keys()`."""
    for key in custom_gradient_keys() - keep:
        _gradient_registry._registry.pop(key, None)


# 7.
_require(_kt_config, "DEBUG")


def hide_failed_trial_tracebacks():
    """Stops KerasTuner from printing the traceback of each failed trial."""
    _kt_config.DEBUG = False


# 8.
_require(keras.Model, "_symbolic_build")


def build_before_tracing(model, dataset):
    """Creates `model`'s optimizer and metric variables from `dataset`'s element shapes
    (no data is read, so its shuffle order is untouched), so its first `fit` traces the
    train step once, not twice. Needs `model` compiled."""
    batch = tf.nest.map_structure(lambda spec: tf.zeros([d or 1 for d in spec.shape], spec.dtype),
                                  dataset.element_spec)
    with model.distribute_strategy.scope():
        model._symbolic_build(data_batch=batch)


# 9.
_require(kt.Tuner, "_get_checkpoint_fname")
_require(kt.Tuner, "_build_hypermodel")


CHECKPOINT_FILE = "checkpoint.weights.npz"  # in each trial's directory


class NumpyCheckpointsMixin:
    """A Tuner mixin: trial checkpoints are .npz files of `model.get_weights()`.

    Keras' `save_weights` / `load_weights` take about 0.2 s each for a MobileNetV2 (one
    HDF5 dataset per variable, found by walking the model); the arrays in one .npz take
    about 0.02 s, and a short trial writes one checkpoint and its next round reads it.
    The optimizer's state is not kept, as KerasTuner's next round never restored it.
    """

    def _get_checkpoint_fname(self, trial_id):
        return os.path.join(self.get_trial_dir(trial_id), CHECKPOINT_FILE)

    def _build_hypermodel(self, hp):
        model = kt.Tuner._build_hypermodel(self, hp)  # not Hyperband's, which loads a .weights.h5
        if "tuner/trial_id" in hp.values:  # a Hyperband round continuing an earlier trial
            self._load_checkpoint(model, hp.values["tuner/trial_id"])
        return model

    def load_model(self, trial):
        return self._load_checkpoint(self._try_build(trial.hyperparameters), trial.trial_id)

    def _load_checkpoint(self, model, trial_id):
        model.set_weights(atomic.read_arrays(self._get_checkpoint_fname(trial_id)))
        return model


# 10.
_require(kt.Tuner, "_deepcopy_callbacks")


class InterruptibleCallbackCopyMixin:
    """A Tuner mixin: copying a trial's callbacks fails like KerasTuner's for a callback
    that cannot be copied, but lets KeyboardInterrupt and SystemExit through."""

    def _deepcopy_callbacks(self, callbacks):
        try:
            return copy.deepcopy(callbacks)
        except Exception as e:
            raise kt.errors.FatalValueError(
                f"All callbacks used during a search should be deep-copyable (they are reused across "
                f"trials); `copy.deepcopy({callbacks})` failed: {e}") from e


# 11.
_require(keras.optimizers.Optimizer, "_get_current_learning_rate")


def learning_rate_schedule(optimizer):
    """The `LearningRateSchedule` `optimizer` was given, or None for a fixed rate."""
    schedule = getattr(optimizer, "_learning_rate", None)
    return schedule if isinstance(schedule, keras.optimizers.schedules.LearningRateSchedule) else None


# 12.
_require(keras.optimizers.Optimizer, "_get_variable_index")


class FusedAdamStepMixin:
    """An Adam (or AdamW) mixin: each variable's update is one `ResourceApplyAdam` op.

    The kernel computes what Keras' `Adam.update_step` does, in the same order:
    m += (g − m)(1 − β1), v += (g² − v)(1 − β2), var −= m·α / (√v + ε) with
    α = lr·√(1 − β2ᵗ) / (1 − β1ᵗ). AdamW's decoupled weight decay is applied before it,
    by Keras, as before. Single-replica only: the kernel writes the variable's own
    handle. No AMSGrad.
    """

    def apply(self, grads, trainable_variables=None):
        self._step_scalars = None  # one set per step, built with the step's first update
        return super().apply(grads, trainable_variables)

    def update_step(self, gradient, variable, learning_rate):
        dtype = variable.dtype
        if self._step_scalars is None or self._step_scalars[0] != dtype:
            step = tf.cast(self.iterations + 1, dtype)
            self._step_scalars = (dtype, dict(
                lr=tf.cast(learning_rate, dtype),
                beta1=tf.constant(self.beta_1, dtype), beta2=tf.constant(self.beta_2, dtype),
                beta1_power=tf.pow(tf.constant(self.beta_1, dtype), step),
                beta2_power=tf.pow(tf.constant(self.beta_2, dtype), step),
                epsilon=tf.constant(self.epsilon, dtype),
            ))
        index = self._get_variable_index(variable)
        tf.raw_ops.ResourceApplyAdam(
            var=_tf_variable(variable).handle, m=_tf_variable(self._momentums[index]).handle,
            v=_tf_variable(self._velocities[index]).handle, grad=tf.cast(gradient, dtype), use_locking=False,
            **self._step_scalars[1])


def _tf_variable(variable):
    return variable.value if isinstance(variable, keras.Variable) else variable


# 13.
_require(kt.Oracle(objective="val_loss", max_trials=1), "_retry_queue")


def requeue_trial(oracle, tuner_id):
    """Takes the trial running on `tuner_id` back; the next `create_trial` from any
    worker gets it again, with its id and hyperparameters. Call with the oracle's lock."""
    trial = oracle.ongoing_trials.pop(tuner_id)
    oracle._retry_queue.append(trial.trial_id)
    return trial


# 14.
_probe_oracle = kt.Oracle(objective="val_loss", max_trials=1)
for _name in ("ongoing_trials", "tuner_ids", "end_order", "start_order"):
    _require(_probe_oracle, _name)


def running_trials(oracle):
    """{worker id: its running `Trial`}: the oracle's own table (change it under its lock)."""
    return oracle.ongoing_trials


def waiting_workers(oracle):
    """The set of worker ids a distributed chief waits for before it ends the search."""
    return oracle.tuner_ids


def ended_trial_ids(oracle):
    """The ids of the ended trials, in the order they ended."""
    return oracle.end_order


def started_trial_ids(oracle):
    """The ids of the trials handed out, in the order they started."""
    return oracle.start_order


# 15.
class proposal_undone:
    """`with proposal_undone(oracle) as undo: ... undo()` takes back what the oracle's
    state changed inside the block (a `populate_space` proposal) when `undo` is called."""

    def __init__(self, oracle):
        self.oracle = oracle

    def __enter__(self):
        snapshot = copy.deepcopy(self.oracle.get_state())
        return lambda: self.oracle.set_state(snapshot)

    def __exit__(self, *exc):
        return False


# 16.
_require(kt.engine.base_tuner.BaseTuner, "pre_create_trial")


class IdleAskPauseMixin:
    """For a `kt.Tuner`: pauses `idle_pause_s` before a worker asks again for a trial
    after an ask that got none (KerasTuner's search loop asks again at once while the
    oracle answers IDLE, which floods a chief and slows every other worker's reports)."""

    idle_pause_s = 0.5
    _asked_without_trial = False

    def pre_create_trial(self):
        if self._asked_without_trial:
            time.sleep(self.idle_pause_s)
        self._asked_without_trial = True

    def on_trial_begin(self, trial):
        self._asked_without_trial = False
        super().on_trial_begin(trial)


# 17.
def tflite_converter(function, trackable):
    """A `tf.lite.TFLiteConverter` for `function` (a `tf.function` with an input
    signature) over `trackable`'s variables, which it freezes without a SavedModel."""
    converter = tf.lite.TFLiteConverter.from_concrete_functions([function.get_concrete_function()], trackable)
    _require(converter, "experimental_lower_to_saved_model")
    converter.experimental_lower_to_saved_model = False
    return converter
