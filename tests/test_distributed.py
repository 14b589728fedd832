"""Distributed search on KerasTuner's chief/worker oracle, and multi-device trials."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from cli import ROOT, free_port, start_cli, wait_for
from reference import assert_recorded_accuracies_are_the_checkpoints

SEARCH = ("search", "--profile", "smoke", "--tuner", "random", "--train-subset", "300", "--val-subset", "100",
          "--resolutions", "32", "--unfrozen-blocks", "0,1", "--time-budget", "0")
# Trials of about 10 s a round on an idle 2-core AVX-512 machine, several times the
# worker timeouts below: a 96 px MobileNetV2 fine-tuned end to end (no feature cache),
# rounds of the smoke profile's 2 000 images.
LONG_TRIALS = ("search", "--profile", "smoke", "--tuner", "random", "--max-trials", "2",
               "--train-subset", "600", "--val-subset", "100", "--resolutions", "96", "--unfrozen-blocks", "17",
               "--backbones", "mobilenet_v2_0.35", "--no-feature-cache", "--time-budget", "0")
TEST_DEADLINE_S = 600  # every process a test starts is ended by then, well before pytest's --timeout
TENSORFLOW_NATIVE_LINES = re.compile(r"oneDNN|cuda|absl|^[IWE]\d{4} |XLA|cpu_feature_guard", re.M)


@pytest.fixture
def processes():
    """Starts CLI processes (`processes.start(*args)`) and kills any still running at the
    end of the test, whatever happened; `processes.finish(p)` waits for one within the
    test's deadline."""

    class Processes:
        def __init__(self):
            self.deadline = time.time() + TEST_DEADLINE_S
            self.started = []

        def start(self, *args):
            process = start_cli(*args)
            self.started.append(process)
            return process

        def finish(self, process):
            try:
                out, _ = process.communicate(timeout=max(1, self.deadline - time.time()))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                out, _ = process.communicate()
                pytest.fail(f"process did not finish within the test's {TEST_DEADLINE_S} s:\n{out[-3000:]}")
            return process.returncode, out

    running = Processes()
    try:
        yield running
    finally:
        for process in running.started:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.communicate()


def launch(processes, run_dir, port, max_trials, workers, worker_timeout="10m"):
    common = (*SEARCH, "--run-dir", run_dir, "--max-trials", max_trials, "--oracle", f"127.0.0.1:{port}",
              "--worker-timeout", worker_timeout)
    chief = processes.start(*common, "--distributed", "chief")
    time.sleep(2)
    return chief, {w: processes.start(*common, "--distributed", "worker", "--worker-id", w) for w in workers}


def oracle_trials(run_dir):
    trials = {}
    for path in (run_dir / "tuner").glob("trial_*/trial.json"):
        trial = json.loads(path.read_text())
        trials[trial["trial_id"]] = trial
    return trials


def test_a_chief_and_two_workers_share_a_search_and_a_killed_workers_trial_runs_again(tmp_path, processes):
    """A chief and two workers on 127.0.0.1; w1 is killed mid-trial: after --worker-timeout
    of silence the chief takes it for lost, the trial runs again on w2, and the search ends
    with every trial completed once."""
    run_dir = tmp_path / "run"
    chief, workers = launch(processes, run_dir, free_port(), max_trials=4, workers=("w1", "w2"), worker_timeout="8s")

    def w1_mid_trial():
        """w1 has finished a trial and is now inside another one."""
        records = {p.stem: json.loads(p.read_text()) for p in (run_dir / "trials").glob("*.json")}
        ongoing = json.loads((run_dir / "tuner" / "oracle.json").read_text())["ongoing_trials"]
        return any(r["worker"] == "w1" for r in records.values()) and ongoing.get("w1") not in (None, *records)

    assert wait_for(w1_mid_trial, timeout=300, interval=0.2), "w1 never started a second trial"
    killed_trial = json.loads((run_dir / "tuner" / "oracle.json").read_text())["ongoing_trials"]["w1"]
    os.killpg(workers["w1"].pid, signal.SIGKILL)
    code, out = processes.finish(workers["w2"])
    assert code == 0, out[-3000:]
    assert "worker w2: the chief has no trial left for it; its search is over" in out
    code, chief_out = processes.finish(chief)
    assert code == 0, chief_out[-3000:]
    assert f"trial {killed_trial}: worker w1 stopped reporting for" in chief_out
    board = pd.read_csv(run_dir / "leaderboard.csv", dtype={"trial_id": str}, keep_default_na=False)
    assert board["trial_id"].is_unique and set(board["worker"]) == {"w1", "w2"}
    assert set(oracle_trials(run_dir)) == set(board["trial_id"])
    assert_recorded_accuracies_are_the_checkpoints(run_dir, board)
    board = board.set_index("trial_id")
    assert len(board) == 4 and (board["status"] == "COMPLETED").all(), board[["status", "worker", "error"]]
    assert board.loc[killed_trial, "worker"] == "w2"
    assert board.loc[killed_trial, "retried"].startswith("worker w1 stopped reporting for")
    assert (board.drop(index=killed_trial)["retried"] == "").all()


