"""Two-phase retraining: which weights each phase trains, who reads the test split, the job deadline, TTA."""

import dataclasses
import re
import time

import numpy as np
import pytest
import tensorflow as tf

from data_pipeline import load_dataset
from data_pipeline.pipeline import prepare_images
from hypermodel import transfer
from hypermodel.backbones import get_backbone
from hypermodel.space import SearchChoices, TrialConfig
from tuning.export import serving_function
from tuning import retrain as retrain_module
from tuning.run import RunSettings, prepare_run_dir, training_data
from tuning.tuner import run_search


def snapshot(model):
    """name → copy of every variable, grouped by where it lives."""
    top = model.get_layer(transfer.TOP_NAME)
    suffix = top.get_layer(transfer.SUFFIX_NAME)
    groups = {"prefix": model.get_layer(transfer.PREFIX_NAME).weights, "head": [
        w for layer in top.layers if layer.name != transfer.SUFFIX_NAME for w in layer.weights]}
    groups["suffix_trainable"] = [w for layer in suffix.layers if not _is_bn(layer) for w in layer.weights]
    groups["suffix_batchnorm"] = [w for layer in suffix.layers if _is_bn(layer) for w in layer.weights]
    return {g: [np.array(w.numpy()) for w in ws] for g, ws in groups.items()}


def _is_bn(layer):
    import keras

    return isinstance(layer, keras.layers.BatchNormalization)


def changed(before, after, group):
    return any(not np.array_equal(a, b) for a, b in zip(before[group], after[group]))


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """A one-trial search whose best configuration unfreezes 2 blocks."""
    settings = RunSettings(
        profile="smoke", run_dir=str(tmp_path_factory.mktemp("phases") / "run"), tuner="random",
        max_trials=1, max_epochs=1, train_subset=400, val_subset=200, batch_size=50,
        retrain_epochs=(2, 2), retrain_subset=400,
        choices=SearchChoices(backbones=("mobilenet_v2_0.35",), resolutions=(32,), unfrozen_blocks=(2,),
                              learning_rate=(1e-3, 2e-3), dropout=(0.0, 0.0)),
    )
    dataset = load_dataset()
    run_dir = prepare_run_dir(settings, dataset)
    run_search(settings, training_data(dataset, settings), run_dir, log=lambda m: None)
    return settings, dataset, run_dir


def test_phases_train_the_right_weights_and_keep_batchnorm_statistics(searched, monkeypatch):
    settings, dataset, run_dir = searched
    phases = []
    original_train = retrain_module.train

    def recording_train(model, *args, **kwargs):
        before = snapshot(model)
        result = original_train(model, *args, **kwargs)
        phases.append((before, snapshot(model)))
        return result

    monkeypatch.setattr(retrain_module, "train", recording_train)
    metrics = retrain_module.retrain(run_dir, settings, dataset, training_data(dataset, settings), log=lambda m: None)
    assert len(phases) == 2
    (b1, a1), (b2, a2) = phases
    # Phase 1: only the head learns.
    assert changed(b1, a1, "head")
    assert not changed(b1, a1, "suffix_trainable")
    # Phase 2: the unfrozen blocks learn too, at a 10x lower learning rate.
    assert changed(b2, a2, "suffix_trainable")
    assert metrics["phase2"]["learning_rate"] == pytest.approx(metrics["phase1"]["learning_rate"] / 10)
    for before, after in phases:
        assert not changed(before, after, "prefix")
        # BatchNorm stays frozen: gamma/beta and the moving statistics never move.
        assert not changed(before, after, "suffix_batchnorm")
    assert (run_dir / "model.keras").is_file() and (run_dir / "metrics.json").is_file()


def test_test_split_is_read_only_by_the_final_evaluation(searched, monkeypatch):
    settings, dataset, run_dir = searched
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

    import data_pipeline.pipeline as pipeline

    monkeypatch.setattr(retrain_module, "evaluate_test", counting_evaluate)
    monkeypatch.setattr(retrain_module, "make_dataset", guard(pipeline.make_dataset))
    monkeypatch.setattr(transfer, "make_dataset", guard(pipeline.make_dataset))
    data = training_data(dataset, settings)
    for split in (data.x_train, data.x_val):
        assert not np.shares_memory(split, dataset.x_test)
    retrain_module.retrain(run_dir, settings, dataset, data, log=lambda m: None)
    assert evaluation["calls"] == 1


def test_phase2_fills_the_time_left_before_the_job_deadline(searched):
    """With a deadline, phase 2 is timed, planned to fit and ends on time, with its own augmentation."""
    settings, dataset, run_dir = searched
    settings = dataclasses.replace(settings, retrain_augmentation="flip_shift_erase", phase2_lr_factor=0.5)
    finish_by = time.time() + 30
    logs = []
    metrics = retrain_module.retrain(
        run_dir, settings, dataset, training_data(dataset, settings),
        deadline=finish_by + retrain_module.FINISH_RESERVE_S, log=lambda m: logs.append((time.time(), m)),
    )
    planned = [int(re.search(r"(\d+) epochs fit before", m).group(1)) for _, m in logs if "fit before" in m]
    ended = [t for t, m in logs if m.strip().startswith("phase2:") and "best val_accuracy" in m]
    assert planned and planned[0] >= 3, logs  # 400 images at 32 px: several epochs fit in the ~25 s left
    assert 1 <= metrics["phase2"]["epochs"] <= planned[0]
    assert ended[0] <= finish_by + 10  # StopAtDeadline: at most one (short) epoch late
    assert metrics["phase1"]["augmentation"] == "none" and metrics["phase2"]["augmentation"] == "flip_shift_erase"
    assert metrics["phase2"]["learning_rate"] == pytest.approx(metrics["phase1"]["learning_rate"] * 0.5)
    tta = metrics["tta"]
    assert tta["used"] == (tta["val_accuracy_flip"] > tta["val_accuracy_plain"])


def test_epochs_that_fit_leaves_the_weights_untouched(searched):
    settings, dataset, _ = searched
    data = training_data(dataset, settings)
    config = TrialConfig("mobilenet_v2_0.35", 32, 2, "avg", 64, 0.0, 1e-3, "constant", 0, "adam", "flip")
    model = transfer.build_transfer_model(config, dataset.num_classes)
    transfer.set_unfrozen_blocks_trainable(model, True)
    before = [w.copy() for w in model.get_weights()]
    epochs, epoch_s = transfer.epochs_that_fit(600, model, config, data, batch_size=50, seed=0)
    assert epoch_s > 0 and epochs == max(1, int(600 // epoch_s))
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))


def test_flip_tta_export_averages_each_image_with_its_mirror():
    dataset = load_dataset()
    config = TrialConfig("mobilenet_v2_0.35", 48, 0, "avg", 64, 0.0, 1e-3, "constant", 0, "adam", "none")
    model = transfer.build_transfer_model(config, dataset.num_classes)
    preprocess = get_backbone(config.backbone).preprocess_input
    images = dataset.x_test[:16]
    served = {
        tta: serving_function(model, 48, preprocess, dataset.class_names, tta)(tf.constant(images))["probabilities"]
        for tta in (False, True)
    }
    plain = model.predict(prepare_images(images, 48, preprocess), verbose=0)
    mirrored = model.predict(prepare_images(images[:, :, ::-1], 48, preprocess), verbose=0)
    np.testing.assert_allclose(served[False].numpy(), plain, atol=1e-5)
    np.testing.assert_allclose(served[True].numpy(), (plain + mirrored) / 2, atol=1e-5)
    assert np.abs(plain - mirrored).max() > 1e-3  # the mirror really is a different input
