"""What to try: KerasTuner's oracles with a time budget, a failure stop and a watchdog.

What these oracles add to KerasTuner's (how trials run is `tuning/tuner.py`'s):
- a time budget: no trial is handed out that is not expected to finish within it (so it
  also holds for distributed workers);
- a stop after `max_consecutive_failures` failed trials in a row, the last one saved;
- a distributed chief's watchdog: a trial whose worker stopped beating runs again on
  another worker, once; a worker gone idle is no longer waited for.
"""

import time

import keras_tuner as kt
import numpy as np

from common import shims
from hypermodel.footprint import is_rejection
from tuning.leaderboard import ENDED


def _created_on_first_use(name, factory):
    """A property holding `factory()`, created in the instance's __dict__ when first read."""
    return property(lambda self: self.__dict__.setdefault(name, factory()))


class BudgetedOracleMixin:
    """Stops the search (status STOPPED) instead of starting a trial that would overrun.

    A trial's cost is estimated as a fixed cost plus seconds per epoch times the epochs
    it would run (`estimate_trial_seconds`), from the finished trials.
    """

    deadline = None  # time.time() by which the search must be done; set per command.
    max_failures = None  # consecutive FAILED trials after which the search stops.
    stop_reason = None
    log = staticmethod(print)  # where the chief says what became of a lost trial

    def populate_space(self, trial_id):
        if self.stop_reason:
            return {"status": "STOPPED"}
        with shims.proposal_undone(self) as undo:
            response = super().populate_space(trial_id)
            if response["status"] != "RUNNING":
                return response
            estimate = self.estimate_seconds(response["values"])
            if self.deadline is not None and estimate is not None and time.time() + estimate > self.deadline:
                undo()  # as if the trial had never been proposed
                self.stopped_by_budget = True
                return {"status": "STOPPED"}
            return response

    @shims.synchronized
    def create_trial(self, tuner_id):
        now = time.time()
        self._last_contact[tuner_id] = now
        trial = super().create_trial(tuner_id)
        if trial.status == "RUNNING":
            self._started.setdefault(trial.trial_id, now)
            self._last_seen[trial.trial_id] = now
            self._runners.setdefault(trial.trial_id, set()).add(tuner_id)
        elif trial.status == "STOPPED" and shims.running_trials(self):
            # Other workers' trials are still running: this worker waits with them, so
            # that the trial of one that dies has a worker to run it again.
            shims.waiting_workers(self).add(tuner_id)
            trial.status = "IDLE"
        return trial

    @shims.synchronized
    def get_trial(self, trial_id):
        # A worker's heartbeat (`TrialHeartbeat`). A worker taken for dead whose trial ran
        # again elsewhere may still be on it, as may the second runner once the first
        # one's late result ended it: each stays a known worker while some run beats, so
        # that the chief does not end the search under it.
        now = time.time()
        if self._running(trial_id):
            self._last_seen[trial_id] = now
        for tuner_id in self._runners.get(trial_id, ()):
            current = shims.running_trials(self).get(tuner_id)
            if current is None or current.trial_id == trial_id:
                self._last_contact[tuner_id] = now
                shims.waiting_workers(self).add(tuner_id)
        return super().get_trial(trial_id)

    @shims.synchronized
    def update_trial(self, trial_id, metrics, step=0):
        if not self._running(trial_id):
            return self.trials[trial_id]  # the late report of a run given up on (`fail_silent_trials`)
        self._last_seen[trial_id] = time.time()
        return super().update_trial(trial_id, metrics, step=step)

    @shims.synchronized
    def fail_silent_trials(self, timeout):
        """Lets the search go on without dead workers (the chief calls this periodically).

        A running trial whose worker has not reported for `timeout` s (workers report
        through `TrialHeartbeat` while a trial runs) is given back, to run again on the
        next worker that asks; a trial lost a second time ends FAILED. A worker with no
        trial that has not asked for one for `timeout` s is forgotten (KerasTuner's chief
        otherwise waits for every worker it has seen to say goodbye).
        """
        now = time.time()
        for tuner_id, trial in list(shims.running_trials(self).items()):
            last = self._last_seen.setdefault(trial.trial_id, now)  # after a chief restart: from now
            if now - last > timeout:
                self._last_contact[tuner_id] = last
                self._give_back(tuner_id, trial, f"worker {tuner_id} stopped reporting for {now - last:.0f} s")
        for tuner_id in list(shims.waiting_workers(self)):
            idle_since = self._last_contact.setdefault(tuner_id, now)
            if tuner_id not in shims.running_trials(self) and now - idle_since > timeout:
                shims.waiting_workers(self).discard(tuner_id)

    @shims.synchronized
    def lose_worker(self, tuner_id, reason):
        """Gives back the trial of a worker known to be dead (a local worker process that
        was killed) now, instead of after --worker-timeout of silence."""
        trial = shims.running_trials(self).get(tuner_id)
        if trial is not None:
            self._last_contact[tuner_id] = time.time()
            self._give_back(tuner_id, trial, f"worker {tuner_id} {reason}")
        shims.waiting_workers(self).discard(tuner_id)

    def _give_back(self, tuner_id, trial, reason):
        """`trial`'s run on `tuner_id` is lost: it runs again on the next worker that asks,
        or, lost a second time, ends FAILED."""
        losses = self._lost_runs.setdefault(trial.trial_id, [])
        losses.append(reason)
        self._runners.setdefault(trial.trial_id, set()).add(tuner_id)  # known after a chief restart too
        if len(losses) == 1:
            shims.requeue_trial(self, tuner_id)
            self._started.pop(trial.trial_id, None)
            self._last_seen.pop(trial.trial_id, None)
            self.save()
            self.log(f"trial {trial.trial_id}: {reason}; it runs again on the next worker that asks")
        else:
            trial.status = "FAILED"
            trial.message = f"{reason} (its first run was lost too: {losses[0]}): trial abandoned"
            self.end_trial(trial)
            self.log(f"trial {trial.trial_id}: {trial.message}")

    @shims.synchronized  # the stop decision is made before another worker can get a trial
    def end_trial(self, trial):
        if not self._running(trial.trial_id):
            return  # the late end of a run given up on: the trial reran, or runs, elsewhere
        self._last_seen.pop(trial.trial_id, None)
        started = self._started.pop(trial.trial_id, None)
        if started is not None and trial.status == "COMPLETED":
            values = trial.hyperparameters.values
            self._trial_costs.append([_cost_key(values), max(1, _epochs_to_run(values, self)), time.time() - started])
        super().end_trial(trial)
        self._stop_after_consecutive_failures()

    def _running(self, trial_id):
        return any(t.trial_id == trial_id for t in shims.running_trials(self).values())

    def _stop_after_consecutive_failures(self):
        # Counted here rather than by KerasTuner (built with max_consecutive_failed_trials
        # None), which raises in the middle of `end_trial`: that leaves the trial unsaved
        # and, on a distributed chief, still "ongoing", so the chief never exits. Here the
        # trial is saved first, then no more trials are handed out.
        if not self.max_failures:
            return
        run = 0
        for trial_id in shims.ended_trial_ids(self):
            trial = self.trials[trial_id]
            if is_rejection(trial.message):
                continue  # over a deployment limit: not a failure, and not a success either
            run = run + 1 if trial.status == "FAILED" else 0
        if run >= self.max_failures:
            self.stop_reason = f"{run} trials in a row failed"

    def estimate_seconds(self, values):
        if not self._trial_costs:
            return None
        return estimate_trial_seconds(self._trial_costs, _cost_key(values), _epochs_to_run(values, self))

    # State created on first use: KerasTuner builds the oracles, so the mixin has no __init__.
    _started = _created_on_first_use("_trial_started", dict)
    _last_contact = _created_on_first_use("_tuner_last_contact", dict)
    _last_seen = _created_on_first_use("_trial_last_seen", dict)
    _runners = _created_on_first_use("_trial_runners", dict)  # {trial_id: every worker given it}
    _lost_runs = _created_on_first_use("_lost_runs_", dict)  # {trial_id: why each lost run was lost}
    _trial_costs = _created_on_first_use("_trial_costs_", list)  # [cost key, epochs, seconds] per trial

    def get_state(self):
        state = super().get_state()
        state["trial_costs"] = list(self._trial_costs)
        state["lost_runs"] = {k: list(v) for k, v in self._lost_runs.items()}
        return state

    def reload(self):
        super().reload()
        # KerasTuner writes a new trial's trial.json, then oracle.json: a chief killed in
        # between leaves a trial the saved search never started (no worker is given it
        # again, yet it counts towards max_trials). It is forgotten, as if never proposed:
        # the saved random state proposes it again.
        started = set(shims.started_trial_ids(self))
        for trial_id in [t for t in self.trials if t not in started]:
            del self.trials[trial_id]

    def set_state(self, state):
        super().set_state(state)
        # KerasTuner saves oracle.json in `end_trial` before it takes the trial off the
        # running ones: after a kill there, a resumed chief would hand the ended trial to
        # its worker again.
        running = shims.running_trials(self)
        for tuner_id in [w for w, trial in running.items() if trial.status in ENDED]:
            del running[tuner_id]
        self.__dict__["_trial_costs_"] = [list(x) for x in state.get("trial_costs", [])]
        self.__dict__["_lost_runs_"] = {k: list(v) for k, v in state.get("lost_runs", {}).items()}


