"""TransferHyperModel: builds a pretrained backbone + new head, and trains it per trial.

Every model is composed as `inputs → frozen_prefix → trainable_top`, where the cut
between the two sits at a block boundary of the backbone: below the first unfrozen
block (or at the backbone's output when `unfrozen_blocks = 0`). The frozen prefix's
output for an image never changes, which is what lets the feature cache
(data_pipeline/feature_cache.py) train `trainable_top` on stored activations: the
same function as the end-to-end model, without recomputing the prefix every epoch.
"""

import dataclasses
import math
import os
import time

import keras
import keras_tuner as kt
import numpy as np

from data_pipeline.pipeline import make_dataset
from hypermodel import space
from hypermodel.backbones import get_backbone
from hypermodel.schedules import WarmupSchedule

PREFIX_NAME, TOP_NAME, SUFFIX_NAME = "frozen_prefix", "trainable_top", "unfrozen_blocks"


@dataclasses.dataclass
class TrainingData:
    """The arrays a search trains and validates on (never the test split).

    Attributes:
        x_train, y_train, x_val, y_val: uint8 N×28×28 images and int labels.
        num_classes: K.
        key: Identifies this exact data (checksum + split), for cache keys.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    num_classes: int
    key: str = ""


def build_transfer_model(config, num_classes, weights="imagenet", seed=0):
    """Builds `inputs → frozen_prefix → trainable_top` for one `TrialConfig`.

    Args:
        config: A `hypermodel.space.TrialConfig`.
        num_classes: Output classes K.
        weights: "imagenet" or "none".
        seed: Seeds the random initialisation (head; whole backbone with "none").

    Returns:
        The end-to-end Keras model, expecting preprocessed [batch, res, res, 3] floats.
    """
    keras.utils.set_random_seed(seed)
    backbone = get_backbone(config.backbone)
    base = backbone.build(config.resolution, weights)
    prefix, suffix = split_backbone(base, backbone.block_ends(base), config.unfrozen_blocks)
    prefix.trainable = False

    top_inputs = keras.Input(prefix.output.shape[1:], name="prefix_features")
    x = top_inputs
    if suffix is not None:
        for layer in suffix.layers:
            # Keras 3: a non-trainable BatchNormalization runs in inference mode, keeping
            # the ImageNet statistics (the standard fine-tuning recipe).
            layer.trainable = not isinstance(layer, keras.layers.BatchNormalization)
        x = suffix(x)
    x = keras.layers.GlobalAveragePooling2D()(x) if config.pooling == "avg" else keras.layers.Flatten()(x)
    x = keras.layers.Dropout(config.dropout)(x)
    x = keras.layers.Dense(config.dense_units, activation="relu")(x)
    x = keras.layers.Dropout(config.dropout)(x)
    # float32 softmax even under mixed precision, for a numerically sound loss.
    outputs = keras.layers.Dense(num_classes, activation="softmax", dtype="float32")(x)
    top = keras.Model(top_inputs, outputs, name=TOP_NAME)

    inputs = keras.Input((config.resolution, config.resolution, 3), name="images")
    return keras.Model(inputs, top(prefix(inputs, training=False)), name=f"{config.backbone}_transfer")


def split_backbone(base, block_ends, unfrozen_blocks):
    """Cuts a backbone below its last `unfrozen_blocks` blocks.

    Args:
        base: The backbone model.
        block_ends: Its block boundaries, bottom to top (`Backbone.block_ends`).
        unfrozen_blocks: How many top blocks go to the suffix; clipped so that block 0,
            the stem, always stays in the frozen prefix.

    Returns:
        (prefix, suffix): `suffix(prefix(x)) == base(x)`; suffix is None for 0 blocks.
    """
    unfrozen = min(unfrozen_blocks, len(block_ends) - 1)
    if unfrozen == 0:
        return keras.Model(base.input, base.output, name=PREFIX_NAME), None
    cut = base.get_layer(block_ends[-(unfrozen + 1)]).output
    return keras.Model(base.input, cut, name=PREFIX_NAME), keras.Model(cut, base.output, name=SUFFIX_NAME)


def compile_for_training(model, config, steps_per_epoch, epochs, learning_rate=None):
    """Compiles with the trial's optimizer and warmup + decay schedule over `epochs`."""
    schedule = WarmupSchedule(
        learning_rate or config.learning_rate,
        config.lr_schedule,
        total_steps=steps_per_epoch * max(1, epochs),
        warmup_steps=steps_per_epoch * config.warmup_epochs,
    )
    # The optimizer's variables must live under the strategy the model was built in.
    with model.distribute_strategy.scope():
        if config.optimizer == "adamw":
            optimizer = keras.optimizers.AdamW(schedule, weight_decay=1e-4)
        else:
            optimizer = keras.optimizers.Adam(schedule)
        model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy", metrics=["accuracy"])


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


class _StepTimer(keras.callbacks.Callback):
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


