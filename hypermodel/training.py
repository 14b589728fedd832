"""The training loop: compile with the trial's schedule, fit end to end or on cached features.

`train` is the one way any model of the tool is fitted (search trials, both retrain
phases). It trains `trainable_top` on stored prefix activations when the feature
cache can serve the trial, else the whole model on images through tf.data.
`fine_tune_top` nudges an already trained top on given features (the int8 export's).
"""

import dataclasses
import math
import time

import keras
import numpy as np
from keras import ops

from common.shims import FusedAdamStepMixin, SaveBestEpoch, build_before_tracing
from data_pipeline.feature_cache import feature_batches
from data_pipeline.pipeline import make_dataset
from hypermodel.backbones import get_backbone
from hypermodel.metrics import compiled_metrics
from hypermodel.callbacks import AtomicCheckpoint, FailOnNaN, StepTimer, Timed, TrialClock
from hypermodel.model import PREFIX_NAME, TOP_NAME, prefixes_for, set_unfrozen_blocks_trainable, unfrozen_blocks_of
from hypermodel.schedules import WarmupSchedule


# A cached head's step is milliseconds, so Keras' per-step cost would dominate a long fit;
# the multi-step loop costs ~0.2 s more to trace, which a fit under ~250 steps never earns
# back (a smoke trial: 32-64). A top with backbone blocks takes tens of ms a step: never.
CACHED_HEAD_STEPS_PER_EXECUTION = 32
MULTI_STEP_MIN_STEPS = 256


@keras.saving.register_keras_serializable(package="transfer_tuner")
class SmoothedSparseCrossentropy(keras.losses.Loss):
    """Cross-entropy of integer labels smoothed towards the uniform distribution.

    Keras' sparse cross-entropy has no `label_smoothing`; this one-hot encodes the
    labels for the dense one, which has.

    Args:
        label_smoothing: The share of each label's mass spread over all classes.
    """

    def __init__(self, label_smoothing, name="smoothed_sparse_crossentropy", **kwargs):
        super().__init__(name=name, **kwargs)
        self.label_smoothing = label_smoothing

    def call(self, y_true, y_pred):
        labels = ops.one_hot(ops.cast(ops.reshape(y_true, (-1,)), "int32"), ops.shape(y_pred)[-1])
        return keras.losses.categorical_crossentropy(labels, y_pred, label_smoothing=self.label_smoothing)

    def get_config(self):
        return {**super().get_config(), "label_smoothing": self.label_smoothing}


@keras.saving.register_keras_serializable(package="transfer_tuner")
class FusedAdam(FusedAdamStepMixin, keras.optimizers.Adam):
    """Keras' Adam, each variable updated by TensorFlow's fused kernel (traces faster)."""


@keras.saving.register_keras_serializable(package="transfer_tuner")
class FusedAdamW(FusedAdamStepMixin, keras.optimizers.AdamW):
    """Keras' AdamW, each variable updated by TensorFlow's fused kernel (traces faster)."""


def compile_for_training(model, config, steps_per_epoch, epochs, learning_rate=None, steps_per_execution=1,
                         label_smoothing=0.0, ema_momentum=None):
    """Compiles with the trial's optimizer and warmup + decay schedule over `epochs`.

    Args:
        label_smoothing: Above 0, the loss is `SmoothedSparseCrossentropy`.
        ema_momentum: If set, the optimizer also keeps an exponential moving average of
            the weights (per step); fit with `keras.callbacks.SwapEMAWeights` to use it.
    """
    # The optimizer's variables (and the schedule's) must live under the strategy the model was built in.
    with model.distribute_strategy.scope():
        schedule = WarmupSchedule(
            learning_rate or config.learning_rate,
            config.lr_schedule,
            total_steps=steps_per_epoch * max(1, epochs),
            warmup_steps=steps_per_epoch * config.warmup_epochs,
        )
        ema = dict(use_ema=True, ema_momentum=ema_momentum) if ema_momentum else {}
        fused = model.distribute_strategy.num_replicas_in_sync == 1  # the fused kernel is per device
        if config.optimizer == "adamw":
            optimizer = (FusedAdamW if fused else keras.optimizers.AdamW)(schedule, weight_decay=1e-4, **ema)
        else:
            optimizer = (FusedAdam if fused else keras.optimizers.Adam)(schedule, **ema)
        loss = SmoothedSparseCrossentropy(label_smoothing) if label_smoothing else "sparse_categorical_crossentropy"
        model.compile(optimizer=optimizer, loss=loss, metrics=compiled_metrics(model.outputs[0].shape[-1]),
                      steps_per_execution=steps_per_execution)


