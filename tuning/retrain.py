"""Two-phase retraining of the best configuration, then one evaluation on the test split.

    Phase 1: backbone frozen, head trained at the chosen learning rate.
    Phase 2: the chosen top blocks unfrozen (BatchNorm frozen, inference mode),
             a lower learning rate (the profile's `phase2_lr_factor`, 0.1 by default),
             same schedule shape, optionally a stronger augmentation, label smoothing
             and a moving average of the weights (`label_smoothing`, `ema_momentum`);
             with a job deadline, as many epochs as fit before it (timed, not guessed).
Both phases stop early on validation accuracy and restore their best weights. Flip
test-time augmentation is then kept if it helps on validation.
"""

import dataclasses
import json
import time
from pathlib import Path

import keras
import keras_tuner as kt
import numpy as np
import tensorflow as tf

from common import atomic
from common.errors import DataError, UsageError, UserError
from data_pipeline.pipeline import make_dataset
from hypermodel.backbones import get_backbone
from hypermodel.callbacks import EpochProgress, FitToDeadline
from hypermodel.model import build_transfer_model, set_unfrozen_blocks_trainable
from hypermodel.space import config_from_values
from hypermodel.training import epochs_that_fit, train
from tuning import report

# After phase 2: TTA check, test evaluation, the exports (converted, the int8 top tuned, each
# scored and timed: ~170 s on the default job), report.
FINISH_RESERVE_S = 330


class DivergedError(UserError):
    """The best configuration diverged when retrained."""


def read_best(run_dir):
    """Reads best_hparams.json and checks it against the search space and registry."""
    path = Path(run_dir) / "best_hparams.json"
    if not path.is_file():
        raise UsageError(f"{path} not found: the search has not completed a trial yet")
    try:
        best = json.loads(path.read_text())
        config = config_from_values(best["hyperparameters"])
        get_backbone(config.backbone)
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(path, f"not a valid best_hparams.json ({e})") from None
    except UsageError as e:
        raise DataError(path, str(e)) from None
    return best, config


def retrain(run_dir, settings, dataset, data, feature_cache=None, deadline=None, log=print):
    """Retrains the best configuration in two phases, evaluates on test, saves model.keras.

    Args:
        run_dir: The run directory (reads best_hparams.json, writes model.keras, metrics.json).
        settings: The run's `Settings` (`epochs`: of each phase; default from the
            profile or the search).
        dataset: The `Dataset` (its test split is read here, once, at the end).
        data: `TrainingData` for the retrain (train + validation).
        deadline: `time.time()` by which the whole job should end; phase 2 then gets as
            many epochs as fit before it (less `FINISH_RESERVE_S` for test and export).

    Returns:
        The metrics dict written to metrics.json.
    """
    run_dir = Path(run_dir)
    best, config = read_best(run_dir)
    phase1_epochs, phase2_epochs = _phase_epochs(best, settings, settings.epochs, deadline)
    phase2_config = dataclasses.replace(config, augmentation=settings.retrain_augmentation or config.augmentation)
    log(f"retraining trial {best['trial_id']} (val_accuracy {best['val_accuracy']:.4f}): "
        f"{config.backbone} {config.resolution}px, unfrozen_blocks={config.unfrozen_blocks}; "
        f"phase 1 {phase1_epochs} epochs, phase 2 {phase2_epochs or 'as many epochs as fit'}")
    model = build_transfer_model(config, data.num_classes, settings.weights, settings.seed)
    histories = {}
    for phase, epochs_, lr, phase_config in (
        ("phase1", phase1_epochs, config.learning_rate, config),
        ("phase2", phase2_epochs, config.learning_rate * settings.phase2_lr_factor, phase2_config),
    ):
        if phase == "phase2" and config.unfrozen_blocks == 0:
            histories[phase] = {"skipped": "unfrozen_blocks = 0: nothing to unfreeze"}
            continue
        set_unfrozen_blocks_trainable(model, phase == "phase2")
        started = time.time()
        callbacks = [
            keras.callbacks.TensorBoard(str(run_dir / "tensorboard" / "retrain" / phase), write_graph=False),
            EpochProgress(phase, log, deadline),
        ]
        patience = settings.early_stopping_patience
        regularisation = {}
        if phase == "phase2":
            regularisation = dict(label_smoothing=settings.label_smoothing, ema_momentum=settings.ema_momentum)
        plan = {}
        if epochs_ is None:  # phase 2 fitted to the job's deadline
            finish_by = deadline - FINISH_RESERVE_S
            fitted = epochs_that_fit(finish_by, model, phase_config, data, settings.batch_size, settings.seed,
                                     **regularisation)
            epochs_ = fitted.epochs
            plan = {"plan": {**fitted.to_dict(), "finish_reserve_s": FINISH_RESERVE_S}}
            fit_to_deadline = FitToDeadline(finish_by, planned_epoch_s=fitted.epoch_s, log=log)
            callbacks.append(fit_to_deadline)
            # The schedule decays over exactly these epochs: run them all (augmented
            # validation accuracy dips early on), keep the best.
            patience = epochs_
            log(f"  phase2 plan, timed on this machine: {fitted.reasoning()} before the job's deadline "
                f"(less {FINISH_RESERVE_S} s for test and export)")
        callbacks.append(keras.callbacks.EarlyStopping(
            monitor="val_accuracy", mode="max", patience=patience, restore_best_weights=True,
        ))
        try:
            history, mode = train(
                model, phase_config, data, batch_size=settings.batch_size, seed=settings.seed, epochs=epochs_,
                learning_rate=lr, callbacks=callbacks, feature_cache=feature_cache, verbose=settings.verbose,
                **regularisation,
            )
        except kt.errors.FailedTrialError as e:
            raise DivergedError(
                f"retraining trial {best['trial_id']} diverged in {phase} ({e}): rerun the search with a "
                "lower learning-rate range, or retrain another trial by editing best_hparams.json"
            ) from None
        if plan:
            plan["plan"]["revisions"] = fit_to_deadline.revisions
        histories[phase] = {
            "history": {k: [float(v) for v in vals] for k, vals in history.history.items()},
            "best_val_accuracy": float(max(history.history["val_accuracy"])),
            "epochs": len(history.epoch),
            "seconds": round(time.time() - started, 1),
            "learning_rate": lr,
            "augmentation": phase_config.augmentation,
            **regularisation,
            "mode": mode,
            **plan,
        }
        log(f"  {phase}: {len(history.epoch)} epochs [{mode}], best val_accuracy "
            f"{histories[phase]['best_val_accuracy']:.4f} ({histories[phase]['seconds']:.0f} s)")
    set_unfrozen_blocks_trainable(model, True)
    save_model(model, run_dir / "model.keras")
    tta = choose_tta(model, config, data, settings.batch_size)
    log(f"  flip TTA: validation accuracy {tta['val_accuracy_plain']:.4f} plain, {tta['val_accuracy_flip']:.4f} "
        f"flip-averaged: {'used' if tta['used'] else 'not used'}")
    metrics = evaluate_test(model, config, dataset, settings.batch_size, tta=tta["used"])
    predicted = np.array(metrics.pop("predicted"))
    metrics.update(histories, tta=tta, trial_id=best["trial_id"], hyperparameters=config.to_dict())
    atomic.write_json(run_dir / "metrics.json", metrics)
    report.plot_confusion_matrix(np.array(metrics["confusion_matrix"]), dataset.class_names, run_dir / "confusion_matrix.png")
    report.plot_misclassified(dataset.x_test, dataset.y_test, predicted, dataset.class_names,
                              run_dir / "misclassified.png")
    log(f"test accuracy: {metrics['test_accuracy']:.4f} ({len(dataset.y_test)} test images)")
    return metrics


