"""One test per shim in `common/shims.py`, each against the real installed library.

Every test here exercises the KerasTuner / TensorFlow behaviour a shim relies on, with
real objects (tiny models on a few random rows, projects in `tmp_path`), so that a
library upgrade that changes it fails here, by name, rather than deep inside a trial.
"""

import json
import re
import threading
import time
from pathlib import Path

import keras
import keras_tuner as kt
import numpy as np
import pytest
from keras_tuner.src import utils as kt_utils

from common import shims
from common.errors import UserError

REQUIREMENTS = Path(__file__).resolve().parent.parent / "requirements.txt"


def tiny_data(n=32, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.random((n, 4), dtype=np.float32)
    y = rng.integers(0, 2, n)
    return x, y


class TinyHyperModel(kt.HyperModel):
    """A one-Dense-layer classifier; counts its builds and records what fit() receives."""

    def __init__(self):
        super().__init__()
        self.builds = 0
        self.fits = []  # (hyperparameter values, fit kwargs) per fit() call

    def declare_hyperparameters(self, hp):
        hp.Choice("units", [2, 3])

    def build(self, hp):
        self.builds += 1
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(hp.Choice("units", [2, 3])),
                                  keras.layers.Dense(2, activation="softmax")])
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        return model

    def fit(self, hp, model, *args, **kwargs):
        self.fits.append((dict(hp.values), dict(kwargs)))
        return super().fit(hp, model, *args, **kwargs)


def search_tiny(tuner, epochs=None):
    x, y = tiny_data()
    kwargs = {} if epochs is None else {"epochs": epochs}
    tuner.search(x, y, validation_data=tiny_data(16, seed=1), batch_size=16, verbose=0, **kwargs)


# check_versions ------------------------------------------------------------------------


def test_check_versions_accepts_the_installed_libraries_and_refuses_others_in_one_line():
    shims.check_versions()  # the installed versions (what the module checked at import)
    shims.check_versions({"keras-tuner": ("1.4", "1.4.8"), "tensorflow": ("2.21", "2.21")})

    for installed in ("1.5.0", "1.40.1", "2.0"):
        with pytest.raises(shims.LibraryVersionError) as raised:
            shims.check_versions({"keras-tuner": ("1.4", installed)})
        assert isinstance(raised.value, UserError)  # search.py prints it as one line, exit 2
        message = str(raised.value)
        assert "\n" not in message
        assert "keras-tuner" in message and installed in message and "1.4" in message
        assert "pip install -r requirements.txt" in message


def test_shims_are_written_for_the_versions_requirements_pins():
    pins = dict(re.findall(r"^([\w-]+)==([\w.]+)", REQUIREMENTS.read_text(), flags=re.M))
    for name, (expected, installed) in shims.WRITTEN_FOR.items():
        assert pins[name].startswith(expected + "."), (name, expected, pins[name])
        assert installed == pins[name], f"{name} {installed} is installed, requirements.txt pins {pins[name]}"


def test_a_missing_library_internal_is_a_version_error_not_an_attribute_error():
    with pytest.raises(shims.LibraryVersionError, match="pip install -r requirements.txt"):
        shims._require(kt_utils, "no_such_internal")


# 1. synchronized -----------------------------------------------------------------------


class LockedOracle(kt.oracles.RandomSearchOracle):
    calls = None

    @shims.synchronized
    def slow(self, name, hold_s):
        self.calls.append((name, "enter", time.monotonic()))
        time.sleep(hold_s)
        self.calls.append((name, "exit", time.monotonic()))
        return name

    @shims.synchronized
    def hold(self, release):
        self.calls.append(("hold", "enter", time.monotonic()))
        release.wait(timeout=10)

    @shims.synchronized
    def nested(self):
        # A synchronized method calling another one on the same oracle (as the
        # tuner's fail_silent_trials calls end_trial) must not deadlock.
        return self.get_space() is not None and self.slow("inner", 0)