def train(model, config, data, batch_size, seed, epochs, initial_epoch=0, learning_rate=None,
          callbacks=(), feature_cache=None, verbose=0, seconds=None, epoch_fraction=1.0, validate_once=False,
          cache_cuts=(), label_smoothing=0.0, ema_momentum=None, inference=None, class_weight=None):
    """Compiles and fits `model` on `data`, on cached prefix features when possible.

    Args:
        model: A model from `build_transfer_model`.
        config: Its `TrialConfig`.
        data: A `TrainingData`.
        learning_rate: Overrides `config.learning_rate` (the retrain's phase 2).
        callbacks: Keras callbacks; a NaN guard is added.
        feature_cache: A `FeatureCache`, or None to train end to end.
        seconds: Optional dict that receives where the time went ("features",
            "trace", "train", "validate", "checkpoint", "tensorboard").
        epoch_fraction: The passes over `data.x_train` one epoch trains on (search
            trials: below 1 on large datasets, above on small ones); other than 1 the
            epochs read one endless stream of passes, from where `initial_epoch` left it.
        validate_once: Train epochs `initial_epoch`..`epochs` as one Keras epoch (numbered
            as the last), so it is validated, checkpointed and logged once, at its end.
            The learning rate schedule still runs over the epochs.
        cache_cuts: Other `unfrozen_blocks` values (the search's choices) whose prefix
            features are built in the same pass when this trial's must be built.
        label_smoothing, ema_momentum: As in `compile_for_training`; with `ema_momentum`,
            validation, callbacks and the fitted model see the averaged weights.
        inference: `model`'s `InferencePass` over `cache_cuts` (the footprint's), which
            builds the features when it reaches the backbone's output.
        class_weight: Keras' {class: weight} of each class's loss, or None.

    Returns:
        (History, how it trained: "cached" or "end-to-end[: reason]").
    """
    callbacks = [AtomicCheckpoint(cb) if isinstance(cb, SaveBestEpoch) else cb for cb in callbacks]
    callbacks.append(FailOnNaN())
    # shuffle=False: the tf.data pipelines shuffle, in a seeded order (Keras would warn).
    fit = dict(epochs=epochs, initial_epoch=initial_epoch, verbose=verbose, shuffle=False, class_weight=class_weight)
    steps_per_epoch, stream_from = math.ceil(len(data.x_train) / batch_size), None
    schedule = dict(steps_per_epoch=steps_per_epoch, epochs=epochs - initial_epoch, learning_rate=learning_rate,
                    label_smoothing=label_smoothing, ema_momentum=ema_momentum)
    if ema_momentum:
        # Before the other callbacks, so that early stopping keeps the averaged weights.
        callbacks.insert(0, keras.callbacks.SwapEMAWeights(swap_on_epoch=True))
    if epoch_fraction != 1 or validate_once:
        steps_per_epoch = schedule["steps_per_epoch"] = max(1, round(steps_per_epoch * epoch_fraction))
        stream_from = initial_epoch * steps_per_epoch
        fit["steps_per_epoch"] = steps_per_epoch  # the stream is endless
    if validate_once:
        fit.update(initial_epoch=epochs - 1, steps_per_epoch=steps_per_epoch * (epochs - initial_epoch))
    mode = "end-to-end"
    if feature_cache is not None:
        reason = why_not_cached(model, config, data, feature_cache)
        if reason is None:
            return fit_on_features(model, config, data, batch_size, seed, schedule, callbacks,
                                   feature_cache, seconds, stream_from, cache_cuts, inference, **fit), "cached"
        mode = f"end-to-end: {reason}"
    compile_for_training(model, config, **schedule)
    preprocess_input = get_backbone(config.backbone).preprocess_input
    train_ds = make_dataset(
        data.x_train, data.y_train, config.resolution, preprocess_input,
        batch_size, shuffle_seed=seed, augmentation=config.augmentation, stream_from=stream_from,
    )
    val_ds = make_dataset(data.x_val, data.y_val, config.resolution, preprocess_input, batch_size)
    build_before_tracing(model, train_ds)
    history = model.fit(train_ds, validation_data=val_ds, callbacks=timed(callbacks, seconds), **fit)
    return history, mode


