"""Two-phase retraining: which weights each phase trains, at which learning rate, who reads
the test split, the job deadline, TTA.

Expected values come from what the test sets or measures itself (the searched rate in
best_hparams.json × a factor this file chooses, a wall clock, accuracies it computes
from the saved model's predictions), never from the implementation's own formulas.
"""

import dataclasses
import json
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from data_pipeline import load_dataset
from data_pipeline.feature_cache import FeatureCache
from deploy.export import serving_function
from hypermodel import model as model_module
from hypermodel import training as training_module
from hypermodel.backbones import get_backbone
from hypermodel.callbacks import FitToDeadline
from hypermodel.space import SearchChoices, TrialConfig
from reference import load_model_keras, mobilenet_inputs
from tuning import retrain as retrain_module
from tuning.jobs import search_data
from tuning.run_dir import prepare_run_dir
from tuning.settings import Settings
from tuning.tuner import run_search

PREFIX_NAME, TOP_NAME, SUFFIX_NAME = model_module.PREFIX_NAME, model_module.TOP_NAME, model_module.SUFFIX_NAME


def snapshot(model):
    """name → copy of every variable, grouped by where it lives."""
    top = model.get_layer(TOP_NAME)
    suffix = top.get_layer(SUFFIX_NAME)
    groups = {"prefix": model.get_layer(PREFIX_NAME).weights, "head": [
        w for layer in top.layers if layer.name != SUFFIX_NAME for w in layer.weights]}
    groups["suffix_trainable"] = [w for layer in suffix.layers if not _is_bn(layer) for w in layer.weights]
    groups["suffix_batchnorm"] = [w for layer in suffix.layers if _is_bn(layer) for w in layer.weights]
    return {g: [np.array(w.numpy()) for w in ws] for g, ws in groups.items()}


def _is_bn(layer):
    return isinstance(layer, keras.layers.BatchNormalization)


def changed(before, after, group):
    return any(not np.array_equal(a, b) for a, b in zip(before[group], after[group]))


def optimizer_iterations(model):
    """id → (optimizer, steps taken) of every optimizer attached to the model or its parts
    (the whole model trains end to end; its `trainable_top` trains on cached features)."""
    found = {}
    for part in (model, *model.layers):
        optimizer = getattr(part, "optimizer", None)
        if optimizer is not None:
            found[id(optimizer)] = (optimizer, int(optimizer.iterations.numpy()))
    return found


def recording_train(phases, original):
    """Wraps `train`: per call, wall-clock start and end, weights before and after, and the
    learning rate of the optimizer that actually took the steps."""

    def wrapper(model, *args, **kwargs):
        before_steps = optimizer_iterations(model)
        before = snapshot(model)
        started = time.time()
        result = original(model, *args, **kwargs)
        ended = time.time()
        stepped = [o for key, (o, n) in optimizer_iterations(model).items() if n > before_steps.get(key, (o, 0))[1]]
        assert len(stepped) == 1, stepped
        learning_rate = float(keras.ops.convert_to_numpy(stepped[0].learning_rate))
        phases.append({"before": before, "after": snapshot(model), "started": started, "ended": ended,
                       "learning_rate": learning_rate})
        return result

    return wrapper


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """A one-trial search whose best configuration unfreezes 2 blocks, at a constant rate."""
    settings = Settings(
        profile="smoke", run_dir=str(tmp_path_factory.mktemp("phases") / "run"), tuner="random",
        max_trials=1, max_epochs=1, train_subset=400, val_subset=200, batch_size=50,
        retrain_epochs=(2, 2), retrain_subset=400,
        choices=SearchChoices(backbones=("mobilenet_v2_0.35",), resolutions=(32,), unfrozen_blocks=(2,),
                              learning_rate=(1e-3, 2e-3), dropout=(0.0, 0.0), lr_schedules=("constant",),
                              warmup_epochs=(0,)),
    )
    # The retrains here check which weights train, who reads the test split and when phase 2
    # stops, not the test accuracy: 2 000 test images to evaluate instead of 10 000.
    dataset = load_dataset()
    dataset = dataclasses.replace(dataset, x_test=dataset.x_test[:2000], y_test=dataset.y_test[:2000])
    run_dir = prepare_run_dir(settings, dataset)
    run_search(settings, search_data(dataset, settings), run_dir, log=lambda m: None)
    searched_rate = json.loads((run_dir / "best_hparams.json").read_text())["hyperparameters"]["learning_rate"]
    assert 1e-3 <= searched_rate <= 2e-3
    return settings, dataset, run_dir, searched_rate