def test_synchronized_serialises_calls_on_one_oracle_and_is_reentrant():
    oracle = LockedOracle(objective="val_loss", max_trials=1)
    oracle.calls = []
    results = []
    threads = [threading.Thread(target=lambda n=n: results.append(oracle.slow(n, 0.3))) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert sorted(results) == ["a", "b"]  # the decorated function runs and returns its value
    events = [(name, what) for name, what, _ in oracle.calls]
    # Never both inside at once: each enter is immediately followed by its own exit.
    assert events in ([("a", "enter"), ("a", "exit"), ("b", "enter"), ("b", "exit")],
                      [("b", "enter"), ("b", "exit"), ("a", "enter"), ("a", "exit")]), events

    oracle.calls = []
    worker = threading.Thread(target=lambda: results.append(oracle.nested()), daemon=True)
    worker.start()
    worker.join(timeout=10)
    assert not worker.is_alive(), "a synchronized method calling another one deadlocked"
    assert results[-1] == "inner"


def test_synchronized_does_not_block_a_different_oracle():
    first, second = (LockedOracle(objective="val_loss", max_trials=1) for _ in range(2))
    first.calls, second.calls = [], []
    release = threading.Event()
    holder = threading.Thread(target=first.hold, args=(release,), daemon=True)
    holder.start()
    try:
        waited = time.monotonic()
        while not first.calls and time.monotonic() - waited < 10:
            time.sleep(0.01)
        assert first.calls, "the first oracle's synchronized method never started"
        other = threading.Thread(target=second.slow, args=("second", 0), daemon=True)
        other.start()
        other.join(timeout=5)
        assert not other.is_alive(), "one oracle's lock blocked another oracle"
    finally:
        release.set()
        holder.join(timeout=10)


def test_synchronized_releases_the_oracle_lock_when_a_method_raises():
    """KerasTuner's own decorator keeps the lock after an exception, so every later call
    (each worker's gRPC request to the chief) waits forever."""

    class RaisingOracle(LockedOracle):
        @shims.synchronized
        def fail(self):
            raise KeyError("no such tuner")

    oracle = RaisingOracle(objective="val_loss", max_trials=1)
    oracle.calls = []
    with pytest.raises(KeyError):
        threading.Thread(target=oracle.fail).run()  # in this thread, as a gRPC thread would
    other = threading.Thread(target=oracle.slow, args=("after", 0), daemon=True)
    other.start()
    other.join(timeout=5)
    assert not other.is_alive(), "the lock stayed held after the method raised"
    # KerasTuner's own synchronized methods take the same lock: one still runs.
    other = threading.Thread(target=oracle.create_trial, args=("t",), daemon=True)
    other.start()
    other.join(timeout=5)
    assert not other.is_alive(), "a KerasTuner synchronized method waited on the lock"


# 2. SaveBestEpoch -----------------------------------------------------------------------


def test_keras_tuner_hands_fit_a_save_best_epoch_whose_filepath_is_read_when_saving(tmp_path):
    hypermodel = TinyHyperModel()
    tuner = kt.RandomSearch(hypermodel, objective="val_loss", max_trials=1, directory=str(tmp_path),
                            project_name="p", seed=1)
    search_tiny(tuner, epochs=1)

    [(_, kwargs)] = hypermodel.fits
    checkpoints = [cb for cb in kwargs["callbacks"] if isinstance(cb, shims.SaveBestEpoch)]
    assert len(checkpoints) == 1, [type(cb) for cb in kwargs["callbacks"]]
    checkpoint = checkpoints[0]
    # KerasTuner saved the trial's best epoch at the callback's filepath
    # (hypermodel.callbacks.AtomicCheckpoint writes its .npz there instead).
    assert checkpoint.filepath.endswith(".weights.h5") and Path(checkpoint.filepath).is_file()

    redirected = tmp_path / "redirected.weights.h5"
    first = Path(checkpoint.filepath)
    saved_by_the_trial = first.read_bytes()
    trained = checkpoint.model
    trained.layers[-1].bias.assign([0.25, -0.25])  # weights no earlier save held
    checkpoint.filepath = str(redirected)
    checkpoint.on_epoch_end(1, {"val_loss": -1.0})  # better than any epoch so far: saves
    # The save went to the new path (the old file is untouched) and holds the model's
    # weights as they are now.
    assert first.read_bytes() == saved_by_the_trial
    restored = keras.models.clone_model(trained)
    restored.load_weights(redirected)
    for got, expected in zip(restored.get_weights(), trained.get_weights()):
        np.testing.assert_array_equal(got, expected)


# 3. route_keras_tuner_json_writes --------------------------------------------------------


def test_every_keras_tuner_json_file_is_written_through_the_routed_writer(tmp_path, monkeypatch):
    monkeypatch.setattr(kt_utils, "save_json", kt_utils.save_json)  # restored after the test
    written = {}

    def write_text(path, text):
        written[str(Path(path).resolve())] = text
        Path(path).write_text(text)

    shims.route_keras_tuner_json_writes(write_text)
    tuner = kt.RandomSearch(TinyHyperModel(), objective="val_loss", max_trials=2, directory=str(tmp_path),
                            project_name="p", seed=1)
    search_tiny(tuner, epochs=1)

    on_disk = {str(p.resolve()) for p in (tmp_path / "p").rglob("*.json")}
    names = {Path(p).name for p in on_disk}
    assert {"oracle.json", "trial.json", "tuner0.json"} <= names, names
    assert on_disk <= set(written), f"written without the routed writer: {sorted(on_disk - set(written))}"
    for path in on_disk:
        assert json.loads(Path(path).read_text()) == json.loads(written[path])


# 4 and 5. init_tuner and DeclaredSpaceMixin ------------------------------------------------


class CustomHyperbandOracle(kt.oracles.HyperbandOracle):
    pass


class DeclaredHyperband(shims.DeclaredSpaceMixin, kt.Hyperband):
    def __init__(self, oracle, hypermodel, **kwargs):
        shims.init_tuner(self, oracle, hypermodel, **kwargs)


def test_keras_tuners_default_initial_space_builds_a_model(tmp_path):
    # Why DeclaredSpaceMixin exists: KerasTuner builds a whole model (with its
    # weights) in the tuner's constructor just to discover the space. When this
    # fails, KerasTuner stopped doing so and the mixin can go.
    hypermodel = TinyHyperModel()
    kt.Hyperband(hypermodel, objective="val_loss", max_epochs=2, factor=2, seed=1, directory=str(tmp_path),
                 project_name="p")
    assert hypermodel.builds == 1


def test_init_tuner_keeps_our_oracle_and_the_space_is_declared_without_a_build(tmp_path):
    hypermodel = TinyHyperModel()
    oracle = CustomHyperbandOracle(objective="val_loss", max_epochs=2, factor=2, hyperband_iterations=1, seed=1)
    tuner = DeclaredHyperband(oracle, hypermodel, directory=str(tmp_path), project_name="p")

    assert tuner.oracle is oracle
    # The space is known from declare_hyperparameters alone, before any model exists.
    assert hypermodel.builds == 0
    assert [hp.name for hp in tuner.oracle.get_space().space] == ["units"]

    search_tiny(tuner)
    trials = tuner.oracle.trials.values()
    assert len(trials) >= 2 and {t.status for t in trials} == {"COMPLETED"}
    assert hypermodel.builds == len(trials) == len(hypermodel.fits)
    # kt.Hyperband's trial logic runs with our oracle: each fit gets its round's epochs,
    # and a later round continues from an earlier trial's checkpoint.
    for values, kwargs in hypermodel.fits:
        assert kwargs["epochs"] == values["tuner/epochs"]
        assert kwargs["initial_epoch"] == values["tuner/initial_epoch"]
    assert any(values.get("tuner/trial_id") for values, _ in hypermodel.fits)


# 6. custom_gradient_keys / forget_custom_gradients ---------------------------------------


def fit_tiny_model():
    x, y = tiny_data()
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, activation="softmax")])
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    model.fit(x, y, epochs=1, batch_size=16, verbose=0)