def test_local_workers_share_a_search_and_a_killed_chief_resumes_it_keeping_every_ended_trial(tmp_path, processes):
    """`--workers 2`: this process serves the oracle on 127.0.0.1 and two worker processes
    it started train the trials. kill -9 it mid-search: its workers exit, saying why; the
    same command resumes the search, keeping every trial that had ended, and ends with the
    usual results."""
    run_dir = tmp_path / "run"
    command = (*SEARCH, "--run-dir", run_dir, "--max-trials", "4", "--workers", "2")
    first = processes.start(*command)

    def completed_trials():
        return [t for t, trial in oracle_trials(run_dir).items() if trial["status"] == "COMPLETED"]

    def ended_and_in_flight():
        # Ended as the oracle has saved it (the trial's own record is written just before).
        ongoing = json.loads((run_dir / "tuner" / "oracle.json").read_text())["ongoing_trials"]
        ended = completed_trials()
        return ended and set(ongoing.values()) - set(ended)

    assert wait_for(ended_and_in_flight, timeout=300, interval=0.2), "no trial ended while another ran"
    os.kill(first.pid, signal.SIGKILL)  # the chief alone: its workers are left behind
    completed = completed_trials()
    assert completed
    before = {t: (run_dir / "trials" / f"{t}.json").read_text() for t in completed}
    code, out = processes.finish(first)  # returns once the workers, which share its output, exited
    assert code == -signal.SIGKILL
    assert len(re.findall(r"worker local-\d: its chief \(process \d+\) is gone; exiting", out)) == 2, out[-3000:]

    code, out = processes.finish(processes.start(*command))
    assert code == 0, out[-3000:]
    assert re.search(r"2 local workers \(\d+ threads? each\) ask the oracle at 127\.0\.0\.1:\d+", out), out[-3000:]
    assert "Best val_accuracy So Far" not in out  # KerasTuner's own display stays quiet on workers
    # No process (chief or worker) prints TensorFlow's native start-up lines.
    assert not TENSORFLOW_NATIVE_LINES.search(out), TENSORFLOW_NATIVE_LINES.search(out).group(0)
    board = pd.read_csv(run_dir / "leaderboard.csv", dtype={"trial_id": str})
    assert len(board) == 4 and (board["status"] == "COMPLETED").all(), board[["status", "error"]]
    assert set(board["worker"]) == {"local-1", "local-2"} and set(oracle_trials(run_dir)) == set(board["trial_id"])
    assert_recorded_accuracies_are_the_checkpoints(run_dir, board)
    for trial_id, record in before.items():  # kept, not run again
        assert (run_dir / "trials" / f"{trial_id}.json").read_text() == record


def long_trial_search(processes, run_dir, *flags, rounds=2, worker_timeout="5s"):
    """`--workers 2` on trials of `rounds` rounds that each take several times `worker_timeout`."""
    return processes.start(*LONG_TRIALS, "--run-dir", run_dir, "--workers", "2", "--max-epochs", str(rounds),
                           "--worker-timeout", worker_timeout, *flags)


def finished_board(processes, search, run_dir):
    code, out = processes.finish(search)
    board = pd.read_csv(run_dir / "leaderboard.csv", dtype={"trial_id": str}, keep_default_na=False)
    return code, out, board.set_index("trial_id")


def test_heartbeats_keep_long_trials_and_a_killed_local_workers_trial_runs_again_at_once(tmp_path, processes):
    """Trials several times --worker-timeout long are kept alive by their heartbeats; a local
    worker killed mid-trial (say, by the kernel's OOM killer) is known dead to the chief that
    started it, so its trial reruns on the other worker at once, not after the timeout's
    silence (that would read "stopped reporting")."""
    import psutil

    run_dir = tmp_path / "run"
    search = long_trial_search(processes, run_dir)
    oracle_file = run_dir / "tuner" / "oracle.json"

    def local_1_trial():
        return oracle_file.exists() and json.loads(oracle_file.read_text())["ongoing_trials"].get("local-1")

    assert wait_for(local_1_trial, timeout=300, interval=0.2), "local-1 never started a trial"
    killed_trial = local_1_trial()
    worker = next(p for p in psutil.Process(search.pid).children(recursive=True)
                  if "tuning.search_worker" in " ".join(p.cmdline()) and "local-1" in p.cmdline())
    worker.kill()
    code, out, board = finished_board(processes, search, run_dir)
    assert code == 0, out[-3000:]
    assert f"trial {killed_trial}: worker local-1 was killed (SIGKILL); it runs again" in out, out[-3000:]
    assert len(board) == 2 and (board["status"] == "COMPLETED").all(), board[["status", "worker", "error"]]
    assert board.loc[killed_trial, "worker"] == "local-2"
    assert board.loc[killed_trial, "retried"].startswith("worker local-1 was killed")
    assert (board.drop(index=killed_trial)["retried"] == "").all() and "stopped reporting" not in out
    assert (board["seconds"] > 2 * 5).all(), board["seconds"]  # each trial outlasted the timeout twice