def test_phases_train_the_right_weights_at_the_right_rate_and_keep_batchnorm_statistics(searched, monkeypatch):
    settings, dataset, run_dir, searched_rate = searched
    # Two epochs a phase, as given (by default a phase lasts at least 20 000 images): which
    # weights train, and at which rate, does not depend on how long.
    settings = dataclasses.replace(settings, phase2_lr_factor=0.25, epochs=2)
    phases = []
    monkeypatch.setattr(retrain_module, "train", recording_train(phases, retrain_module.train))
    # With the feature cache, as the CLI retrains: both phases train `trainable_top` on cached activations.
    metrics = retrain_module.retrain(run_dir, settings, dataset, search_data(dataset, settings),
                                     feature_cache=FeatureCache(None, log=lambda m: None), log=lambda m: None)
    assert metrics["phase1"]["mode"] == metrics["phase2"]["mode"] == "cached"
    assert len(phases) == 2
    first, second = phases
    # Phase 1: only the head learns, at the searched rate.
    assert changed(first["before"], first["after"], "head")
    assert not changed(first["before"], first["after"], "suffix_trainable")
    assert first["learning_rate"] == pytest.approx(searched_rate, rel=1e-5)
    # Phase 2: the unfrozen blocks learn too, at a quarter of it (the factor set above).
    assert changed(second["before"], second["after"], "suffix_trainable")
    assert second["learning_rate"] == pytest.approx(searched_rate / 4, rel=1e-5)
    for phase in phases:
        assert not changed(phase["before"], phase["after"], "prefix")
        # BatchNorm stays frozen: gamma/beta and the moving statistics never move.
        assert not changed(phase["before"], phase["after"], "suffix_batchnorm")
    assert (run_dir / "model.keras").is_file() and (run_dir / "metrics.json").is_file()


def test_test_split_is_read_only_by_the_final_evaluation(searched, monkeypatch):
    settings, dataset, run_dir, _ = searched
    settings = dataclasses.replace(settings, epochs=2)  # who reads the test split does not depend on how long
    evaluation = {"calls": 0, "active": False}
    original_evaluate = retrain_module.evaluate_test

    def counting_evaluate(*args, **kwargs):
        evaluation["calls"] += 1
        evaluation["active"] = True
        try:
            return original_evaluate(*args, **kwargs)
        finally:
            evaluation["active"] = False

    def guard(function):
        def guarded(images, *args, **kwargs):
            if np.shares_memory(images, dataset.x_test):
                assert evaluation["active"], f"{function.__name__} read the test split outside the evaluation"
            return function(images, *args, **kwargs)
        return guarded

    import data_pipeline.feature_cache as feature_cache
    import data_pipeline.pipeline as pipeline

    monkeypatch.setattr(retrain_module, "evaluate_test", counting_evaluate)
    for module in (retrain_module, training_module, feature_cache):
        monkeypatch.setattr(module, "make_dataset", guard(pipeline.make_dataset))
    data = search_data(dataset, settings)
    for split in (data.x_train, data.x_val):
        assert not np.shares_memory(split, dataset.x_test)
    retrain_module.retrain(run_dir, settings, dataset, data, log=lambda m: None)
    assert evaluation["calls"] == 1


class RecordingFitToDeadline(FitToDeadline):
    """FitToDeadline as the retrain builds it, recording each epoch's decision: the time,
    and whether it let another epoch start."""

    built = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.decisions = []
        RecordingFitToDeadline.built.append(self)

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch, logs)
        self.decisions.append({"now": self.clock(), "started": self.epoch_started,
                               "stopped": bool(self.model.stop_training), "epochs": self.epochs})