def test_fitting_a_model_registers_custom_gradients_and_forget_drops_only_the_new_ones():
    fit_tiny_model()
    earlier = shims.custom_gradient_keys()
    assert earlier, "fitting a Keras model no longer registers CustomGradient-* entries (tensorflow#80895)"

    fit_tiny_model()
    after = shims.custom_gradient_keys()
    # The leak the shim works around: every traced train step adds entries, forever.
    assert after > earlier, "a second fit added no CustomGradient-* entries: tensorflow#80895 may be fixed"

    shims.forget_custom_gradients(earlier)
    assert shims.custom_gradient_keys() == earlier
    fit_tiny_model()  # TensorFlow still trains after entries were dropped


# 8. build_before_tracing ---------------------------------------------------------------


def train_step_traces(build_first):
    """How often Keras traces the train step of a fresh compiled model in its first fit."""
    import tensorflow as tf

    x, y = tiny_data()
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"),
                              keras.layers.Dense(2, activation="softmax")])
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    traces = []
    step = model.train_step
    model.train_step = lambda data: traces.append(1) or step(data)  # runs once per trace
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(32, seed=0).batch(16)
    if build_first:
        shims.build_before_tracing(model, dataset)
        assert model.optimizer.built
    history = model.fit(dataset, epochs=2, verbose=0)
    assert len(history.history["loss"]) == 2 and np.isfinite(history.history["loss"]).all()
    return len(traces)


