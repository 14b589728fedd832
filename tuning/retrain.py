"""Two-phase retraining of the best configuration, then one evaluation on the test split.

    Phase 1: backbone frozen, head trained at the chosen learning rate.
    Phase 2: the chosen top blocks unfrozen (BatchNorm frozen, inference mode),
             a lower learning rate (the profile's `phase2_lr_factor`, 0.1 by default;
             gentler after an exact linear head), same schedule shape, optionally a
             stronger augmentation (validated against the searched one on small data),
             label smoothing and a moving average of the weights (`label_smoothing`,
             `ema_momentum`); with a job deadline, as many epochs as fit before it
             (timed, not guessed). Kept only where it beats phase 1 on validation.
Both phases stop early on the run's objective and restore their best weights. Flip
test-time augmentation is then kept if it helps on validation.
"""

import dataclasses
import json
import math
import time
from pathlib import Path

import keras
import keras_tuner as kt
import numpy as np

from common import atomic
from common.errors import DataError, UsageError, UserError
from data_pipeline.pipeline import flip_images, make_dataset
from data_pipeline.splits import class_weights, objective_for, with_validation_merged
from deploy.int8_tuning import TUNING_IMAGES
from hypermodel.backbones import get_backbone
from hypermodel.callbacks import EpochProgress, FitToDeadline
from hypermodel.linear_head import INVERSE_L2, fit_linear_head, remember_merged_features
from hypermodel.model import build_transfer_model, set_unfrozen_blocks_trainable
from hypermodel.space import config_from_values, monitored
from hypermodel.training import epochs_that_fit, train
from tuning import report
from tuning.finalists import rescore_finalists

# After phase 2: the TTA check, the test evaluation, the exports (converted, the int8 top
# tuned, each scored on the test split and timed) and the report. Their fixed part (loading,
# conversions, the latency processes) took 53-58 s on the suite's small sets (RESULTS.md
# §10); the rest is inference, which phase 2's timing measures for this model on this
# machine. Until it is timed, the 96 px default job's rate per test image stands in.
FINISH_FIXED_S = 60
FINISH_S_PER_TEST_IMAGE = 0.027
# LiteRT and the SavedModel pass the images at other speeds than Keras' validation does.
FINISH_MARGIN = 1.5


def finish_reserve_s(test_images, seconds_per_image=None, images=None):
    """Seconds to keep after phase 2 for the test evaluation, the exports and the report.

    Args:
        test_images: The test split's size (the estimate before inference is timed).
        seconds_per_image: The model's inference time per image, timed on this machine;
            `images` is then how many the finish passes (`finish_images`).
    """
    if seconds_per_image is None:
        return round(FINISH_FIXED_S + FINISH_S_PER_TEST_IMAGE * test_images)
    return round(FINISH_FIXED_S + FINISH_MARGIN * seconds_per_image * images)


def finish_images(test_images, train_images, validation_images, formats):
    """Images the finish passes through the model, each with its mirror (flip TTA is
    decided after phase 2): the validation split for the TTA check, the test split in
    Keras and once per exported format, and the int8 top's tuning images."""
    exported = len(set(formats))  # validated export formats
    tuning = min(TUNING_IMAGES, train_images) + validation_images if "tflite-int8" in formats else 0
    return 2 * (validation_images + test_images * (1 + exported) + tuning)