def timed(callbacks, seconds):
    """`callbacks` with checkpoint and TensorBoard hooks timed into `seconds`, plus a
    `TrialClock` (nothing changes when `seconds` is None)."""
    if seconds is None:
        return callbacks

    def bucket(callback):
        inner = callback.callback if isinstance(callback, AtomicCheckpoint) else callback
        if isinstance(inner, SaveBestEpoch):
            return "checkpoint"
        if isinstance(callback, keras.callbacks.TensorBoard) or "hparams" in type(callback).__module__:
            return "tensorboard"  # KerasTuner adds the HParams plugin's Keras callback per trial
        return None

    return [Timed(cb, seconds, bucket(cb)) if bucket(cb) else cb for cb in callbacks] + [TrialClock(seconds)]


def why_not_cached(model, config, data, feature_cache):
    """None when `model`'s top can train on cached features, else the reason it can't."""
    if config.augmentation != "none":
        return "augmentation"  # the cache holds one un-augmented view of each image
    if model.distribute_strategy.num_replicas_in_sync > 1:
        # Multi-device trials are for accelerators, where end to end is affordable;
        # the cached top's all-reduce is not supported here.
        return "multi-device strategy"
    needed = feature_cache.nbytes(model.get_layer(PREFIX_NAME), len(data.x_train) + len(data.x_val))
    if needed > feature_cache.budget_bytes:
        return f"cache {needed / 2**20:.0f} MB > budget {feature_cache.budget_bytes / 2**20:.0f} MB"
    return None


def fit_on_features(model, config, data, batch_size, seed, schedule, callbacks, feature_cache, seconds,
                    stream_from, cache_cuts, inference, **fit):
    """Trains `model`'s trainable top on the frozen prefix's cached activations.

    `schedule` holds `compile_for_training`'s arguments but the model and config.

    The top shares its weights with `model`, so `model` is trained too; checkpoints
    are pinned to `model` so they stay loadable into `build(hp)`.
    """
    prefix, top = model.get_layer(PREFIX_NAME), model.get_layer(TOP_NAME)
    backbone = get_backbone(config.backbone)

    fingerprints = {}  # the prefix is frozen: its fingerprint holds for both splits
    # A pass that runs the whole backbone anyway computes the cuts at no extra cost.
    shared = inference is not None and inference.reaches_backbone_output

    def features(images, split):
        return feature_cache.features(
            prefix, images, source=config.backbone, resolution=config.resolution,
            preprocess_input=backbone.preprocess_input, data_key=f"{data.key}/{split}",
            companions=lambda: inference.prefixes if shared else prefixes_for(model, backbone, cache_cuts),
            fingerprints=fingerprints, run_pass=inference.activations if shared else None,
        )

    started = time.perf_counter()
    train_features, val_features = features(data.x_train, "train"), features(data.x_val, "val")
    if seconds is not None:
        seconds["features"] = seconds.get("features", 0.0) + time.perf_counter() - started
    head_only = unfrozen_blocks_of(top) is None
    steps_per_epoch = fit.get("steps_per_epoch", math.ceil(len(data.x_train) / batch_size))
    multi_step = head_only and steps_per_epoch * (fit["epochs"] - fit["initial_epoch"]) >= MULTI_STEP_MIN_STEPS
    compile_for_training(top, config, **schedule,
                         steps_per_execution=CACHED_HEAD_STEPS_PER_EXECUTION if multi_step else 1)
    callbacks = [cb.bind(model) if isinstance(cb, AtomicCheckpoint) else cb for cb in callbacks]
    train_batches = feature_batches(train_features, data.y_train, batch_size, seed, stream_from)
    build_before_tracing(top, train_batches)
    return top.fit(
        train_batches,
        validation_data=feature_batches(val_features, data.y_val, batch_size),
        callbacks=timed(callbacks, seconds), **fit,
    )


@dataclasses.dataclass(frozen=True)
class EpochPlan:
    """How many epochs fit before a deadline, and the measurements that decided it.

    Args:
        epochs: Epochs that fit (≥ 1).
        epoch_s: Estimated seconds per epoch, validation included.
        train_step_s: A timed training step.
        steps_per_epoch: Training steps per epoch.
        validation_s: A validation pass, its fixed cost included.
        overhead_s: An epoch's other fixed cost (the training iterator, the callbacks).
        seconds_left: Seconds between the end of the timing and the deadline.
    """

    epochs: int
    epoch_s: float
    train_step_s: float
    steps_per_epoch: int
    validation_s: float
    overhead_s: float
    seconds_left: float

    def reasoning(self):
        return (f"{self.steps_per_epoch} steps × {1000 * self.train_step_s:.0f} ms + validation "
                f"{self.validation_s:.1f} s + {self.overhead_s:.1f} s fixed = {self.epoch_s:.0f} s per epoch; "
                f"{self.seconds_left:.0f} s left → "
                + (f"{self.epochs} epochs" if self.seconds_left >= self.epoch_s else "1 epoch, the minimum"))

    def to_dict(self):
        rounded = {k: round(v, 4) if isinstance(v, float) else v for k, v in dataclasses.asdict(self).items()}
        return {**rounded, "reasoning": self.reasoning()}