def test_keras_traces_the_first_train_step_twice_unless_its_variables_are_built_first():
    assert train_step_traces(build_first=False) == 2, "Keras now builds before tracing: drop shim 8"
    assert train_step_traces(build_first=True) == 1


# Consecutive failures (tuning.oracle.BudgetedOracleMixin, with KerasTuner's own check off) --


def end_trials(oracle, statuses):
    for status in statuses:
        trial = oracle.create_trial("tuner0")
        assert trial.status == "RUNNING"
        if status == "COMPLETED":
            oracle.update_trial(trial.trial_id, {"val_accuracy": 0.5})
        trial.status = status
        trial.message = "Traceback ...\nValueError: something unlike KerasTuner's wording"
        oracle.end_trial(trial)


@pytest.fixture
def budgeted_oracle(tmp_path):
    from tuning.oracle import RandomSearchOracle

    def make():
        oracle = RandomSearchOracle(objective=kt.Objective("val_accuracy", "max"), max_trials=20, seed=1,
                                    max_retries_per_trial=0, max_consecutive_failed_trials=None)
        oracle.max_failures = 3
        hp = kt.HyperParameters()
        hp.Float("x", 0, 1)
        oracle.update_space(hp)
        oracle._set_project_dir(str(tmp_path), f"p{len(list(tmp_path.iterdir()))}")
        return oracle

    return make


def test_three_failed_trials_in_a_row_stop_the_search_after_saving_the_last(budgeted_oracle):
    oracle = budgeted_oracle()
    end_trials(oracle, ["FAILED", "FAILED", "FAILED"])  # KerasTuner itself raises nothing
    assert oracle.stop_reason
    assert oracle.populate_space("99")["status"] == "STOPPED"
    assert oracle.create_trial("tuner0").status == "STOPPED"
    # The third failure was recorded (saved, no longer ongoing) before the stop.
    assert [oracle.trials[t].status for t in oracle.end_order] == ["FAILED"] * 3
    assert not oracle.ongoing_trials


