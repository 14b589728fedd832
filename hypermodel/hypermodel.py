"""TransferHyperModel: KerasTuner's view of the models layer (declare, build, fit a trial)."""

import math
import time

import keras
import keras_tuner as kt
import numpy as np

from data_pipeline.splits import class_weights
from hypermodel import space
from hypermodel.footprint import FootprintChecker, Limits
from hypermodel.backbones import get_backbone
from hypermodel.model import InferencePass, ReusedBackbones, build_transfer_model
from hypermodel.training import train


class TransferHyperModel(kt.HyperModel):
    """Searches backbone, resolution, unfrozen blocks, head and LR schedule.

    Args:
        choices: A `hypermodel.space.SearchChoices`.
        num_classes: Output classes K.
        weights: "imagenet" or "none".
        batch_size: Training batch size.
        seed: Seeds initialisation and shuffling.
        early_stopping_patience: Passes over the training data without val_accuracy gain
            before a trial stops.
        feature_cache: A `FeatureCache`, or None to always train end to end.
        limits: Deployment `Limits`: a trial whose model breaks one is rejected untrained.
        epoch_fraction: The passes one epoch (Hyperband's unit) trains on: a share of
            a pass on large datasets, several passes on small ones.
        class_weight: "balanced", "none" or "auto" (`data_pipeline.splits.class_weights`).
        objective: What a trial is judged by (`hypermodel.metrics.OBJECTIVES`).
    """

    def __init__(self, choices, num_classes, weights="imagenet", batch_size=64, seed=0,
                 early_stopping_patience=2, feature_cache=None, limits=Limits(), epoch_fraction=1.0,
                 class_weight="none", objective="accuracy"):
        super().__init__(name="transfer")
        self.choices = choices
        self.num_classes = num_classes
        self.weights = weights
        self.batch_size = batch_size
        self.seed = seed
        self.early_stopping_patience = early_stopping_patience
        self.feature_cache = feature_cache
        self.footprints = FootprintChecker(limits)
        self.epoch_fraction = epoch_fraction
        self.class_weight = class_weight
        self.monitor = space.monitored(objective)
        self.backbones = ReusedBackbones()  # trials run one at a time in a process

    def declare_hyperparameters(self, hp):
        space.declare(hp, self.choices)

    def build(self, hp):
        config = space.declare(hp, self.choices)
        started = time.perf_counter()
        self.seconds = {}  # this trial's time, by where it went (read back by `fit`)
        model = build_transfer_model(config, self.num_classes, self.weights, self.seed, seconds=self.seconds,
                                     backbones=self.backbones)
        self.seconds["build"] = time.perf_counter() - started - self.seconds.get("weights", 0.0)
        return model

    def fit(self, hp, model, data, epochs=1, initial_epoch=0, callbacks=(), verbose=0, **kwargs):
        """Trains one trial; uses the feature cache when the trial allows it.

        Args:
            hp: The trial's hyperparameters.
            model: The model from `build(hp)` (weights loaded for Hyperband rounds > 0).
            data: A `TrainingData`.
            epochs, initial_epoch: As in `keras.Model.fit` (set by Hyperband).
            callbacks: KerasTuner's callbacks (checkpointing, TensorBoard, HParams).

        Returns:
            The Keras `History`, with `fit_mode` ("cached" or "end-to-end[: reason]"),
            `epochs_run`, `best_epoch` (counted from the trial's first round),
            `best_scores` (each objective's validation score at the best epoch),
            `train_seconds`, the model's `footprint` and `seconds` (where the trial's
            time went, see `training.train`; with "build", "weights", "footprint")
            added for the trial's record.

        Raises:
            TrialRejected: The model breaks a deployment limit (measured before training).
        """
        config = space.declare(hp, self.choices)
        seconds = getattr(self, "seconds", {})
        started = time.perf_counter()
        # One traced inference pass: the footprint times it, the feature cache may run it.
        cuts = (config.unfrozen_blocks, *self.choices.unfrozen_blocks)
        inference = InferencePass(model, get_backbone(config.backbone), cuts)
        footprint = self.footprints.check(model, config, inference)
        seconds["footprint"] = time.perf_counter() - started
        # Hyperband judges a round at its end; validating after each of its fractional
        # epochs would cost a third as much as training them.
        validate_once = "tuner/epochs" in hp.values and self.epoch_fraction < 1
        if not validate_once:
            callbacks = list(callbacks) + [
                keras.callbacks.EarlyStopping(
                    monitor=self.monitor, mode="max",
                    patience=math.ceil(self.early_stopping_patience / self.epoch_fraction),
                ),
            ]
        started = time.perf_counter()
        history, mode = train(
            model, config, data, batch_size=self.batch_size, seed=self.seed, epochs=epochs,
            initial_epoch=initial_epoch, callbacks=callbacks, feature_cache=self.feature_cache,
            verbose=verbose, seconds=seconds, epoch_fraction=self.epoch_fraction, validate_once=validate_once,
            cache_cuts=self.choices.unfrozen_blocks, inference=inference,
            class_weight=class_weights(data.y_train, data.num_classes, self.class_weight),
        )
        scores = history.history.get(self.monitor) or [0.0]
        best = int(np.argmax(scores))
        history.epochs_run = epochs - initial_epoch if validate_once else len(history.epoch)
        history.best_epoch = history.epoch[best] + 1
        history.best_scores = {name: float(history.history[name][best]) for name in map(space.monitored, space.OBJECTIVES)
                               if name in history.history}
        history.fit_mode = mode
        history.train_seconds = time.perf_counter() - started  # the trial's cost less building, measuring
        history.seconds = seconds
        history.footprint = footprint
        return history
