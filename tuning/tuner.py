"""The search: KerasTuner's Hyperband (or random / Bayesian) over the TransferHyperModel.

How trials run (what to try is `tuning/oracle.py`'s). What this module adds to KerasTuner:
- per-trial records, the leaderboard and best_hparams.json after every trial;
- one console line per trial, and memory hygiene between trials.
"""

import gc
import json
import os
import threading
import time
from pathlib import Path

import keras
import keras_tuner as kt

from common import atomic, shims
from common.errors import UserError
from data_pipeline.splits import objective_for
from hypermodel import space
from hypermodel.footprint import Limits, TrialRejected
from hypermodel.hypermodel import TransferHyperModel
from tuning import leaderboard
from tuning.oracle import BayesianOptimizationOracle, HyperbandOracle, RandomSearchOracle

PROJECT_NAME = "tuner"
IDLE_PAUSE_S = shims.IdleAskPauseMixin.idle_pause_s  # between a worker's asks while the oracle has no trial ready
CHIEF_PATIENCE_S = 3600  # a worker waits this long for its chief to come back (KerasTuner's own wait)
TUNERS = ("hyperband", "random", "bayesian")


class SearchStopped(UserError):
    """Too many trials in a row failed (`max_consecutive_failures`)."""


class TrialHeartbeat:
    """Tells the chief every `interval` s, from a thread, that this worker is on its trial.

    KerasTuner's workers report to the oracle only when a trial ends, so the chief's
    watchdog (`tuning.oracle.BudgetedOracleMixin.fail_silent_trials`) could not tell a long trial from
    a dead worker. Asking the oracle for the trial (`Oracle.get_trial`, over gRPC) is
    the report; it costs the chief a dictionary lookup.

    Args:
        oracle: The worker's `OracleClient`.
        trial_id: The trial this worker runs.
        interval: Seconds between reports.
    """

    def __init__(self, oracle, trial_id, interval):
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(oracle, trial_id, interval),
                                        name=f"heartbeat-{trial_id}", daemon=True)
        self._thread.start()

    def _beat(self, oracle, trial_id, interval):
        import grpc

        while not self._stopped.wait(interval):
            try:
                oracle.get_trial(trial_id)
            except grpc.RpcError:
                pass  # the chief is busy or restarting: the next beat tries again

    def stop(self):
        self._stopped.set()


class ReconnectingOracleClient:
    """A worker's oracle client that rides out a chief restart.

    KerasTuner's client waits for a chief that is down (`wait_for_ready`), but a call in
    flight when the chief dies fails with UNAVAILABLE, and would end the worker (or
    fail its trial). Such a call is sent again, every `pause_s`, for up to `patience_s`:
    each is safe to repeat, since a chief that already took it answers a second
    `create_trial` with the same trial and ignores a second `end_trial`.

    Args:
        client: KerasTuner's `OracleClient`.
        patience_s: How long a chief may stay unreachable.
    """

    CALLS = ("get_space", "update_space", "create_trial", "update_trial", "end_trial", "get_trial",
             "get_best_trials")

    def __init__(self, client, patience_s, pause_s=1.0):
        self._client = client
        self._patience_s = patience_s
        self._pause_s = pause_s

    def __getattr__(self, name):
        attribute = getattr(self._client, name)
        if name not in self.CALLS:
            return attribute

        def call(*args, **kwargs):
            import grpc

            give_up = time.time() + self._patience_s
            while True:
                try:
                    return attribute(*args, **kwargs)
                except grpc.RpcError as e:
                    if e.code() != grpc.StatusCode.UNAVAILABLE or time.time() > give_up:
                        raise
                time.sleep(self._pause_s)

        return call


def heartbeat_interval(settings):
    """Seconds between a worker's `TrialHeartbeat`s: --heartbeat, but at most a third of
    --worker-timeout so that a missed beat or two is not taken for a dead worker; None
    when --heartbeat is 0."""
    if not settings.heartbeat_s:
        return None
    if not settings.worker_timeout_s:
        return settings.heartbeat_s
    return min(settings.heartbeat_s, settings.worker_timeout_s / 3)