def test_a_completed_trial_resets_the_consecutive_failure_count(budgeted_oracle):
    oracle = budgeted_oracle()
    end_trials(oracle, ["FAILED", "FAILED", "COMPLETED", "FAILED", "FAILED"])
    assert not oracle.stop_reason
    assert oracle.populate_space("99")["status"] == "RUNNING"
    end_trials(oracle, ["FAILED"])
    assert oracle.stop_reason


class ChiefKilled(BaseException):
    """The chief's process ends here (kill -9), mid-call."""


def test_a_trial_the_saved_oracle_never_started_is_forgotten_when_it_reloads(tmp_path, monkeypatch):
    """A chief killed between KerasTuner's writing a new trial's trial.json and its
    oracle.json (shims.started_trial_ids): resumed, the search gives that trial id again
    and ends with max_trials trials, every one run (the ghost used to end the search with
    a trial RUNNING that no worker ran)."""
    from tuning.oracle import RandomSearchOracle

    def chief():
        oracle = RandomSearchOracle(objective=kt.Objective("val_accuracy", "max"), max_trials=3, seed=1)
        hp = kt.HyperParameters()
        hp.Float("x", 0, 1)
        oracle.update_space(hp)
        oracle._set_project_dir(str(tmp_path), "p")
        return oracle

    first = chief()
    end_trials(first, ["COMPLETED"])

    def killed():
        raise ChiefKilled

    monkeypatch.setattr(first, "save", killed)
    with pytest.raises(ChiefKilled):
        first.create_trial("tuner0")
    assert json.loads((tmp_path / "p" / "trial_1" / "trial.json").read_text())["status"] == "RUNNING"

    resumed = chief()
    resumed.reload()
    assert set(resumed.trials) == {"0"}
    assert shims.started_trial_ids(resumed) == ["0"]
    end_trials(resumed, ["COMPLETED", "COMPLETED"])
    assert sorted(resumed.trials) == ["0", "1", "2"]
    assert all(trial.status == "COMPLETED" for trial in resumed.trials.values())
    assert resumed.create_trial("tuner0").status == "STOPPED"


# hide_failed_trial_tracebacks --------------------------------------------------------


class FailingHyperModel(TinyHyperModel):
    def fit(self, hp, model, *args, **kwargs):
        raise kt.errors.FailedTrialError("this trial cannot run")


@pytest.mark.parametrize("hidden", [False, True])
def test_keras_tuner_prints_failed_trial_tracebacks_unless_hidden(tmp_path, capsys, monkeypatch, hidden):
    from keras_tuner.src import config as kt_config

    monkeypatch.setattr(kt_config, "DEBUG", True)  # KerasTuner's default; restored after the test
    if hidden:
        shims.hide_failed_trial_tracebacks()
    tuner = kt.RandomSearch(FailingHyperModel(), objective="val_loss", max_trials=1, directory=str(tmp_path),
                            project_name="p", max_consecutive_failed_trials=None)
    search_tiny(tuner, epochs=1)
    assert tuner.oracle.trials[next(iter(tuner.oracle.trials))].status == "FAILED"
    printed = capsys.readouterr()
    assert ("this trial cannot run" in printed.out + printed.err) is not hidden


# 9. NumpyCheckpointsMixin -----------------------------------------------------------------


class NumpyCheckpointHyperband(shims.DeclaredSpaceMixin, shims.NumpyCheckpointsMixin, kt.Hyperband):
    pass


