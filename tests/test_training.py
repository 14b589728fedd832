"""The training loop's search-time behaviour: partial-pass epochs, best-epoch checkpoints, footprints."""

import dataclasses

import keras
import keras_tuner as kt
import numpy as np
import pytest

from common import atomic
from common.shims import SaveBestEpoch
from data_pipeline import load_dataset
from data_pipeline.feature_cache import FeatureCache
from data_pipeline.splits import TrainingData
from hypermodel.callbacks import FitToDeadline
from hypermodel.model import PREFIX_NAME, TOP_NAME, ReusedBackbones, build_transfer_model
from hypermodel.space import TrialConfig
from hypermodel.training import compile_for_training, train


def config(unfrozen_blocks=2, learning_rate=3e-3):
    return TrialConfig("mobilenet_v2_0.35", 32, unfrozen_blocks, "avg", 64, 0.0, learning_rate, "constant", 0,
                       "adam", "none")


@pytest.fixture(scope="module")
def data():
    dataset = load_dataset()
    return TrainingData(dataset.x_train[:320], dataset.y_train[:320], dataset.x_train[320:480],
                        dataset.y_train[320:480], dataset.num_classes, key="slice")


class Batches(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.per_epoch = []

    def on_epoch_begin(self, epoch, logs=None):
        self.per_epoch.append(0)

    def on_train_batch_end(self, batch, logs=None):
        self.per_epoch[-1] += 1


@pytest.mark.parametrize("cached", [True, False])
def test_an_epoch_fraction_trains_that_share_of_a_pass_per_epoch(data, cached):
    batches = Batches()
    history, mode = train(build_transfer_model(config(), 10), config(), data, batch_size=32, seed=0, epochs=3,
                          callbacks=[batches], feature_cache=FeatureCache(None) if cached else None,
                          epoch_fraction=0.3)
    assert mode == ("cached" if cached else "end-to-end")
    assert batches.per_epoch == [3, 3, 3]  # 10 batches make a pass; 0.3 of it is 3
    assert len(history.history["val_accuracy"]) == 3  # every epoch is scored on all validation images
    # A later Hyperband round (initial_epoch) runs only its own epochs.
    history, _ = train(build_transfer_model(config(), 10), config(), data, batch_size=32, seed=0, epochs=5,
                       initial_epoch=3, callbacks=[batches], epoch_fraction=0.3)
    assert batches.per_epoch == [3, 3] and history.epoch == [3, 4]


@pytest.mark.parametrize("cached", [True, False])
def test_a_round_validated_once_trains_the_same_steps_under_the_same_schedule(data, cached):
    # Warmup over the first epoch, then cosine decay: stretching either over the round's
    # steps would change the weights.
    trial = dataclasses.replace(config(), lr_schedule="cosine", warmup_epochs=1)
    rounds = {}
    for validate_once in (False, True):
        batches = Batches()
        model = build_transfer_model(trial, 10)
        history, _ = train(model, trial, data, batch_size=32, seed=0, epochs=5, initial_epoch=2,
                           callbacks=[batches], feature_cache=FeatureCache(None) if cached else None,
                           epoch_fraction=0.3, validate_once=validate_once)
        rounds[validate_once] = history, batches.per_epoch, model.get_weights()
    (each, each_batches, each_weights), (once, once_batches, once_weights) = rounds[False], rounds[True]
    assert each_batches == [3, 3, 3] and len(each.history["val_accuracy"]) == 3
    assert once_batches == [9] and once.epoch == [4] and len(once.history["val_accuracy"]) == 1
    assert once.history["val_accuracy"][0] == pytest.approx(each.history["val_accuracy"][-1], abs=1e-6)
    for got, expected in zip(once_weights, each_weights, strict=True):
        np.testing.assert_allclose(got, expected, atol=1e-5)


def test_the_checkpoint_holds_the_best_epochs_weights_written_once(data, tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint.weights.npz")
    checkpoint = SaveBestEpoch(kt.Objective("val_accuracy", "max"), path)
    model = build_transfer_model(config(learning_rate=1e-2), 10)
    seen = []

    class Record(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            seen.append((logs["val_accuracy"], model.get_weights()))

    writes = []
    write_arrays = atomic.write_arrays
    monkeypatch.setattr(atomic, "write_arrays", lambda p, arrays: writes.append(p) or write_arrays(p, arrays))
    train(model, config(learning_rate=1e-2), data, batch_size=32, seed=0, epochs=4,
          callbacks=[checkpoint, Record()], feature_cache=FeatureCache(None))
    assert writes == [path] and sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.weights.npz"]
    best = max(range(len(seen)), key=lambda i: (seen[i][0], -i))  # the first epoch with the top score
    stored = atomic.read_arrays(path)
    for got, expected in zip(stored, seen[best][1], strict=True):
        np.testing.assert_array_equal(got, expected)
    restored = build_transfer_model(config(), 10)
    restored.set_weights(stored)  # the stored arrays fit a freshly built model of the same trial
    # The model itself keeps its last epoch's weights.
    for got, expected in zip(model.get_weights(), seen[-1][1], strict=True):
        np.testing.assert_array_equal(got, expected)


def test_a_reused_backbone_starts_each_trial_as_if_freshly_built(data):
    """A search trial's model on a reused backbone has exactly the weights (ImageNet
    backbone, seeded head) and the trainable weights of a freshly built one, whatever
    the trial before it fine-tuned on the same backbone."""
    backbones = ReusedBackbones()
    first = build_transfer_model(config(unfrozen_blocks=5), 10, backbones=backbones)
    before = first.get_weights()
    train(first, config(unfrozen_blocks=5), data, batch_size=32, seed=0, epochs=1)
    assert any(not np.array_equal(a, b) for a, b in zip(first.get_weights(), before))  # it fine-tuned
    for cut in (5, 2):
        reused = build_transfer_model(config(unfrozen_blocks=cut), 10, backbones=backbones)
        fresh = build_transfer_model(config(unfrozen_blocks=cut), 10)
        assert reused.get_layer(PREFIX_NAME).layers[-1] in first.layers[1].layers + first.layers[2].layers[1].layers
        for got, expected in zip(reused.get_weights(), fresh.get_weights(), strict=True):
            np.testing.assert_array_equal(got, expected)
        # The same backbone weights train (the heads' auto-generated layer names differ).
        assert [(w.path if w.path.startswith("block_") else "head", tuple(w.shape)) for w in reused.trainable_weights] \
            == [(w.path if w.path.startswith("block_") else "head", tuple(w.shape)) for w in fresh.trainable_weights]


@pytest.mark.parametrize("cached", [True, False])
def test_trials_on_a_reused_backbone_trace_their_unfrozen_blocks_once(data, cached):
    """Trials cutting the same blocks call one traced forward pass (training and
    validation alike, MobileNetV2's blocks having no dropout), and train exactly the
    weights a model built without reuse trains."""
    from hypermodel.model import SUFFIX_NAME

    backbones, blocks = ReusedBackbones(), []
    trials = [config(unfrozen_blocks=5), dataclasses.replace(config(unfrozen_blocks=5), dense_units=128)]
    for trial in trials:
        reused, fresh = build_transfer_model(trial, 10, backbones=backbones), build_transfer_model(trial, 10)
        blocks.append(reused.get_layer(TOP_NAME).get_layer(SUFFIX_NAME))
        for model in (reused, fresh):
            train(model, trial, data, batch_size=32, seed=0, epochs=1,
                  feature_cache=FeatureCache(None, log=lambda m: None) if cached else None)
        for got, expected in zip(reused.get_weights(), fresh.get_weights(), strict=True):
            np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    assert blocks[1] is blocks[0]
    assert [f.experimental_get_tracing_count() for f in blocks[0]._functions.values()] == [1]


def test_latency_is_measured_once_per_backbone_and_resolution_and_size_is_each_models(monkeypatch):
    """Two heads on one backbone: one latency measurement, and sizes that differ by exactly
    the wider head's extra weights."""
    from hypermodel import footprint

    calls = []
    measure = footprint.measure_latency_ms
    monkeypatch.setattr(footprint, "measure_latency_ms", lambda *a, **k: calls.append(a) or measure(*a, **k))
    checker = footprint.FootprintChecker(footprint.Limits())
    narrow, wide = config(), dataclasses.replace(config(), dense_units=256)
    found = [checker.check(build_transfer_model(c, 10, "imagenet", 0), c) for c in (narrow, wide)]
    assert len(calls) == 1 and found[0].latency_ms == found[1].latency_ms > 0
    # MobileNetV2 pools 1 280 features at every width α; the head is Dense(units) → Dense(10).
    extra_weights = (256 - 64) * (1280 + 1) + (256 - 64) * 10
    assert found[1].model_mb - found[0].model_mb == pytest.approx(extra_weights * 4 / 2**20)


def test_a_trial_times_and_caches_with_one_traced_pass_when_its_search_has_head_only_trials(data, monkeypatch,
                                                                                              tmp_path):
    """The footprint's pass runs the whole backbone anyway, so it also computes the cuts:
    the cache traces no pass of its own, and the latency is the model's."""
    from hypermodel import footprint
    from hypermodel.hypermodel import TransferHyperModel
    from hypermodel.space import SearchChoices

    def no_own_pass(self, group):
        raise AssertionError("the feature cache traced a pass of its own")

    monkeypatch.setattr(FeatureCache, "_pass_function", no_own_pass)
    timed = []
    measure = footprint.measure_latency_ms
    monkeypatch.setattr(footprint, "measure_latency_ms", lambda predict, *a: timed.append(predict) or measure(predict, *a))
    choices = SearchChoices(backbones=("mobilenet_v2_0.35",), resolutions=(32,), unfrozen_blocks=(0, 2),
                            dense_units=(64, 64), learning_rate=(3e-3, 3e-3), lr_schedules=("constant",))
    cache = FeatureCache(tmp_path, log=lambda m: None)
    hypermodel = TransferHyperModel(choices, 10, batch_size=32, feature_cache=cache)
    hp = kt.HyperParameters()
    hypermodel.declare_hyperparameters(hp)
    model = hypermodel.build(hp)
    history = hypermodel.fit(hp, model, data, epochs=1)
    assert history.fit_mode == "cached" and cache.builds == 2  # train and validation, one pass each
    assert len(list(tmp_path.glob("*.npy"))) == 2 * 2  # with the other cut's features
    (predict,) = timed
    inference = predict.__self__
    assert inference._function.experimental_get_tracing_count() == 1
    images = np.random.default_rng(0).uniform(-1, 1, (4, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(predict(images), model(images, training=False), atol=1e-5)


class BatchHooks(keras.callbacks.Callback):
    """Counts the training-step hooks Keras calls: one per execution of the step function."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def on_train_batch_end(self, batch, logs=None):
        self.calls += 1


@pytest.mark.parametrize("batch_size, epochs, executions_per_epoch", [(64, 2, 5), (8, 7, 2)])
def test_a_cached_head_runs_many_steps_per_execution_only_in_a_long_fit(data, batch_size, epochs,
                                                                        executions_per_epoch):
    """10 steps do not earn back the multi-step loop's longer trace: each of the 5 steps of
    an epoch is its own execution. 280 do: an epoch's 40 steps run in 2 executions
    (Keras calls the batch hooks once per execution), and every step still trains."""
    cfg = config(unfrozen_blocks=0)
    model = build_transfer_model(cfg, 10)
    hooks = BatchHooks()
    history, mode = train(model, cfg, data, batch_size=batch_size, seed=0, epochs=epochs, callbacks=[hooks],
                          feature_cache=FeatureCache(None, log=lambda m: None))
    assert mode == "cached" and len(history.epoch) == epochs
    assert hooks.calls == epochs * executions_per_epoch
    steps = int(model.get_layer(TOP_NAME).optimizer.iterations.numpy())
    assert steps == epochs * -(-len(data.x_train) // batch_size)


@pytest.mark.parametrize("fraction, validations", [(0.3, 1), (1.0, 2)])
def test_a_hyperband_round_of_part_passes_is_validated_once_at_its_end(data, fraction, validations):
    """Hyperband judges a round when it ends: a round of part-pass epochs is scored once;
    whole-pass rounds keep a score per epoch (early stopping can use it). Either way the
    record counts epochs from the trial's first round."""
    from hypermodel.hypermodel import TransferHyperModel
    from hypermodel.space import SearchChoices

    choices = SearchChoices(backbones=("mobilenet_v2_0.35",), resolutions=(32,), unfrozen_blocks=(2,),
                            dense_units=(64, 64), learning_rate=(3e-3, 3e-3), lr_schedules=("constant",))
    hypermodel = TransferHyperModel(choices, 10, batch_size=32, feature_cache=FeatureCache(None),
                                    epoch_fraction=fraction)
    hp = kt.HyperParameters()
    hypermodel.declare_hyperparameters(hp)
    hp.Fixed("tuner/epochs", 3)
    hp.Fixed("tuner/initial_epoch", 1)
    history = hypermodel.fit(hp, hypermodel.build(hp), data, epochs=3, initial_epoch=1)
    assert len(history.history["val_accuracy"]) == validations
    assert history.epochs_run == 2 and history.best_epoch in (2, 3)
    if validations == 1:
        assert history.best_epoch == 3


class Clock:
    """A controlled `time.time()` for FitToDeadline: epochs take the seconds a test says,
    however fast or loaded the machine is."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class EpochsTake(keras.callbacks.Callback):
    """Advances `clock` by `seconds(epoch)` at the end of each epoch (placed before
    FitToDeadline, which then sees the epoch as that long)."""

    def __init__(self, clock, seconds):
        super().__init__()
        self.clock = clock
        self.seconds = seconds

    def on_epoch_end(self, epoch, logs=None):
        self.clock.now += self.seconds(epoch)


def tiny_model():
    x = np.random.default_rng(0).normal(size=(64, 4)).astype("float32")
    y = (x[:, 0] > 0).astype("int32")
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, activation="softmax")]), x, y


@pytest.mark.parametrize("planned_epoch_s, expected_epochs", [(None, 1), (0.0625, 17)])
def test_the_deadline_judges_the_next_epoch_by_the_plan_not_by_the_traced_first_one(planned_epoch_s,
                                                                                   expected_epochs):
    """The first epoch takes 1.5 s (tracing a backbone's graphs on a slow machine), the
    others 1/16 s, as planned; the deadline is 2.5 s away. Judged by the first epoch, a
    second one would overrun; judged by the plan, 16 more fit: 1.5 + 16 / 16 = 2.5."""
    model, x, y = tiny_model()
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    clock = Clock()
    deadline = clock.now + 2.5
    history = model.fit(x, y, epochs=1000, verbose=0, callbacks=[
        EpochsTake(clock, lambda epoch: 1.5 if epoch == 0 else 0.0625),
        FitToDeadline(deadline, planned_epoch_s=planned_epoch_s, clock=clock)])
    assert len(history.epoch) == expected_epochs
    assert clock.now <= deadline


def test_epochs_slower_than_planned_still_end_by_the_deadline_with_the_decay_finished():
    """Planned at 0.15 s an epoch, epochs take 0.5 s (real epochs run slower than a few
    timed steps): of 12 planned epochs, the 6 that fit in 3 s run, and the cosine decay
    ends with the sixth."""
    model, x, y = tiny_model()
    cosine = TrialConfig("mobilenet_v2_0.35", 32, 0, "avg", 64, 0.0, 1e-2, "cosine", 0, "adam", "none")
    planned_epochs = 12
    compile_for_training(model, cosine, steps_per_epoch=2, epochs=planned_epochs)
    clock = Clock()
    deadline = clock.now + 3.0
    lines = []
    fit_to_deadline = FitToDeadline(deadline, planned_epoch_s=0.15, log=lines.append, clock=clock)
    history = model.fit(x, y, batch_size=32, epochs=planned_epochs, verbose=0, shuffle=False,
                        callbacks=[EpochsTake(clock, lambda epoch: 0.5), fit_to_deadline])
    assert len(history.epoch) == 6 and clock.now == deadline
    # The decay ended with the last epoch that ran, not at the planned twelfth.
    assert float(model.optimizer.learning_rate) <= 0.02 * 1e-2
    assert fit_to_deadline.revisions[-1]["epochs"] == 6
    assert any("epochs fit before the deadline" in line for line in lines)


def test_one_slow_epoch_does_not_cut_the_plan_and_the_estimate_recovers():
    """30 epochs planned at 1 s fill a 30.5 s deadline; the third takes 1.6 s (the machine
    was busy), the rest 1 s. A mean or last-epoch estimate would cut the run to 19 epochs;
    the median of the recent epochs keeps 29 (the time lost is one epoch's worth), and the
    decay ends with the last of them."""
    model, x, y = tiny_model()
    cosine = TrialConfig("mobilenet_v2_0.35", 32, 0, "avg", 64, 0.0, 1e-2, "cosine", 0, "adam", "none")
    compile_for_training(model, cosine, steps_per_epoch=2, epochs=30)
    clock = Clock()
    deadline = clock.now + 30.5
    fit_to_deadline = FitToDeadline(deadline, planned_epoch_s=1.0, log=lambda _: None, clock=clock)
    rates = []
    record_rate = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: rates.append(float(model.optimizer.learning_rate)))
    history = model.fit(x, y, batch_size=32, epochs=30, verbose=0, shuffle=False, callbacks=[
        EpochsTake(clock, lambda epoch: 1.6 if epoch == 2 else 1.0), fit_to_deadline, record_rate])
    assert len(history.epoch) == 29 and clock.now <= deadline
    # The decay spans the 29 epochs: cut to 19–23 after the slow one, it would have ended
    # there (cosine's 23rd of 29 epochs is still at a tenth of the peak rate).
    assert rates[22] > 0.05 * 1e-2, rates
    assert rates[-1] <= 0.02 * 1e-2