class TransferTuner(shims.DeclaredSpaceMixin, shims.NumpyCheckpointsMixin,
                    shims.InterruptibleCallbackCopyMixin, shims.IdleAskPauseMixin, kt.Tuner):
    """A KerasTuner `Tuner` that records each trial and keeps the leaderboard current.

    Args:
        oracle: One of the budgeted oracles above.
        hypermodel: A `TransferHyperModel`.
        run_dir: The run directory (the tuner project lives in `run_dir/tuner`).
        worker: Name of this process in the leaderboard ("local" unless distributed).
        heartbeat_s: A distributed worker's seconds between `TrialHeartbeat`s; None for none.
        **kwargs: Passed to `kt.Tuner`.
    """

    def __init__(self, oracle, hypermodel, run_dir, worker="local", log=print, heartbeat_s=None, **kwargs):
        self.run_dir = Path(run_dir)
        self.max_epochs_per_trial = getattr(oracle, "max_epochs_per_trial", 1)
        self.worker = worker
        self.log = log
        self.heartbeat_s = heartbeat_s
        self._heartbeat = None
        self._trial_started = {}
        self._gradients_before_trial = set()
        self._trial_fits = {}
        # Also for HyperbandTransferTuner, whose kt.Hyperband parent would otherwise
        # build an oracle of its own.
        shims.init_tuner(self, oracle, hypermodel, directory=str(run_dir), project_name=PROJECT_NAME, **kwargs)

    def run_trial(self, trial, *args, **kwargs):
        if "tuner/epochs" not in trial.hyperparameters.values:  # random / bayesian
            kwargs.setdefault("epochs", self.max_epochs_per_trial)
        config = space.declare(trial.hyperparameters.copy(), self.hypermodel.choices)
        try:
            # An architecture already measured over a limit is rejected without building it.
            known = self.hypermodel.footprints.known_rejection(config)
            if known is not None:
                raise known
            histories = super().run_trial(trial, *args, **kwargs)
        except TrialRejected as e:
            self._trial_fits[trial.trial_id] = {"rejected": str(e), **_footprint_record(e.footprint)}
            raise
        histories = histories if isinstance(histories, list) else [histories]
        fitted = [h for h in histories if hasattr(h, "fit_mode")]
        self._trial_fits[trial.trial_id] = {
            "epochs": sum(h.epochs_run for h in fitted),
            "best_epoch": max((h.best_epoch for h in fitted), default=None),
            "scores": fitted[-1].best_scores if fitted else {},
            "fit_mode": fitted[0].fit_mode if fitted else "",
            "train_seconds": round(sum(h.train_seconds for h in fitted), 2),
            "breakdown": _sum_breakdowns([h.seconds for h in fitted]),
            **(_footprint_record(fitted[0].footprint) if fitted else {}),
        }
        return histories

    def on_trial_begin(self, trial):
        super().on_trial_begin(trial)
        self._gradients_before_trial = shims.custom_gradient_keys()
        self._trial_started[trial.trial_id] = time.time()
        if self.heartbeat_s:
            self._heartbeat = TrialHeartbeat(self.oracle, trial.trial_id, self.heartbeat_s)

    def on_trial_end(self, trial):
        seconds = time.time() - self._trial_started.pop(trial.trial_id, time.time())
        fits = {"epochs": 0, "fit_mode": "", **self._trial_fits.pop(trial.trial_id, {})}
        if "breakdown" in fits:
            accounted = sum(fits["breakdown"].values())
            fits["breakdown"]["other"] = round(max(0.0, seconds - accounted), 3)
        record = {
            "trial_id": trial.trial_id,
            "worker": self.worker,
            "seconds": round(seconds, 2),
            **fits,
            "error": leaderboard.last_line(trial.message or ""),
        }
        # KerasTuner writes a trial's HParams session into <log_dir>/<trial_id>/execution0.
        write_trial_scalars(self.run_dir / "tensorboard" / trial.trial_id / "execution0", record)
        atomic.write_json(self.run_dir / "trials" / f"{trial.trial_id}.json", record)
        if trial.status != "COMPLETED" and trial.message and not fits.get("rejected"):
            self.log(trial.message.rstrip())  # the traceback of a failed trial
        try:
            super().on_trial_end(trial)  # the oracle records the result (may raise on too many failures)
        finally:
            if self._heartbeat is not None:  # beats until the chief has the trial's end
                self._heartbeat.stop()
                self._heartbeat = None
            frame = leaderboard.write(self.run_dir)
            self._print_trial(trial, record, frame)
            shims.forget_custom_gradients(self._gradients_before_trial)
            gc.collect()

    def _print_trial(self, trial, record, frame):
        values = trial.hyperparameters.values
        status = self.oracle.get_trial(trial.trial_id).status if hasattr(self.oracle, "get_trial") else trial.status
        row = frame[frame["trial_id"] == trial.trial_id]
        score = row["score"].iloc[0] if len(row) else None
        best = frame["score"].max() if len(frame) else float("nan")
        best = "-" if best != best else f"{best:.4f}"
        if record.get("rejected"):
            result = record["rejected"]
        elif score is not None and score == score:
            result = f"{self.hypermodel.monitor} {score:.4f}"
        else:
            result = f"{status}: {record['error']}"
        left = ""
        deadline = getattr(self.oracle, "deadline", None)
        if deadline is not None:
            left = f" | budget left {max(0, deadline - time.time()) / 60:.1f} min"
        self.log(
            f"trial {trial.trial_id} [{self.worker}] {values.get('backbone')} {values.get('resolution')}px "
            f"unfrozen={values.get('unfrozen_blocks')} {values.get('pooling')} "
            f"{'linear' if values.get('head') == 'linear' else 'dense=' + str(values.get('dense_units'))} "
            f"dropout={values.get('dropout'):.1f} lr={values.get('learning_rate'):.2e} {values.get('lr_schedule')} "
            f"aug={values.get('augmentation')} epochs={record['epochs']} [{record['fit_mode'] or '-'}] "
            f"→ {result} ({_trial_time(record)}) best {best}{left}"
        )