class CheckpointingHyperModel(TinyHyperModel):
    """Checkpoints as the tool's training loop does (`AtomicCheckpoint`), and records the
    weights each fit starts from and has after every epoch, with its val_loss."""

    def __init__(self):
        super().__init__()
        self.started_with, self.epochs = {}, {}

    def fit(self, hp, model, *args, callbacks=(), **kwargs):
        from hypermodel.callbacks import AtomicCheckpoint

        trial = [cb for cb in callbacks if isinstance(cb, shims.SaveBestEpoch)][0].filepath
        self.started_with[trial] = model.get_weights()
        epochs = self.epochs.setdefault(trial, [])

        class Record(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                epochs.append((logs["val_loss"], self.model.get_weights()))

        callbacks = [AtomicCheckpoint(cb) if isinstance(cb, shims.SaveBestEpoch) else cb for cb in callbacks]
        return super().fit(hp, model, *args, callbacks=callbacks + [Record()], **kwargs)


def test_numpy_checkpoints_hold_the_best_epoch_and_the_next_hyperband_round_starts_from_them(tmp_path):
    hypermodel = CheckpointingHyperModel()
    tuner = NumpyCheckpointHyperband(hypermodel, objective="val_loss", max_epochs=2, factor=2, seed=1,
                                     directory=str(tmp_path), project_name="p")
    search_tiny(tuner)

    trials = {t.trial_id: t for t in tuner.oracle.trials.values()}
    assert {t.status for t in trials.values()} == {"COMPLETED"}
    assert not list(tmp_path.rglob("*.h5"))
    for trial_id, trial in trials.items():
        path = Path(tuner.get_trial_dir(trial_id)) / "checkpoint.weights.npz"
        best_loss, best_weights = min(hypermodel.epochs[str(path)], key=lambda e: e[0])
        for got, expected in zip(shims.atomic.read_arrays(path), best_weights, strict=True):
            np.testing.assert_array_equal(got, expected)
        parent = trial.hyperparameters.values.get("tuner/trial_id")
        if parent:  # a later round: it starts from its parent's best epoch
            _, parent_best = min(hypermodel.epochs[str(Path(tuner.get_trial_dir(parent)) / path.name)],
                                 key=lambda e: e[0])
            for got, expected in zip(hypermodel.started_with[str(path)], parent_best, strict=True):
                np.testing.assert_array_equal(got, expected)
    assert any(t.hyperparameters.values.get("tuner/trial_id") for t in trials.values())

    best = tuner.oracle.get_best_trials(1)[0]
    loaded = tuner.load_model(best)
    _, expected = min(hypermodel.epochs[tuner._get_checkpoint_fname(best.trial_id)], key=lambda e: e[0])
    for got, want in zip(loaded.get_weights(), expected, strict=True):
        np.testing.assert_array_equal(got, want)


# 10. InterruptibleCallbackCopyMixin -------------------------------------------------------


class CopyRaises(keras.callbacks.Callback):
    """A callback whose copy, made at each trial's start, raises `error`."""

    def __init__(self, error):
        super().__init__()
        self.error = error

    def __deepcopy__(self, memo):
        raise self.error


class InterruptibleRandomSearch(shims.InterruptibleCallbackCopyMixin, kt.RandomSearch):
    pass


def search_tiny_with(tuner, callback):
    x, y = tiny_data()
    tuner.search(x, y, validation_data=tiny_data(16, seed=1), epochs=1, batch_size=16, verbose=0,
                 callbacks=[callback])


def test_a_ctrl_c_while_keras_tuner_copies_the_callbacks_becomes_a_fatal_error(tmp_path):
    # Why the mixin exists: when this fails, KerasTuner lets KeyboardInterrupt through itself.
    tuner = kt.RandomSearch(TinyHyperModel(), objective="val_loss", max_trials=1, directory=str(tmp_path),
                            project_name="p")
    with pytest.raises(kt.errors.FatalValueError):
        search_tiny_with(tuner, CopyRaises(KeyboardInterrupt()))


def test_with_the_mixin_a_ctrl_c_is_an_interrupt_and_an_uncopyable_callback_still_a_fatal_error(tmp_path):
    tuner = InterruptibleRandomSearch(TinyHyperModel(), objective="val_loss", max_trials=1,
                                      directory=str(tmp_path / "a"), project_name="p")
    with pytest.raises(KeyboardInterrupt):
        search_tiny_with(tuner, CopyRaises(KeyboardInterrupt()))

    tuner = InterruptibleRandomSearch(TinyHyperModel(), objective="val_loss", max_trials=1,
                                      directory=str(tmp_path / "b"), project_name="p")
    with pytest.raises(kt.errors.FatalValueError, match="deep-copyable.*no copies here"):
        search_tiny_with(tuner, CopyRaises(TypeError("no copies here")))


def test_learning_rate_schedule_is_the_one_the_optimizer_was_given_and_none_for_a_fixed_rate():
    schedule = keras.optimizers.schedules.CosineDecay(1e-3, decay_steps=100)
    optimizer = keras.optimizers.Adam(schedule)
    assert shims.learning_rate_schedule(optimizer) is schedule
    assert shims.learning_rate_schedule(keras.optimizers.Adam(1e-3)) is None
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, activation="softmax")])
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy")
    model.fit(*tiny_data(), epochs=1, batch_size=8, verbose=0)  # compiling and training keep it
    assert shims.learning_rate_schedule(model.optimizer) is schedule


