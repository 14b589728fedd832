"""Two-phase retraining: which weights each phase trains, and who reads the test split."""

import numpy as np
import pytest

from data_pipeline import load_dataset
from hypermodel import transfer
from hypermodel.space import SearchChoices
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