# A phase trains on at least this many images, however small the dataset: on 300 images
# a pass is 5 steps, which teaches a new head nothing.
PHASE_MIN_IMAGES = 20_000
# Early stopping waits this many images without progress (at least the setting's epochs).
PATIENCE_IMAGES = 2000
# Fine-tuning from a linear head fitted exactly starts at the frozen features' optimum: at
# the searched rate (a rate for training a head from a random start) the first steps wreck
# the features the head was fitted to (8 px digits: validation accuracy 0.97 → 0.10 in three
# epochs at 1e-3), so phase 2 moves them gently (linear probing, then fine-tuning).
EXACT_HEAD_FINE_TUNING_LR = 1e-4


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

    The best configuration is the search's, or where the search validated on a slice of
    the validation split, the finalist that scores best on all of it (tuning/finalists.py).

    Args:
        run_dir: The run directory (reads best_hparams.json, writes model.keras, metrics.json).
        settings: The run's `Settings` (`epochs`: of each phase; default from the
            profile or the search).
        dataset: The `Dataset` (its test split is read here, once, at the end).
        data: `TrainingData` for the retrain (train + validation).
        deadline: `time.time()` by which the whole job should end; phase 2 then gets as
            many epochs as fit before it (less `finish_reserve_s` for test and export).

    Returns:
        The metrics dict written to metrics.json.
    """
    run_dir = Path(run_dir)
    best, _ = read_best(run_dir)
    objective = objective_for(settings.objective, data.y_train, data.num_classes)
    best, finalists = rescore_finalists(run_dir, best, data, objective, settings.batch_size, log)
    config = config_from_values(best["hyperparameters"])
    lengths = PhaseLengths.of(best, settings, len(data.y_train), deadline, head_only=config.unfrozen_blocks == 0)
    log(f"retraining trial {best['trial_id']} (val_accuracy {best['val_accuracy']:.4f}): "
        f"{config.backbone} {config.resolution}px, unfrozen_blocks={config.unfrozen_blocks}; "
        + ("phase 1 the linear head fitted exactly" if config.head == "linear" else f"phase 1 {lengths.phase1} epochs")
        + f", phase 2 {lengths.phase2 or 'as many epochs as fit'}"
        + (f" (at most {lengths.phase2_cap}: {lengths.phase2_cap_reason})" if lengths.phase2_cap else ""))
    phases = Phases(run_dir, settings, config, best, feature_cache, deadline, len(dataset.y_test), log)
    model = build_transfer_model(config, data.num_classes, settings.weights, settings.seed)
    histories = phases.run(model, data, lengths)
    model, histories = challenge_with_linear_head(phases, model, data, histories)
    config = phases.config
    tta = choose_tta(model, config, data, settings.batch_size)
    log(f"  flip TTA: validation accuracy {tta['val_accuracy_plain']:.4f} plain, {tta['val_accuracy_flip']:.4f} "
        f"flip-averaged: {'used' if tta['used'] else 'not used'}")
    refit = None
    if settings.refit_with_validation:
        model, refit = refit_with_validation(phases, model, data, histories)
    set_unfrozen_blocks_trainable(model, True)
    save_model(model, run_dir / "model.keras")
    metrics = evaluate_test(model, config, dataset, settings.batch_size, tta=tta["used"])
    predicted = np.array(metrics.pop("predicted"))
    flips = histories.pop("flips")
    metrics.update(histories, tta=tta, flips=flips, refit=refit, finalists=finalists, trial_id=best["trial_id"],
                   hyperparameters=config.to_dict())
    atomic.write_json(run_dir / "metrics.json", metrics)
    report.plot_confusion_matrix(np.array(metrics["confusion_matrix"]), dataset.class_names, run_dir / "confusion_matrix.png")
    report.plot_misclassified(dataset.x_test, dataset.y_test, predicted, dataset.class_names,
                              run_dir / "misclassified.png")
    low, high = metrics["test_accuracy_interval95"]
    log(f"test accuracy: {metrics['test_accuracy']:.4f} (95 % interval {low:.4f}–{high:.4f}, "
        f"{len(dataset.y_test)} test images); balanced accuracy {metrics['test_balanced_accuracy']:.4f}, "
        f"macro-F1 {metrics['test_macro_f1']:.4f}")
    return metrics


def challenge_with_linear_head(phases, model, data, histories):
    """Where the search had the linear head as a candidate (small data) but chose another,
    the exact linear head on the winner's backbone and size challenges the retrained winner
    on validation, and replaces it on a tie or better: the winner was picked among many
    trials on these same validation images, so its score flatters it, and the simpler
    model is the safer bet. Its cost is one pass of the backbone over the images.

    Returns:
        (the model kept, its histories); `phases.config` becomes the challenger's where it wins.
    """
    config = phases.config
    if config.head == "linear" or "linear" not in phases.settings.choices.heads:
        return model, histories
    challenger_config = dataclasses.replace(config, head="linear")
    challenger = build_transfer_model(challenger_config, data.num_classes, phases.settings.weights,
                                      phases.settings.seed)
    record = fit_linear_head(challenger, challenger_config, data, phases.settings.batch_size,
                             phases.class_weight(data), phases.monitor(data).removeprefix("val_"), log=phases.log,
                             memo=phases.pooled_features)
    kept = "phase2" if histories["phase2"].get("kept") else "phase1"
    score, objective = histories[kept]["best_val_score"], record["objective"]
    won = record["best_val_score"] >= score
    phases.log(f"  the exact linear head scores {record['best_val_score']:.4f} validation {objective}, the retrained "
               f"{config.head} head {score:.4f}: " + ("the linear head replaces it" if won else "the winner stays"))
    challenge = {"val_score": record["best_val_score"], "winner_val_score": score, "replaced": won}
    if not won:
        return model, {**histories, "linear_head_challenge": challenge}
    phases.config = challenger_config
    return challenger, {"phase1": record, "phase2": {"skipped": "the exact linear head replaced the searched head"},
                        "flips": histories["flips"], "linear_head_challenge": challenge,
                        "replaced_phases": {p: histories[p] for p in ("phase1", "phase2")}}


def refit_with_validation(phases, model, data, histories):
    """The final model refitted on the training and validation images together, each
    phase it kept for the epochs validation chose (a small dataset's validation split is a
    large share of its images). Skipped, keeping `model`, when the job's deadline leaves
    no time for those phases again.

    Returns:
        (model, {"epochs": {phase: epochs}, "images"} or {"skipped": why}).
    """
    kept = [histories[phase] for phase in ("phase1", "phase2") if histories[phase].get("kept", True)]
    seconds = sum(record.get("seconds", 0) for record in kept) * (1 + len(data.y_val) / len(data.y_train))
    if phases.deadline is not None and time.time() + seconds > phases.deadline - phases.reserve:
        phases.log("  refit with the validation images: skipped, the job's deadline leaves no time for it")
        return model, {"skipped": "no time before the job's deadline"}
    epochs = {phase: histories[phase]["best_epoch"] for phase in ("phase1", "phase2")
              if "best_epoch" in histories[phase] and histories[phase].get("kept", True)}
    merged = with_validation_merged(data)
    remember_merged_features(phases.pooled_features, phases.config, data, merged)
    phases.log(f"  refit on the {len(merged.y_train)} training and validation images: "
               + ", ".join(f"{phase} {n} epochs" for phase, n in epochs.items()) + " (as validation chose)")
    refitted = build_transfer_model(phases.config, data.num_classes, phases.settings.weights, phases.settings.seed)
    phases.run(refitted, merged, PhaseLengths(epochs["phase1"], epochs.get("phase2", 1), None, None, None),
               label="refit ", flips=histories["flips"], chosen=histories)
    return refitted, {"epochs": epochs, "images": len(merged.y_train)}


class Phases:
    """Runs the retrain's phases on a model: phase 1 trains the head on the frozen
    backbone, phase 2 the chosen top blocks too (BatchNorm frozen, in inference mode) at
    `phase2_lr_factor` × the learning rate, with the profile's augmentation (flips only
    where the classes survive them), label smoothing and weight averaging.

    Args:
        run_dir, settings, config, best: The run, its settings, the winner's `TrialConfig`
            and its best_hparams.json record.
        feature_cache: A `FeatureCache`, or None.
        deadline: The job's deadline (`time.time()`), or None.
        test_images: The test split's size (sizes the reserve kept for after the retrain).
    """

    def __init__(self, run_dir, settings, config, best, feature_cache, deadline, test_images, log):
        self.run_dir, self.settings, self.config, self.best = run_dir, settings, config, best
        self.feature_cache, self.deadline, self.log = feature_cache, deadline, log
        self.test_images = test_images
        self.reserve = finish_reserve_s(test_images)
        self.phase1_seconds = 0.0
        # A linear head is fitted on a fresh pretrained backbone's pooled features: the same
        # for the winner, its challenger and the refit, so each image is passed once.
        self.pooled_features = {} if settings.weights == "imagenet" else None

    def run(self, model, data, lengths, label="", flips=None, chosen=None):
        """Trains `model` on `data` phase by phase; returns {phase: record, "flips": ...}.

        A linear head's phase 1 is fitted exactly (hypermodel/linear_head.py). Phase 2 is
        kept only where it beats phase 1 on validation; else the model returns to phase 1.

        Args:
            lengths: `PhaseLengths`; patience None runs each phase for its epochs,
                keeping the last weights (a refit: its validation images are trained on).
            label: Prefixes the phases' names in the log and TensorBoard.
            flips: An earlier `check_flips` verdict to reuse (else judged after phase 1).
            chosen: An earlier run's histories (a refit): its linear head's C and
                whether it kept phase 2 are reused, not chosen again.
        """
        set_unfrozen_blocks_trainable(model, False)
        histories = {"phase1": self._phase1(model, data, lengths, label, chosen)}
        self.phase1_seconds = histories["phase1"].get("seconds", 0.0)
        skipped = self._phase2_skipped(chosen)
        if skipped:
            histories["phase2"] = {"skipped": skipped}
        else:
            if self.settings.retrain_augmentation:
                flips = flips or check_flips(model, self.config, data, self.settings.batch_size)
            histories["phase2"] = self._phase2(model, data, lengths, label, flips, chosen)
            if lengths.patience is not None:
                self._keep_better(model, histories, data)
        histories["flips"] = flips
        return histories

    def _phase1(self, model, data, lengths, label, chosen):
        """The head on the frozen backbone: a linear head fitted exactly, else trained."""
        if self.config.head == "linear":
            inverse_l2 = (chosen["phase1"]["inverse_l2"],) if chosen else INVERSE_L2
            return fit_linear_head(model, self.config, data, self.settings.batch_size, self.class_weight(data),
                                   self.monitor(data).removeprefix("val_"), inverse_l2, self.log,
                                   self.pooled_features)
        return self._fit(model, data, self.config, label + "phase1", lengths.phase1, self.config.learning_rate,
                         lengths)

    def _phase2_skipped(self, chosen):
        if self.config.unfrozen_blocks == 0:
            return "unfrozen_blocks = 0: nothing to unfreeze"
        if chosen and not chosen["phase2"].get("kept"):
            return chosen["phase2"].get("skipped", "phase 2 did not beat phase 1 on validation")
        return None

    def phase2_learning_rate(self):
        """`phase2_lr_factor` × the searched rate; at most `EXACT_HEAD_FINE_TUNING_LR`
        after a linear head fitted exactly."""
        rate = self.config.learning_rate * self.settings.phase2_lr_factor
        return min(rate, EXACT_HEAD_FINE_TUNING_LR) if self.config.head == "linear" else rate

    def phase2_augmentations(self, lengths, flips, chosen):
        """The augmentations phase 2 tries, in order.

        The profile's (without flips where they change the class), and, where phase 2 is
        short (`lengths.phase2_cap`: a small dataset), first the searched one: there, a
        strong augmentation may cost more than its regularisation gives, and validation
        decides. A refit repeats the one validation chose.
        """
        if chosen:
            return [chosen["phase2"]["augmentation"]]
        if not self.settings.retrain_augmentation:
            return [self.config.augmentation]
        augmented = phase2_augmentation(self.settings.retrain_augmentation, flips, self.log)
        if lengths.phase2_cap and augmented != self.config.augmentation:
            return [self.config.augmentation, augmented]
        return [augmented]

    def _phase2(self, model, data, lengths, label, flips, chosen):
        """The chosen top blocks fine-tuned, once per augmentation tried; keeps the best on validation."""
        self.phase1_weights = model.get_weights()
        set_unfrozen_blocks_trainable(model, True)
        best, tried = None, []
        for augmentation in self.phase2_augmentations(lengths, flips, chosen):
            if best is not None:
                left = self.phase2_seconds_left(data)
                if left < best[0]["seconds"]:
                    self.log(f"  phase2 with {augmentation}: not tried, {max(left, 0):.0f} s left and the "
                             f"last try took {best[0]['seconds']:.0f} s")
                    break
                model.set_weights(self.phase1_weights)
            config = dataclasses.replace(self.config, augmentation=augmentation)
            record = self._fit(model, data, config, label + "phase2", lengths.phase2, self.phase2_learning_rate(),
                               lengths)
            tried.append({key: record[key] for key in ("augmentation", "best_val_score", "epochs", "seconds")}
                         | {"history": {"val_accuracy": record["history"]["val_accuracy"]}})
            if best is None or record["best_val_score"] > best[0]["best_val_score"]:
                best = (record, model.get_weights())
        record, weights = best
        if len(tried) > 1:
            model.set_weights(weights)
            self.log(f"  phase2 keeps {record['augmentation']}: validation {record['objective']} "
                     + ", ".join(f"{t['best_val_score']:.4f} with {t['augmentation']}" for t in tried))
        return {**record, "tried": tried}

    def _keep_better(self, model, histories, data):
        """Returns `model` to its phase-1 weights where phase 2 never beat them on validation
        by more than one image's worth (the two phases' scores are computed apart, and a
        near-tie image may round either way)."""
        objective = histories["phase2"]["objective"]
        phase1, phase2 = histories["phase1"]["best_val_score"], histories["phase2"]["best_val_score"]
        histories["phase2"]["kept"] = bool(phase2 > phase1 + one_image_worth(objective, data.y_val))
        if not histories["phase2"]["kept"]:
            model.set_weights(self.phase1_weights)
            self.log(f"  phase 2's best validation {objective} {phase2:.4f} does not beat phase 1's "
                     f"{phase1:.4f} by more than one image: the model keeps phase 1's weights")

    def class_weight(self, data):
        return class_weights(data.y_train, data.num_classes, self.settings.class_weight)

    def _fit(self, model, data, config, phase, epochs, lr, lengths):
        settings = self.settings
        started = time.time()
        callbacks = [
            keras.callbacks.TensorBoard(str(self.run_dir / "tensorboard" / "retrain" / phase.replace(" ", "_")),
                                        write_graph=False),
            EpochProgress(phase, self.log, self.deadline),
        ]
        regularisation = {}
        if phase.endswith("phase2"):
            regularisation = dict(label_smoothing=settings.label_smoothing, ema_momentum=settings.ema_momentum)
        plan, patience = {}, lengths.patience
        if epochs is None:
            epochs, patience, plan, fit_to_deadline = self._plan_to_deadline(model, data, config, lengths,
                                                                            regularisation)
            callbacks.append(fit_to_deadline)
        if patience is not None:
            callbacks.append(keras.callbacks.EarlyStopping(
                monitor=self.monitor(data), mode="max", patience=patience, restore_best_weights=True,
            ))
        try:
            history, mode = train(
                model, config, data, batch_size=settings.batch_size, seed=settings.seed, epochs=epochs,
                learning_rate=lr, callbacks=callbacks, feature_cache=self.feature_cache, verbose=settings.verbose,
                class_weight=self.class_weight(data), **regularisation,
            )
        except kt.errors.FailedTrialError as e:
            raise DivergedError(
                f"retraining trial {self.best['trial_id']} diverged in {phase} ({e}): rerun the search with a "
                "lower learning-rate range, or retrain another trial by editing best_hparams.json"
            ) from None
        if plan:
            plan["plan"]["revisions"] = fit_to_deadline.revisions
        scores = history.history[self.monitor(data)]
        record = {
            "history": {k: [float(v) for v in vals] for k, vals in history.history.items()},
            "best_val_accuracy": float(max(history.history["val_accuracy"])),
            "objective": self.monitor(data).removeprefix("val_"),
            "best_val_score": float(max(scores)),
            "best_epoch": int(np.argmax(scores)) + 1,
            "epochs": len(history.epoch),
            "seconds": round(time.time() - started, 1),
            "learning_rate": lr,
            "augmentation": config.augmentation,
            **regularisation,
            "mode": mode,
            **plan,
        }
        self.log(f"  {phase}: {len(history.epoch)} epochs [{mode}]"
                 + ("" if patience is None else f", best val_accuracy {record['best_val_accuracy']:.4f}")
                 + f" ({record['seconds']:.0f} s)")
        return record

    def monitor(self, data):
        """The validation score the phases keep their best epoch by (the run's objective)."""
        return monitored(objective_for(self.settings.objective, data.y_train, data.num_classes))

    def _plan_to_deadline(self, model, data, config, lengths, regularisation):
        """Phase 2's epochs, patience, plan record and `FitToDeadline`, timed on this machine."""
        now = time.time()
        left = self.phase2_seconds_left(data, now)
        finish_by = now + left  # may be past: phase 2 then gets its one epoch
        if lengths.phase2_cap:
            return self._capped_plan(lengths, finish_by, left)
        fitted = epochs_that_fit(finish_by, model, config, data, self.settings.batch_size, self.settings.seed,
                                 **regularisation)
        fitted, finish_by = self._with_timed_reserve(fitted, data)
        # The deadline is what limits the result: the schedule decays over exactly these
        # epochs, so run them all (augmented validation accuracy dips early on), keep the best.
        epochs = fitted.epochs
        plan = {"plan": {**fitted.to_dict(), "finish_reserve_s": self.reserve}}
        self.log(f"  phase2 plan, timed on this machine: {fitted.reasoning()} before the job's deadline "
                 f"(less {self.reserve} s for test and export, at this model's timed speed{self._refit_note()})")
        return epochs, epochs, plan, FitToDeadline(finish_by, planned_epoch_s=fitted.epoch_s, log=self.log)

    def _with_timed_reserve(self, plan, data):
        """`plan` and its deadline refitted to the finish's reserve at the inference speed
        its validation passes measured: this model on this machine, not the default job's."""
        seconds_per_image = (plan.validation_s - plan.overhead_s) / len(data.y_val)
        images = finish_images(self.test_images, len(data.y_train), len(data.y_val), self.settings.formats)
        self.reserve = finish_reserve_s(self.test_images, seconds_per_image, images)
        now = time.time()
        left = self.phase2_seconds_left(data, now)
        return dataclasses.replace(plan, epochs=max(1, int(left // plan.epoch_s)), seconds_left=left), now + left

    def phase2_seconds_left(self, data, now=None):
        """Seconds phase 2 may train from `now` (infinite without a deadline)."""
        if self.deadline is None:
            return math.inf
        left = self.deadline - self.reserve - (now or time.time())
        if self.settings.refit_with_validation:
            # The refit repeats the phases on the validation images too: keep its time.
            grow = 1 + len(data.y_val) / len(data.y_train)
            left = (left - grow * self.phase1_seconds) / (1 + grow)
        return left

    def _capped_plan(self, lengths, finish_by, left):
        """A phase 2 that needs at most `lengths.phase2_cap` epochs (a small dataset): timing
        its steps first would cost several of its short epochs, so they are timed as they
        run, and it stops early on a plateau or before the deadline."""
        epochs, patience = lengths.phase2_cap, lengths.patience
        reasoning = (f"at most {epochs} epochs ({lengths.phase2_cap_reason}), timed as they run; "
                     f"{left:.0f} s left before the job's deadline")
        plan = {"plan": {"epochs": epochs, "seconds_left": round(left, 1), "reasoning": reasoning,
                         "finish_reserve_s": self.reserve, "cap": epochs, "cap_reason": lengths.phase2_cap_reason}}
        self.log(f"  phase2 plan: {reasoning} (less {self.reserve} s for test and export{self._refit_note()}); "
                 f"stopping after {patience} epochs without progress")
        return epochs, patience, plan, FitToDeadline(finish_by, log=self.log)

    def _refit_note(self):
        return ", and the refit's share" if self.settings.refit_with_validation else ""


def one_image_worth(objective, labels):
    """The most one validation image can move `objective`: 1/N for accuracy; for balanced
    accuracy and macro-F1, one image of the smallest class (1/(K × its count))."""
    if objective == "accuracy":
        return 1 / len(labels)
    counts = np.bincount(labels)
    counts = counts[counts > 0]
    return 1 / (len(counts) * counts.min())


@dataclasses.dataclass(frozen=True)
class PhaseLengths:
    """How long each phase of the retrain trains, in epochs (passes over its images).

    Attributes:
        phase1, phase2: Epochs; phase2 None = as many as fit before the deadline.
        phase2_cap: With a deadline, the most epochs phase 2 needs (None = the deadline
            alone decides), and why.
        patience: Epochs without progress before a phase stops.
    """

    phase1: int
    phase2: int
    phase2_cap: int
    phase2_cap_reason: str
    patience: int

    @classmethod
    def of(cls, best, settings, train_images, deadline, head_only=False):
        """The lengths for `train_images` training images.

        An explicit `settings.epochs` is used as given. Otherwise a phase lasts the
        profile's epochs or the search's, but at least `PHASE_MIN_IMAGES` images. With a
        deadline, phase 2 fills it, except where the search already trained on every
        training image: there the winner's own training, twice over, is what phase 2
        needs, and early stopping ends it sooner on a plateau. A `head_only` winner has
        no phase 2: its phase 1 gets phase 2's length.
        """
        patience = max(settings.early_stopping_patience, math.ceil(PATIENCE_IMAGES / train_images))
        if settings.epochs:
            return cls(settings.epochs, settings.epochs, None, None, patience)
        least = math.ceil(PHASE_MIN_IMAGES / train_images)
        searched = max(1, round((best.get("epochs") or settings.max_epochs) * settings.epoch_fraction))  # passes
        phase1, phase2 = settings.retrain_epochs or (None, None)
        phase1 = max(phase1 or searched, least)
        if deadline is None:
            phase2 = max(phase2 or searched, least)
            return cls(max(phase1, phase2) if head_only else phase1, phase2, None, None, patience)
        if settings.train_subset and settings.train_subset < train_images:
            return cls(phase1, None, None, None, patience)
        cap = max(least, 2 * searched)
        return cls(max(phase1, cap) if head_only else phase1, None, cap,
                   f"the search trained on all {train_images:,} images and its winner on {searched} passes of them",
                   patience)


# A flipped 2 is no 2: where a model that never saw a mirror image loses this much
# validation accuracy on the mirrored images, flips are no augmentation for the data.
FLIP_ACCURACY_LOSS = 0.05


def check_flips(model, config, data, batch_size):
    """Whether the classes survive a horizontal flip, judged by `model` on validation.

    Returns:
        {"val_accuracy_plain", "val_accuracy_flipped", "invariant"}.
    """
    plain, flipped = _plain_and_flipped(model, config, data.x_val, batch_size)
    plain_accuracy = float(np.mean(plain.argmax(1) == data.y_val))
    flipped_accuracy = float(np.mean(flipped.argmax(1) == data.y_val))
    return {"val_accuracy_plain": plain_accuracy, "val_accuracy_flipped": flipped_accuracy,
            "invariant": flipped_accuracy >= plain_accuracy - FLIP_ACCURACY_LOSS}


def phase2_augmentation(augmentation, flips, log=print):
    """The profile's phase-2 `augmentation`, without its flips where `flips` (`check_flips`)
    says a flip changes the class."""
    if not flips["invariant"]:
        augmentation = augmentation.replace("flip_", "").replace("flip", "none")
    log(f"  flips: the phase-1 model scores {flips['val_accuracy_plain']:.4f} on validation, "
        f"{flips['val_accuracy_flipped']:.4f} on its mirror images: "
        + ("the classes survive a flip" if flips["invariant"] else "a flip changes the class")
        + f"; phase 2 augments with {augmentation}")
    return augmentation


def choose_tta(model, config, data, batch_size):
    """Flip test-time augmentation, kept only if it raises validation accuracy.

    Decided on the validation split, so the test split stays read once.
    """
    plain, flipped = _plain_and_flipped(model, config, data.x_val, batch_size)
    plain_accuracy = float(np.mean(plain.argmax(1) == data.y_val))
    flip_accuracy = float(np.mean((plain + flipped).argmax(1) == data.y_val))
    return {"val_accuracy_plain": plain_accuracy, "val_accuracy_flip": flip_accuracy,
            "used": flip_accuracy > plain_accuracy}


def _plain_and_flipped(model, config, images, batch_size):
    """`model`'s probabilities for `images` and for their mirror images."""
    backbone = get_backbone(config.backbone)
    ds = make_dataset(images, None, config.resolution, backbone.preprocess_input, batch_size)
    return model.predict(ds, verbose=0), model.predict(ds.map(flip_images), verbose=0)


def save_model(model, path):
    """Saves a `.keras` file atomically (written beside, then renamed)."""
    tmp = path.with_name(f".{path.stem}.tmp.keras")
    model.save(tmp)
    tmp.replace(path)


def wilson_interval(successes, trials, z=1.959963984540054):
    """The 95 % Wilson score interval of a proportion: how far a test
    accuracy measured on `trials` images can move (z: the normal quantile of 97.5 %)."""
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return [max(0.0, centre - half), min(1.0, centre + half)]


def evaluate_test(model, config, dataset, batch_size=128, tta=False):
    """The one place the test split is read: accuracy (with its 95 % interval), balanced
    accuracy, macro-F1, per-class P/R/F1, confusion matrix.

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
    present = [c for c in per_class.values() if c["support"]]
    correct = int(np.sum(predicted == truth))
    return {
        "test_accuracy": correct / len(truth),
        "test_accuracy_interval95": wilson_interval(correct, len(truth)),
        "test_balanced_accuracy": float(np.mean([c["recall"] for c in present])),
        "test_macro_f1": float(np.mean([c["f1"] for c in present])),
        "test_images": int(len(truth)),
        "per_class": per_class,
        "confusion_matrix": confusion.tolist(),
        "class_names": list(dataset.class_names),
        "predicted": predicted.tolist(),
    }