class TransferHyperModel(kt.HyperModel):
    """Searches backbone, resolution, unfrozen blocks, head and LR schedule.

    Args:
        choices: A `hypermodel.space.SearchChoices`.
        num_classes: Output classes K.
        weights: "imagenet" or "none".
        batch_size: Training batch size.
        seed: Seeds initialisation and shuffling.
        early_stopping_patience: Epochs without val_accuracy gain before a trial stops.
        feature_cache: A `FeatureCache`, or None to always train end to end.
    """

    def __init__(self, choices, num_classes, weights="imagenet", batch_size=64, seed=0,
                 early_stopping_patience=2, feature_cache=None):
        super().__init__(name="transfer")
        self.choices = choices
        self.num_classes = num_classes
        self.weights = weights
        self.batch_size = batch_size
        self.seed = seed
        self.early_stopping_patience = early_stopping_patience
        self.feature_cache = feature_cache
        self.last_fit_mode = None  # how the last trial trained, for its log line

    def declare_hyperparameters(self, hp):
        space.declare(hp, self.choices)

    def build(self, hp):
        config = space.declare(hp, self.choices)
        return build_transfer_model(config, self.num_classes, self.weights, self.seed)

    def fit(self, hp, model, data, epochs=1, initial_epoch=0, callbacks=(), verbose=0, **kwargs):
        """Trains one trial; uses the feature cache when the trial allows it.

        Args:
            hp: The trial's hyperparameters.
            model: The model from `build(hp)` (weights loaded for Hyperband rounds > 0).
            data: A `TrainingData`.
            epochs, initial_epoch: As in `keras.Model.fit` (set by Hyperband).
            callbacks: KerasTuner's callbacks (checkpointing, TensorBoard, HParams).
        """
        config = space.declare(hp, self.choices)
        callbacks = list(callbacks) + [
            keras.callbacks.EarlyStopping(
                monitor="val_accuracy", mode="max", patience=self.early_stopping_patience
            ),
        ]
        history, self.last_fit_mode = train(
            model, config, data, batch_size=self.batch_size, seed=self.seed, epochs=epochs,
            initial_epoch=initial_epoch, callbacks=callbacks, feature_cache=self.feature_cache,
            verbose=verbose,
        )
        return history


def set_unfrozen_blocks_trainable(model, trainable):
    """Freezes or unfreezes the backbone blocks of `trainable_top` (BatchNorm stays frozen)."""
    top = model.get_layer(TOP_NAME)
    suffix = [layer for layer in top.layers if layer.name == SUFFIX_NAME]
    for layer in suffix[0].layers if suffix else []:
        layer.trainable = trainable and not isinstance(layer, keras.layers.BatchNormalization)


def train(model, config, data, batch_size, seed, epochs, initial_epoch=0, learning_rate=None,
          callbacks=(), feature_cache=None, verbose=0):
    """Compiles and fits `model` on `data`, on cached prefix features when possible.

    Args:
        model: A model from `build_transfer_model`.
        config: Its `TrialConfig`.
        data: A `TrainingData`.
        learning_rate: Overrides `config.learning_rate` (the retrain's phase 2).
        callbacks: Keras callbacks; a NaN guard is added.
        feature_cache: A `FeatureCache`, or None to train end to end.

    Returns:
        (History, how it trained: "cached" or "end-to-end[: reason]").
    """
    callbacks = [
        AtomicCheckpoint(cb) if type(cb).__name__ == "SaveBestEpoch" else cb for cb in callbacks
    ] + [FailOnNaN()]
    steps = math.ceil(len(data.x_train) / batch_size)
    compile_for_training(model, config, steps, epochs - initial_epoch, learning_rate)
    if feature_cache is not None:
        history = feature_cache.fit_top(
            model, config, data, batch_size, seed, epochs, initial_epoch, callbacks, verbose, learning_rate
        )
        if history is not None:
            return history, feature_cache.last_mode
        mode = feature_cache.last_mode
    else:
        mode = "end-to-end"
    backbone = get_backbone(config.backbone)
    train_ds = make_dataset(
        data.x_train, data.y_train, config.resolution, backbone.preprocess_input,
        batch_size, shuffle_seed=seed, augmentation=config.augmentation,
    )
    val_ds = make_dataset(data.x_val, data.y_val, config.resolution, backbone.preprocess_input, batch_size)
    history = model.fit(
        train_ds, validation_data=val_ds, epochs=epochs, initial_epoch=initial_epoch,
        callbacks=callbacks, verbose=verbose, shuffle=False,  # tf.data already shuffles
    )
    return history, mode


def epochs_that_fit(seconds, model, config, data, batch_size, seed, timed_steps=24, warmup_steps=8):
    """How many end-to-end epochs of `model` on `data` fit in `seconds`.

    Times real training steps (the run's pipeline and augmentation; the first
    `warmup_steps` absorb tracing and tf.data's warm-up: with 4 of them and 12 timed
    steps one estimate came out 40 % high), then restores the weights, so the caller's
    schedule can be planned over the epochs that will actually run.

    Returns:
        (epochs, estimated seconds per epoch including validation); epochs ≥ 1.
    """
    weights = model.get_weights()
    steps_per_epoch = math.ceil(len(data.x_train) / batch_size)
    compile_for_training(model, config, steps_per_epoch, 1)
    train_ds = make_dataset(
        data.x_train, data.y_train, config.resolution, get_backbone(config.backbone).preprocess_input,
        batch_size, shuffle_seed=seed, augmentation=config.augmentation,
    )
    timer = _StepTimer()
    # repeat(): a small training set may have fewer batches than the timing needs.
    model.fit(train_ds.repeat().take(warmup_steps + timed_steps), callbacks=[timer], verbose=0)
    model.set_weights(weights)
    step_s = (timer.ends[-1] - timer.ends[warmup_steps - 1]) / (len(timer.ends) - warmup_steps)
    # Validation is a forward pass: about a third of a training step per batch.
    epoch_s = step_s * (steps_per_epoch + math.ceil(len(data.x_val) / batch_size) / 3)
    return max(1, int(seconds // epoch_s)), epoch_s