def _sum_breakdowns(breakdowns):
    total = {}
    for breakdown in breakdowns:
        for key, value in breakdown.items():
            total[key] = round(total.get(key, 0.0) + value, 3)
    return total


def _trial_time(record):
    if record.get("train_seconds") is None:
        return f"{record['seconds']:.0f} s"
    return f"{record['seconds']:.0f} s, {record['train_seconds']:.0f} s training"


def write_trial_scalars(trial_dir, record):
    """The trial's cost, training time and footprint as TensorBoard scalars beside its
    HParams summary, so the HParams dashboard lists them as metric columns."""
    import tensorflow as tf

    values = {"trial/seconds": record.get("seconds"), "trial/train_seconds": record.get("train_seconds"),
              "deployment/latency_ms": record.get("latency_ms"), "deployment/model_mb": record.get("model_mb")}
    values = {k: v for k, v in values.items() if v is not None}
    if not values or not trial_dir.exists():
        return  # no HParams entry to add to (a trial rejected before training has none)
    writer = tf.summary.create_file_writer(str(trial_dir / "trial"))
    with writer.as_default():
        for name, value in values.items():
            tf.summary.scalar(name, value, step=0)
    writer.close()


def _footprint_record(footprint):
    return {"latency_ms": round(footprint.latency_ms, 3), "model_mb": round(footprint.model_mb, 3)}


class HyperbandTransferTuner(TransferTuner, kt.Hyperband):
    """TransferTuner with Hyperband's trial logic: epochs per round, and each round
    continuing from the previous round's best checkpoint."""