@pytest.mark.parametrize("keras_class", [keras.optimizers.Adam, keras.optimizers.AdamW])
def test_the_fused_adam_step_updates_variables_and_moments_as_keras_adam_does(keras_class):
    """Five steps of a schedule on a few thousand weights, in a traced step as `fit` runs
    them: the same weights and moments to float32 rounding (Keras' ops round after each
    operation, the kernel once per element)."""
    import tensorflow as tf

    class Fused(shims.FusedAdamStepMixin, keras_class):
        pass

    rng = np.random.default_rng(0)
    initial = [rng.normal(size=shape).astype("float32") for shape in ((3, 3, 8, 16), (16,), (40, 10))]
    gradients = [[rng.normal(scale=1e-2, size=w.shape).astype("float32") for w in initial] for _ in range(5)]
    schedule = keras.optimizers.schedules.ExponentialDecay(3e-3, decay_steps=2, decay_rate=0.5)
    results = {}
    for optimizer_class in (keras_class, Fused):
        weights = [keras.Variable(w) for w in initial]
        optimizer = optimizer_class(schedule)
        optimizer.build(weights)
        step = tf.function(lambda grads: optimizer.apply(grads, weights))
        for grads in gradients:
            step([tf.constant(g) for g in grads])
        results[optimizer_class] = [w.numpy() for w in weights + optimizer._momentums + optimizer._velocities]
        assert int(optimizer.iterations.numpy()) == 5
    moved = [not np.allclose(w, i) for w, i in zip(results[Fused], initial)]
    assert all(moved)
    for got, expected in zip(results[Fused], results[keras_class], strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)


# 13. requeue_trial ----------------------------------------------------------------------


def test_a_requeued_trial_is_the_next_trial_any_worker_gets_with_its_id_and_values(tmp_path):
    oracle = kt.RandomSearch(TinyHyperModel(), objective="val_loss", max_trials=5, directory=str(tmp_path),
                             project_name="p", seed=1).oracle
    lost = oracle.create_trial("w1")
    assert lost.status == "RUNNING"

    assert shims.requeue_trial(oracle, "w1").trial_id == lost.trial_id
    assert "w1" not in oracle.ongoing_trials
    again = oracle.create_trial("w2")
    assert again.trial_id == lost.trial_id and again.status == "RUNNING"
    assert again.hyperparameters.values == lost.hyperparameters.values
    assert oracle.ongoing_trials["w2"].trial_id == lost.trial_id
    assert oracle.create_trial("w3").trial_id != lost.trial_id  # handed out once


# 14. running_trials / waiting_workers / ended_trial_ids -----------------------------------


def test_the_oracles_bookkeeping_tracks_runs_workers_and_the_end_order(tmp_path):
    oracle = kt.RandomSearch(TinyHyperModel(), objective="val_loss", max_trials=5, directory=str(tmp_path),
                             project_name="p", seed=1).oracle
    first, second = oracle.create_trial("w1"), oracle.create_trial("w2")
    assert {w: t.trial_id for w, t in shims.running_trials(oracle).items()} == {
        "w1": first.trial_id, "w2": second.trial_id}
    assert {"w1", "w2"} <= shims.waiting_workers(oracle)
    for trial in (second, first):
        trial.status = "COMPLETED"
        oracle.update_trial(trial.trial_id, {"val_loss": 1.0})
        oracle.end_trial(trial)
    assert shims.ended_trial_ids(oracle) == [second.trial_id, first.trial_id]
    assert shims.running_trials(oracle) == {}