def epochs_that_fit(finish_by, model, config, data, batch_size, seed, timed_steps=24, warmup_steps=8,
                    validation_steps=(3, 9), **compile_options):
    """How many end-to-end epochs of `model` on `data` fit between the end of this timing
    and `finish_by` (a `time.time()`).

    Times real training steps (the run's pipeline and augmentation; the first
    `warmup_steps` absorb tracing and tf.data's warm-up: with 4 of them and 12 timed
    steps one estimate came out 40 % high), then two validation passes of different
    lengths, which give a validation step's time and a pass's fixed cost (its iterator
    and callbacks; assuming validation costs a third of a training step left epochs ~10 %
    longer than planned). Restores the weights, so the caller's schedule can be planned
    over the epochs that will actually run. `compile_options` (label smoothing, weight
    averaging) are `compile_for_training`'s, so their cost is timed too.

    Returns:
        An `EpochPlan`.
    """
    weights = model.get_weights()
    steps_per_epoch = math.ceil(len(data.x_train) / batch_size)
    val_steps = math.ceil(len(data.x_val) / batch_size)
    compile_for_training(model, config, steps_per_epoch, 1, **compile_options)
    preprocess_input = get_backbone(config.backbone).preprocess_input
    train_ds = make_dataset(
        data.x_train, data.y_train, config.resolution, preprocess_input,
        batch_size, shuffle_seed=seed, augmentation=config.augmentation,
    )
    timer = StepTimer()
    build_before_tracing(model, train_ds)
    # repeat(): a small training set may have fewer batches than the timing needs.
    model.fit(train_ds.repeat().take(warmup_steps + timed_steps), callbacks=[timer], verbose=0, shuffle=False)
    model.set_weights(weights)
    step_s = (timer.ends[-1] - timer.ends[warmup_steps - 1]) / (len(timer.ends) - warmup_steps)

    val_ds = make_dataset(data.x_val, data.y_val, config.resolution, preprocess_input, batch_size).repeat()
    model.evaluate(val_ds.take(1), verbose=0)  # traces the test step
    passes = []
    for count in validation_steps:
        started = time.perf_counter()
        model.evaluate(val_ds.take(count), verbose=0)
        passes.append(time.perf_counter() - started)
    short, long = validation_steps
    val_step_s = max(0.0, (passes[1] - passes[0]) / (long - short))
    pass_fixed_s = max(0.0, passes[0] - short * val_step_s)
    # An epoch: its training steps, a validation pass, and the same fixed cost again for
    # the training iterator and the epoch's callbacks.
    validation_s = val_step_s * val_steps + pass_fixed_s
    epoch_s = step_s * steps_per_epoch + validation_s + pass_fixed_s
    seconds_left = finish_by - time.time()
    return EpochPlan(max(1, int(seconds_left // epoch_s)), epoch_s, step_s, steps_per_epoch, validation_s,
                     pass_fixed_s, seconds_left)


def fine_tune_top(model, views, labels, val_views, val_labels, epochs, learning_rate, batch_size, seed):
    """Fine-tunes `model`'s trainable top (head and chosen blocks) on given prefix features,
    keeping the epoch with the best validation accuracy, or the weights it had if none beats
    them.

    Args:
        views: Feature arrays of the training images, one per view (the image, its mirror).
        val_views: The same for validation; the views' probabilities are averaged.

    Returns:
        (validation accuracy before, after, epochs run).
    """
    set_unfrozen_blocks_trainable(model, True)
    top = model.get_layer(TOP_NAME)

    def accuracy():
        probabilities = sum(top.predict(v, batch_size=256, verbose=0) for v in val_views)
        return float(np.mean(probabilities.argmax(axis=1) == val_labels))

    before = best = accuracy()
    best_weights = top.get_weights()
    features, targets = np.concatenate(views), np.tile(labels, len(views))  # every view is an example
    top.compile(optimizer=keras.optimizers.Adam(learning_rate), loss="sparse_categorical_crossentropy")
    keras.utils.set_random_seed(seed)
    for _ in range(epochs):
        top.fit(features, targets, batch_size=batch_size, epochs=1, shuffle=True, verbose=0)
        score = accuracy()
        if score > best:
            best, best_weights = score, top.get_weights()
    top.set_weights(best_weights)
    return before, best, epochs