def test_phase2_fills_the_time_left_before_the_job_deadline(searched, monkeypatch):
    """With a deadline, phase 2 is planned to fill the time left before it (less the
    reserve for test and export) and is stopped by FitToDeadline, not by the settings'
    epochs. Asserted on the decisions, not on wall seconds: a loaded machine changes how
    many epochs fit, not whether each was judged to fit."""
    settings, dataset, run_dir, searched_rate = searched
    settings = dataclasses.replace(settings, retrain_augmentation="flip_shift_erase", phase2_lr_factor=0.5)
    phases = []
    monkeypatch.setattr(retrain_module, "train", recording_train(phases, retrain_module.train))
    plans = []

    def recording_epochs_that_fit(finish_by, *args, **kwargs):
        plans.append((finish_by, training_module.epochs_that_fit(finish_by, *args, **kwargs)))
        return plans[-1][1]

    monkeypatch.setattr(retrain_module, "epochs_that_fit", recording_epochs_that_fit)
    RecordingFitToDeadline.built.clear()
    monkeypatch.setattr(retrain_module, "FitToDeadline", RecordingFitToDeadline)
    data = search_data(dataset, settings)
    # The search judged a slice of what phase 2 trains on (a large dataset's case): the
    # deadline, not the winner's own training, is what limits phase 2.
    settings = dataclasses.replace(settings, train_subset=len(data.y_train) // 2)
    # With the feature cache, as the CLI retrains: phase 1 (the head on cached features)
    # leaves most of the time to phase 2 (augmented, end to end).
    cache = FeatureCache(None, log=lambda m: None)
    # The reserve is at least its fixed part: phase 2 gets at most 25 s.
    deadline = time.time() + 25 + retrain_module.FINISH_FIXED_S
    metrics = retrain_module.retrain(run_dir, settings, dataset, data, feature_cache=cache, deadline=deadline,
                                     log=lambda m: None)
    assert len(phases) == 2
    assert metrics["phase1"]["mode"] == "cached" and metrics["phase2"]["mode"].startswith("end-to-end")
    # Phase 2 alone is fitted to the job's deadline less the reserve, planned from its own
    # timing; the timing was given the reserve estimated from the test split's size, and
    # the plan keeps the one its timed validation passes measured for this small model.
    ((planned_for, timing),) = plans
    (callback,) = RecordingFitToDeadline.built
    plan = metrics["phase2"]["plan"]
    assert planned_for == pytest.approx(deadline - retrain_module.finish_reserve_s(len(dataset.y_test)))
    assert callback.deadline == pytest.approx(deadline - plan["finish_reserve_s"])
    assert callback.planned_epoch_s == timing.epoch_s == pytest.approx(plan["epoch_s"], abs=1e-4)
    # As many epochs as fit in the time left (at least one), by the plan's own estimate.
    assert plan["epochs"] == 1 or plan["epochs"] * plan["epoch_s"] <= plan["seconds_left"] + 1e-3
    assert (plan["epochs"] + 1) * plan["epoch_s"] > plan["seconds_left"] - 1e-3
    # It ran the planned epochs, or fewer exactly where the callback saw the next one overrun.
    epochs = metrics["phase2"]["epochs"]
    assert len(callback.decisions) == epochs == len(metrics["phase2"]["history"]["loss"])
    assert epochs == plan["epochs"] or callback.decisions[-1]["stopped"]
    for decision in callback.decisions[:-1]:  # each later epoch started before the deadline
        assert not decision["stopped"] and decision["now"] < callback.deadline, callback.decisions
    assert all(d["started"] < callback.deadline for d in callback.decisions[1:]), callback.decisions
    assert metrics["phase1"]["augmentation"] == "none" and metrics["phase2"]["augmentation"] == "flip_shift_erase"
    assert phases[0]["learning_rate"] == pytest.approx(searched_rate, rel=1e-5)
    assert phases[1]["learning_rate"] == pytest.approx(searched_rate / 2, rel=1e-5)

    # Flip TTA: the decision agrees with validation accuracies computed here from the
    # saved model's own predictions (plain, and averaged with the mirrored images).
    model = load_model_keras(run_dir / "model.keras")
    plain = model.predict(mobilenet_inputs(data.x_val, 32), verbose=0)
    mirrored = model.predict(mobilenet_inputs(data.x_val[:, :, ::-1], 32), verbose=0)
    plain_accuracy = np.mean(plain.argmax(1) == data.y_val)
    flip_accuracy = np.mean((plain + mirrored).argmax(1) == data.y_val)
    tta = metrics["tta"]
    assert tta["val_accuracy_plain"] == pytest.approx(plain_accuracy, abs=1.5 / len(data.y_val))
    assert tta["val_accuracy_flip"] == pytest.approx(flip_accuracy, abs=1.5 / len(data.y_val))
    if abs(flip_accuracy - plain_accuracy) > 1.5 / len(data.y_val):  # not a tie within rounding
        assert tta["used"] == (flip_accuracy > plain_accuracy)


class EpochTimer(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.seconds = []

    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self.started)


def test_epochs_that_fit_matches_a_timed_epoch_and_leaves_the_weights_untouched(searched):
    from data_pipeline.pipeline import make_dataset

    settings, dataset, _, _ = searched
    # 40 steps per epoch: enough that an epoch's fixed costs (iterators, the validation
    # pass's start) do not dominate it, as they do not in a real retrain.
    data = search_data(dataset, dataclasses.replace(settings, train_subset=2000))
    config = TrialConfig("mobilenet_v2_0.35", 32, 2, "avg", 64, 0.0, 1e-3, "constant", 0, "adam", "flip")
    model = model_module.build_transfer_model(config, dataset.num_classes)
    model_module.set_unfrozen_blocks_trainable(model, True)
    before = [w.copy() for w in model.get_weights()]
    plan = training_module.epochs_that_fit(time.time() + 120, model, config, data, batch_size=50, seed=0)
    epochs, epoch_s = plan.epochs, plan.epoch_s
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))

    # Real epochs of the same model on the same data (augmented training, then validation).
    preprocess_input = get_backbone(config.backbone).preprocess_input
    timer = EpochTimer()
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    model.fit(make_dataset(data.x_train, data.y_train, 32, preprocess_input, 50, shuffle_seed=0,
                           augmentation="flip"),
              validation_data=make_dataset(data.x_val, data.y_val, 32, preprocess_input, 50),
              epochs=4, callbacks=[timer], verbose=0, shuffle=False)
    measured = float(np.median(timer.seconds[1:]))  # the first epoch also traces the graphs
    # Within a factor 3, which holds while other processes share the 2 cores between the
    # timing and these epochs; a plan that missed a part of the epoch (validation, the
    # per-step time × steps) is off by more. FitToDeadline corrects the rest as epochs end.
    assert 1 / 3 <= epoch_s / measured <= 3, (epoch_s, timer.seconds)
    # The planned epochs would really take about the 120 s (and never 0 epochs).
    assert epochs >= 1
    assert 120 / 3 <= (epochs + 1) * measured and epochs * measured <= 120 * 3, (epochs, measured)