# 15. proposal_undone -----------------------------------------------------------------------


def test_an_undone_proposal_leaves_the_oracle_as_if_it_had_never_been_made(tmp_path):
    oracle = kt.Hyperband(TinyHyperModel(), objective="val_loss", max_epochs=4, factor=2, seed=1,
                          directory=str(tmp_path), project_name="p").oracle
    hp = kt.HyperParameters()
    hp.Float("lr", 1e-4, 1e-2, sampling="log")
    oracle.update_space(hp)
    with shims.proposal_undone(oracle) as undo:
        proposed = oracle.populate_space("t0")
        undo()
    assert proposed["status"] == "RUNNING"
    assert oracle.populate_space("t0") == proposed  # the same values, bracket and round: nothing used up
    with shims.proposal_undone(oracle):
        kept = oracle.populate_space("t1")  # not undone: the next proposal is another one
    assert oracle.populate_space("t2")["values"]["lr"] != kept["values"]["lr"]


# 16. IdleAskPauseMixin -------------------------------------------------------------------


def test_keras_tuners_search_loop_calls_pre_create_trial_before_each_ask(tmp_path):
    asks = []

    class Counting(shims.IdleAskPauseMixin, kt.RandomSearch):
        idle_pause_s = 0.0

        def pre_create_trial(self):
            asks.append(self.oracle.ongoing_trials.copy())
            super().pre_create_trial()

    x, y = np.zeros((8, 4), "float32"), np.zeros(8, "int32")
    tuner = Counting(TinyHyperModel(), objective="val_loss", max_trials=2, directory=str(tmp_path), project_name="p")
    tuner.search(x, y, validation_data=(x, y), epochs=1, verbose=0)
    assert len(asks) == 3  # two trials, and the ask that found the search over
    assert tuner._asked_without_trial  # the last ask got no trial: the next would pause


# 17. tflite_converter ------------------------------------------------------------------


def test_a_concrete_function_is_converted_through_a_temporary_saved_model_unless_the_shim_freezes_it(monkeypatch):
    import tempfile

    import tensorflow as tf
    from ai_edge_litert.interpreter import Interpreter

    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(2, kernel_initializer="ones", bias_initializer="ones")(inputs))
    function = tf.function(lambda x: {"y": model(tf.cast(x, tf.float32))},
                           input_signature=[tf.TensorSpec([None, 3], tf.uint8)])
    made = []
    mkdtemp = tempfile.mkdtemp
    monkeypatch.setattr(tempfile, "mkdtemp", lambda *a, **k: made.append(mkdtemp(*a, **k)) or made[-1])

    outputs = {}
    for route, converter in (("lowered", lambda: tf.lite.TFLiteConverter.from_concrete_functions(
                                  [function.get_concrete_function()], model)),
                             ("frozen", lambda: shims.tflite_converter(function, model))):
        made.clear()
        converted = converter().convert()
        outputs[route] = len(made)
    assert outputs["lowered"] >= 1  # TensorFlow's default writes a SavedModel first
    assert outputs["frozen"] == 0
    interpreter = Interpreter(model_content=converted)  # the frozen file computes the model
    interpreter.resize_tensor_input(interpreter.get_input_details()[0]["index"], [1, 3])
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], np.array([[1, 2, 3]], np.uint8))
    interpreter.invoke()
    np.testing.assert_array_equal(interpreter.get_tensor(interpreter.get_output_details()[0]["index"]),
                                  [[7.0, 7.0]])  # 1 + 2 + 3 + bias 1
