"""Expected values the tests compute themselves, independently of the tool's code paths:
the model input for raw 28×28 images, and a search's validation accuracies re-evaluated
from the checkpoints it saved."""

import json

import numpy as np


def resized_rgb(images, resolution):
    """28×28 gray uint8 images as float RGB at `resolution` (bilinear), before a
    backbone's own scaling."""
    import tensorflow as tf

    rgb = np.repeat(np.asarray(images, np.float32)[..., np.newaxis], 3, axis=-1)
    return tf.image.resize(rgb, (resolution, resolution), method="bilinear").numpy()


def mobilenet_inputs(images, resolution):
    """MobileNetV2's input for raw images: gray → RGB, bilinear resize, x / 127.5 - 1."""
    return resized_rgb(images, resolution) / 127.5 - 1.0


def trial_val_accuracies(run_dir, whole_validation=False, trial_ids=None):
    """trial_id → validation accuracy of each completed trial's saved best-epoch weights
    (or only of `trial_ids`'), predicted here on the search's validation split (MobileNetV2
    backbones), or with `whole_validation` on the retrain's (the whole split the search's
    is a slice of).

    The split is the run's own (config.json's settings); the model is built from the
    trial's hyperparameters and its checkpoint loaded, so the figure does not come from
    anything the search recorded.
    """
    from common import atomic
    from data_pipeline import load_dataset
    from hypermodel.model import build_transfer_model
    from hypermodel.space import config_from_values
    from tuning.jobs import search_data
    from tuning.run_dir import read_config
    from tuning.settings import Settings

    settings = Settings.from_dict(read_config(run_dir)["settings"])
    dataset = load_dataset(settings.data) if settings.data else load_dataset()
    if whole_validation:
        from data_pipeline.splits import training_data

        data = training_data(dataset, settings.validation_fraction, settings.seed, settings.retrain_subset)
    else:
        data = search_data(dataset, settings)
    accuracies, models = {}, {}
    for trial_dir in sorted((run_dir / "tuner").glob("trial_*")):
        trial = json.loads((trial_dir / "trial.json").read_text())
        if trial["status"] != "COMPLETED" or (trial_ids is not None and trial["trial_id"] not in trial_ids):
            continue
        config = config_from_values(trial["hyperparameters"]["values"])
        assert config.backbone.startswith("mobilenet_v2"), config.backbone
        # Weights come from the checkpoint: no ImageNet file to load, and one model per
        # architecture (Hyperband's rounds continue the same ones).
        shape = (config.backbone, config.resolution, config.unfrozen_blocks, config.pooling, config.dense_units,
                 config.dropout)
        if shape not in models:
            models[shape] = build_transfer_model(config, dataset.num_classes, weights="none")
        model = models[shape]
        model.set_weights(atomic.read_arrays(trial_dir / "checkpoint.weights.npz"))
        probabilities = np.asarray(model(mobilenet_inputs(data.x_val, config.resolution), training=False))
        accuracies[trial["trial_id"]] = float(np.mean(probabilities.argmax(axis=1) == data.y_val))
    return accuracies, len(data.y_val)


def assert_recorded_accuracies_are_the_checkpoints(run_dir, board):
    """The leaderboard's val_accuracy of every trial, and best_hparams.json's trial and
    accuracy, agree with the accuracies re-evaluated here (±1.5 images: the search
    validates on cached features, which may flip a near tie)."""
    evaluated, images = trial_val_accuracies(run_dir)
    tolerance = 1.5 / images
    recorded = dict(zip(board["trial_id"], board["val_accuracy"]))
    assert set(evaluated) == set(recorded), (set(evaluated), set(recorded))
    for trial_id, accuracy in evaluated.items():
        assert abs(recorded[trial_id] - accuracy) <= tolerance, (trial_id, recorded[trial_id], accuracy)
    best = json.loads((run_dir / "best_hparams.json").read_text())
    assert abs(best["val_accuracy"] - evaluated[best["trial_id"]]) <= tolerance, best
    assert evaluated[best["trial_id"]] >= max(evaluated.values()) - 2 * tolerance, (best["trial_id"], evaluated)
    return evaluated


def load_model_keras(path):
    """A run's model.keras, as saved (its optimizer and schedule are the tool's own
    registered classes)."""
    import keras

    import hypermodel.schedules  # noqa: F401  (registers WarmupSchedule)
    import hypermodel.training  # noqa: F401  (registers FusedAdam and FusedAdamW)

    return keras.models.load_model(path, compile=False)