def test_flip_tta_export_averages_each_image_with_its_mirror():
    dataset = load_dataset()
    config = TrialConfig("mobilenet_v2_0.35", 48, 0, "avg", 64, 0.0, 1e-3, "constant", 0, "adam", "none")
    model = model_module.build_transfer_model(config, dataset.num_classes)
    preprocess_input = get_backbone(config.backbone).preprocess_input
    images = dataset.x_test[:16]
    served = {
        tta: serving_function(model, 48, preprocess_input, dataset.class_names, tta)(tf.constant(images))
        for tta in (False, True)
    }
    plain = model.predict(mobilenet_inputs(images, 48), verbose=0)
    mirrored = model.predict(mobilenet_inputs(images[:, :, ::-1], 48), verbose=0)
    np.testing.assert_allclose(served[False]["probabilities"].numpy(), plain, atol=1e-5)
    np.testing.assert_allclose(served[True]["probabilities"].numpy(), (plain + mirrored) / 2, atol=1e-5)
    assert np.abs(plain - mirrored).max() > 1e-3  # the mirror really is a different input


def test_phase2_keeps_the_averaged_weights_it_validated_with_label_smoothing(searched):
    """With `ema_momentum`, phase 2 (end to end, augmented) validates the weights' moving
    average and the saved model is that average: its validation accuracy, computed here,
    is the best one phase 2 recorded."""
    settings, dataset, run_dir, _ = searched
    settings = dataclasses.replace(settings, retrain_augmentation="flip_shift_erase", epochs=3,
                                   ema_momentum=0.9, label_smoothing=0.1)
    data = search_data(dataset, settings)
    metrics = retrain_module.retrain(run_dir, settings, dataset, data, log=lambda m: None)
    phase2 = metrics["phase2"]
    assert (phase2["ema_momentum"], phase2["label_smoothing"], phase2["mode"]) == (0.9, 0.1, "end-to-end")
    assert "ema_momentum" not in metrics["phase1"]
    model = load_model_keras(run_dir / "model.keras")
    accuracy = np.mean(model.predict(mobilenet_inputs(data.x_val, 32), verbose=0).argmax(1) == data.y_val)
    assert accuracy == pytest.approx(phase2["best_val_accuracy"], abs=1.5 / len(data.y_val))


def test_smoothed_sparse_crossentropy_against_a_worked_example():
    # Label 0 of 3 classes, smoothing 0.3: the target is [0.8, 0.1, 0.1].
    loss = training_module.SmoothedSparseCrossentropy(0.3)
    value = float(loss(np.array([0]), np.array([[0.7, 0.2, 0.1]], np.float32)))
    assert value == pytest.approx(-(0.8 * np.log(0.7) + 0.1 * np.log(0.2) + 0.1 * np.log(0.1)), rel=1e-5)