def test_without_heartbeats_trials_longer_than_the_worker_timeout_are_lost(tmp_path, processes):
    run_dir = tmp_path / "run"
    # One round a trial (about 10 s idle) is enough to outlast a 3 s timeout.
    search = long_trial_search(processes, run_dir, "--heartbeat", "0", rounds=1, worker_timeout="3s")
    code, out, board = finished_board(processes, search, run_dir)
    assert len(board) == 2, board[["status", "error"]]
    # Every trial's first run is taken for lost and runs again. Whether the rerun is lost
    # too, or a late result of either run ends the trial first (the first result wins),
    # depends on when the runs report; no trial is left running either way.
    for row in board.itertuples():
        assert re.fullmatch(r"worker local-\d stopped reporting for \d+ s", row.retried), row.retried
        assert row.status in ("COMPLETED", "FAILED"), row
        if row.status == "FAILED":
            assert re.search(r"worker local-\d stopped reporting for \d+ s \(its first run was lost too", row.error)
    assert code == (0 if (board["status"] == "COMPLETED").any() else 2), out[-3000:]


MIRRORED = """
import sys, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from data_pipeline import load_dataset
from data_pipeline.feature_cache import FeatureCache
from hypermodel.space import SearchChoices
from tuning.jobs import search_data
from tuning.run_dir import prepare_run_dir
from tuning.settings import Settings
from tuning.tuner import distribution_strategy, run_search
assert distribution_strategy("mirrored").num_replicas_in_sync == 2
dataset = load_dataset()
settings = Settings(profile="smoke", run_dir=sys.argv[1], tuner="random", max_trials=2, max_epochs=1,
                       train_subset=200, val_subset=100, batch_size=50, strategy="mirrored",
                       choices=SearchChoices(backbones=("mobilenet_v2_0.35",), resolutions=(32,),
                                             unfrozen_blocks=(1,)))
result = run_search(settings, search_data(dataset, settings), prepare_run_dir(settings, dataset),
                    feature_cache=FeatureCache(None), log=print)
board = result["leaderboard"]
assert list(board["status"]) == ["COMPLETED"] * 2, board.to_dict("records")
assert (board["fit_mode"] == "end-to-end: multi-device strategy").all(), board["fit_mode"]
print("MIRRORED OK")
"""


def test_a_trial_trains_under_mirrored_strategy_on_two_logical_cpus(tmp_path):
    result = subprocess.run([sys.executable, "-c", MIRRORED, str(tmp_path)], cwd=ROOT, capture_output=True,
                            text=True, timeout=600, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "MIRRORED OK" in result.stdout


def test_local_workers_do_not_go_with_a_distributed_role(tmp_path):
    from cli import assert_user_error, run_cli

    result = run_cli(*SEARCH, "--run-dir", tmp_path / "run", "--workers", "2", "--distributed", "chief")
    assert_user_error(result, "--workers 2", "--distributed chief")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("gpus, count, explicit, expected", [
    ([], 2, False, (2, None)),  # CPU only: the cores are shared
    (["0"], 2, False, (1, ["0"])),  # one GPU: one worker on it
    (["0", "1", "2"], 2, False, (2, ["0", "1"])),
    (["0", "1"], 4, False, (2, ["0", "1"])),  # the profile's count: at most one per GPU
    (["2", "5"], 2, True, (2, ["2", "5"])),  # the ids CUDA_VISIBLE_DEVICES made visible
    (["0", "1"], 3, True, (3, ["0", "1", "0"])),  # --workers 3 given: two share GPU 0
])
def test_each_local_worker_gets_a_gpu_of_its_own(gpus, count, explicit, expected):
    from tuning.local_workers import assign_gpus

    workers, devices, note = assign_gpus(gpus, count, explicit)
    assert (workers, devices) == expected
    if not gpus:
        assert note is None
    elif workers > len(gpus):
        assert "share" in note and "run out of" in note and f"--workers {len(gpus)}" in note
    elif len(gpus) == 1:
        assert note.startswith("1 GPU visible: 1 local worker")
    else:
        assert "one per local worker" in note


def test_visible_gpus_follow_cuda_visible_devices():
    from tuning.local_workers import visible_gpus

    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "3,1"}) == ["3", "1"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "-1"}) == []
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "0,-1,1"}) == ["0"]  # CUDA stops at an invalid id