def _phase_epochs(best, settings, epochs, deadline):
    """(phase 1, phase 2) epochs; phase 2 None = fit it to the deadline."""
    if epochs:
        return epochs, epochs
    searched = max(1, round((best.get("epochs") or settings.max_epochs) * settings.epoch_fraction))  # passes
    phase1, phase2 = settings.retrain_epochs or (None, None)
    if deadline is not None:
        return phase1 or searched, None
    return phase1 or searched, phase2 or searched


def choose_tta(model, config, data, batch_size):
    """Flip test-time augmentation, kept only if it raises validation accuracy.

    Decided on the validation split, so the test split stays read once.
    """
    backbone = get_backbone(config.backbone)
    ds = make_dataset(data.x_val, None, config.resolution, backbone.preprocess_input, batch_size)
    plain = model.predict(ds, verbose=0)
    flipped = model.predict(ds.map(flip_images), verbose=0)
    plain_accuracy = float(np.mean(plain.argmax(1) == data.y_val))
    flip_accuracy = float(np.mean((plain + flipped).argmax(1) == data.y_val))
    return {"val_accuracy_plain": plain_accuracy, "val_accuracy_flip": flip_accuracy,
            "used": flip_accuracy > plain_accuracy}


def flip_images(images):
    """Horizontal flip of a preprocessed NHWC batch."""
    return tf.reverse(images, axis=[2])


def save_model(model, path):
    """Saves a `.keras` file atomically (written beside, then renamed)."""
    tmp = path.with_name(f".{path.stem}.tmp.keras")
    model.save(tmp)
    tmp.replace(path)


def evaluate_test(model, config, dataset, batch_size=128, tta=False):
    """The one place the test split is read: accuracy, per-class P/R/F1, confusion matrix.

    Args:
        tta: Average the predictions of each image and its horizontal flip.

    Returns:
        The metrics, and `predicted`: the class predicted for each test image.
    """
    backbone = get_backbone(config.backbone)
    ds = make_dataset(dataset.x_test, None, config.resolution, backbone.preprocess_input, batch_size)
    probabilities = model.predict(ds, verbose=0)
    if tta:
        probabilities = probabilities + model.predict(ds.map(flip_images), verbose=0)
    predicted = np.argmax(probabilities, axis=1)
    truth = dataset.y_test
    k = dataset.num_classes
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (truth, predicted), 1)
    per_class = {}
    for i, name in enumerate(dataset.class_names):
        tp = confusion[i, i]
        precision = tp / confusion[:, i].sum() if confusion[:, i].sum() else 0.0
        recall = tp / confusion[i].sum() if confusion[i].sum() else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": float(precision), "recall": float(recall), "f1": float(f1),
                           "support": int(confusion[i].sum())}
    return {
        "test_accuracy": float(np.mean(predicted == truth)),
        "test_images": int(len(truth)),
        "per_class": per_class,
        "confusion_matrix": confusion.tolist(),
        "class_names": list(dataset.class_names),
        "predicted": predicted.tolist(),
    }