def estimate_trial_seconds(costs, key, epochs):
    """Expected seconds of a trial that runs `epochs` epochs of architecture `key`.

    Every trial pays a fixed cost (building, tracing, one-time features) and then about
    the same seconds per epoch as others of its backbone, resolution and unfrozen blocks
    (a 17-block top's rounds cost more than a 10-block one's); with short
    Hyperband rounds the fixed cost dominates, so seconds / epochs of a one-epoch trial
    would overrate a nine-epoch one several times over. The fixed cost is the intercept
    of a least-squares line through all finished trials (0 until two lengths are seen);
    the rate per epoch is the median, over the trials of `key` (else all), of what each
    took beyond that cost.

    Args:
        costs: [key, epochs run, seconds] of each finished trial.
    """
    lengths = np.array([c[1] for c in costs], dtype=float)
    seconds = np.array([c[2] for c in costs], dtype=float)
    fixed = 0.0
    if len(set(lengths)) > 1:
        slope, intercept = np.polyfit(lengths, seconds, 1)
        fixed = float(np.clip(intercept, 0.0, seconds.min())) if slope > 0 else 0.0
    same = [i for i, c in enumerate(costs) if c[0] == key] or range(len(costs))
    rate = float(np.median([(seconds[i] - fixed) / lengths[i] for i in same]))
    return fixed + max(rate, 0.0) * epochs


def _cost_key(values):
    return f"{values.get('backbone')}@{values.get('resolution')}/{values.get('unfrozen_blocks')}"


def _epochs_to_run(values, oracle):
    if "tuner/epochs" in values:
        return values["tuner/epochs"] - values.get("tuner/initial_epoch", 0)
    return getattr(oracle, "max_epochs_per_trial", 1)


class HyperbandOracle(BudgetedOracleMixin, kt.oracles.HyperbandOracle):
    pass


class RandomSearchOracle(BudgetedOracleMixin, kt.oracles.RandomSearchOracle):
    pass


class BayesianOptimizationOracle(BudgetedOracleMixin, kt.oracles.BayesianOptimizationOracle):
    pass