def make_tuner(settings, hypermodel, run_dir, worker="local", log=print, deadline=None, distribution_strategy=None):
    """Builds the tuner chosen by `settings.tuner`, resuming any state in `run_dir/tuner`.

    A distributed worker (any `worker` but "local" and "chief") sends heartbeats while
    its trials run (`heartbeat_interval`)."""
    common = dict(
        objective=kt.Objective(hypermodel.monitor, "max"),
        seed=settings.seed + 1,  # KerasTuner takes seed 0 for "no seed" (a random one)
        max_retries_per_trial=0,
        max_consecutive_failed_trials=None,  # counted by the oracle mixin instead
    )
    if settings.tuner == "hyperband":
        oracle = HyperbandOracle(
            max_epochs=settings.max_epochs, factor=settings.factor,
            hyperband_iterations=settings.hyperband_iterations, **common,
        )
    elif settings.tuner == "random":
        oracle = RandomSearchOracle(max_trials=settings.max_trials, **common)
    elif settings.tuner == "bayesian":
        oracle = BayesianOptimizationOracle(max_trials=settings.max_trials, **common)
    else:
        raise ValueError(f"tuner {settings.tuner!r} is not one of {TUNERS}")
    oracle.max_epochs_per_trial = settings.max_epochs
    oracle.max_failures = settings.max_consecutive_failures
    oracle.verbose = settings.verbose  # KerasTuner sets it in `search` too, but not on a worker
    oracle.log = log
    tuner_class = HyperbandTransferTuner if settings.tuner == "hyperband" else TransferTuner
    heartbeat_s = None if worker in ("local", "chief") else heartbeat_interval(settings)
    tuner = tuner_class(
        oracle, hypermodel, run_dir, worker=worker, log=log, heartbeat_s=heartbeat_s,
        distribution_strategy=distribution_strategy,
    )
    # Set after construction: reloading oracle state would otherwise not see it.
    tuner.oracle.deadline = deadline
    tuner.oracle.stopped_by_budget = False
    if worker not in ("local", "chief"):
        tuner.oracle = ReconnectingOracleClient(tuner.oracle, CHIEF_PATIENCE_S)
    return tuner


def distribution_strategy(name):
    """None, or the `tf.distribute` strategy each trial trains under."""
    if name in (None, "none"):
        return None
    import tensorflow as tf

    if name in ("mirrored", "auto"):
        if name == "auto" and len(tf.config.list_logical_devices("GPU")) < 2:
            return None
        return tf.distribute.MirroredStrategy()
    raise ValueError(f"strategy {name!r} is not one of none, mirrored, auto")


def _fail_silent_trials(oracle, timeout):
    while True:
        time.sleep(min(5.0, timeout / 2))
        oracle.fail_silent_trials(timeout)


def run_search(settings, data, run_dir, feature_cache=None, log=print, worker="local", until=None):
    """Runs (or resumes) the search into `run_dir`.

    Args:
        settings: `tuning.settings.Settings`.
        data: `data_pipeline.splits.TrainingData` (train + validation only).
        run_dir: The prepared run directory.
        feature_cache: Optional `FeatureCache`.
        worker: "local"; in distributed mode "chief" (serves the oracle) or the worker id
            (KERASTUNER_* variables must then be set: see `configure_distributed`).
        until: For a chief whose workers it started itself: `until(serving, lost)` returns
            once they all ended the search, or once `serving()` is false, KerasTuner's chief
            having ended the search, and calls `lost(worker, reason)` for a worker that died
            (`LocalWorkers.wait`). The chief then serves in a daemon thread instead of
            polling every 20 s for workers that are gone.

    Returns:
        A dict: trials, completed, stopped_by_budget, best (best_hparams.json or None).
    """
    atomic.remove_stale_temporaries(run_dir)
    shims.route_keras_tuner_json_writes(atomic.write_text)
    shims.hide_failed_trial_tracebacks()  # printed by the tuner, except for rejections
    deadline = time.time() + settings.time_budget_s if settings.time_budget_s else None
    hypermodel = TransferHyperModel(
        settings.choices, data.num_classes, weights=settings.weights, batch_size=settings.batch_size,
        seed=settings.seed, early_stopping_patience=settings.early_stopping_patience,
        feature_cache=feature_cache, limits=Limits(settings.max_latency_ms, settings.max_model_mb),
        epoch_fraction=settings.epoch_fraction, class_weight=settings.class_weight,
        objective=objective_for(settings.objective, data.y_train, data.num_classes),
    )
    tuner = make_tuner(settings, hypermodel, run_dir, worker=worker, log=log, deadline=deadline,
                       distribution_strategy=distribution_strategy(settings.strategy))
    tensorboard = keras.callbacks.TensorBoard(
        log_dir=str(Path(run_dir) / "tensorboard"), write_graph=False, profile_batch=0
    )
    if worker == "chief" and settings.worker_timeout_s:
        watchdog = threading.Thread(
            target=_fail_silent_trials, args=(tuner.oracle, settings.worker_timeout_s), daemon=True
        )
        watchdog.start()
    # KerasTuner and our tuner collect garbage around every trial; a full collection walks
    # every object TensorFlow and Keras hold (~0.4 s each). Freezing what exists now leaves
    # each collection only the trials' own objects.
    gc.collect()
    gc.freeze()
    if until is None:
        tuner.search(data, callbacks=[tensorboard], verbose=settings.verbose)
    else:
        serving = threading.Thread(target=tuner.search, args=(data,), daemon=True)
        serving.start()
        until(serving.is_alive, tuner.oracle.lose_worker)
    if worker not in ("local", "chief"):
        log(f"worker {worker}: the chief has no trial left for it; its search is over")
    elif worker == "chief":
        _say_what_was_left(tuner.oracle, log)
    frame = leaderboard.write(run_dir)
    stop_reason = getattr(tuner.oracle, "stop_reason", None)  # a worker's oracle is a gRPC client
    if stop_reason:
        raise SearchStopped(f"search stopped: {stop_reason}; their errors are in {Path(run_dir) / 'leaderboard.csv'}")
    best = json.loads((Path(run_dir) / "best_hparams.json").read_text()) if (Path(run_dir) / "best_hparams.json").exists() else None
    return {
        "trials": int(len(frame)),
        "completed": int((frame["status"] == "COMPLETED").sum()),
        "stopped_by_budget": bool(getattr(tuner.oracle, "stopped_by_budget", False)),
        "best": best,
        "leaderboard": frame,
    }


def _say_what_was_left(oracle, log):
    """One line for the trials a dead worker left that no worker ran again (none was left)."""
    left = sorted(t for t in oracle._lost_runs if oracle.trials[t].status not in leaderboard.ENDED)
    if left:
        log(f"trial{'s' * (len(left) > 1)} {', '.join(left)} lost with {'their workers' if len(left) > 1 else 'its worker'} "
            "did not run again (no worker was left): rerun the same command to run "
            f"{'them' if len(left) > 1 else 'it'} first")


def configure_distributed(role, oracle_address, worker_id=None):
    """Sets KerasTuner's distributed-mode variables; returns this process's worker name.

    Args:
        role: "chief" (serves the oracle over gRPC) or "worker" (asks it for trials).
        oracle_address: "HOST:PORT" of the chief.
        worker_id: The worker's name (its `worker` column in the leaderboard).

    The values were checked by the CLI (`tuning.cli.check_distributed`).
    """
    host, _, port = oracle_address.rpartition(":")
    name = "chief" if role == "chief" else worker_id
    os.environ.update(KERASTUNER_TUNER_ID=name, KERASTUNER_ORACLE_IP=host, KERASTUNER_ORACLE_PORT=port)
    return name


def end_distributed():
    """Unsets what `configure_distributed` set (the job goes on alone after its search)."""
    for name in ("KERASTUNER_TUNER_ID", "KERASTUNER_ORACLE_IP", "KERASTUNER_ORACLE_PORT"):
        os.environ.pop(name, None)
