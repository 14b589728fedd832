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

SEARCH = ("search", "--profile", "smoke", "--tuner", "random", "--train-subset", "300", "--val-subset", "100",
          "--resolutions", "32", "--unfrozen-blocks", "0,1", "--time-budget", "0")


def launch(run_dir, port, max_trials, workers, worker_timeout="10m"):
    common = (*SEARCH, "--run-dir", run_dir, "--max-trials", max_trials, "--oracle", f"127.0.0.1:{port}",
              "--worker-timeout", worker_timeout)
    chief = start_cli(*common, "--distributed", "chief")
    time.sleep(2)
    return chief, {w: start_cli(*common, "--distributed", "worker", "--worker-id", w) for w in workers}


def finish(process, timeout=900):
    try:
        out, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, _ = process.communicate()
        pytest.fail(f"process did not finish:\n{out[-3000:]}")
    return process.returncode, out


def oracle_trials(run_dir):
    trials = {}
    for path in (run_dir / "tuner").glob("trial_*/trial.json"):
        trial = json.loads(path.read_text())
        trials[trial["trial_id"]] = trial
    return trials


def test_one_chief_two_workers_complete_one_search(tmp_path):
    run_dir = tmp_path / "run"
    chief, workers = launch(run_dir, free_port(), max_trials=6, workers=("w1", "w2"))
    results = {name: finish(p) for name, p in workers.items()}
    results["chief"] = finish(chief)
    for name, (code, out) in results.items():
        assert code == 0, f"{name}:\n{out[-3000:]}"
    board = pd.read_csv(run_dir / "leaderboard.csv", dtype={"trial_id": str})
    assert len(board) == 6 and board["trial_id"].is_unique
    assert set(board["worker"]) == {"w1", "w2"}
    trials = oracle_trials(run_dir)
    assert set(trials) == set(board["trial_id"])
    for row in board.itertuples():
        assert row.status == trials[row.trial_id]["status"] == "COMPLETED"
        assert row.val_accuracy == pytest.approx(trials[row.trial_id]["score"])
    best = json.loads((run_dir / "best_hparams.json").read_text())
    assert best["val_accuracy"] == pytest.approx(board["val_accuracy"].max())


def test_a_killed_worker_does_not_stall_the_search(tmp_path):
    run_dir = tmp_path / "run"
    chief, workers = launch(run_dir, free_port(), max_trials=6, workers=("w1", "w2"), worker_timeout="20s")

    def w1_mid_trial():
        """w1 has finished a trial and is now inside another one."""
        records = {p.stem: json.loads(p.read_text()) for p in (run_dir / "trials").glob("*.json")}
        ongoing = json.loads((run_dir / "tuner" / "oracle.json").read_text())["ongoing_trials"]
        return any(r["worker"] == "w1" for r in records.values()) and ongoing.get("w1") not in (None, *records)

    assert wait_for(w1_mid_trial, timeout=600, interval=0.2), "w1 never started a second trial"
    os.killpg(workers["w1"].pid, signal.SIGKILL)
    killed_trial = json.loads((run_dir / "tuner" / "oracle.json").read_text())["ongoing_trials"]["w1"]
    code, out = finish(workers["w2"])
    assert code == 0, out[-3000:]
    code, out = finish(chief)
    assert code == 0, out[-3000:]
    board = pd.read_csv(run_dir / "leaderboard.csv", dtype={"trial_id": str}).set_index("trial_id")
    assert board.loc[killed_trial, "status"] == "FAILED"
    assert "stopped reporting" in board.loc[killed_trial, "error"]
    assert (board["status"] == "COMPLETED").sum() >= 4
    assert "w2" in set(board["worker"])


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


def test_local_workers_share_one_search_and_the_job_goes_on_alone(tmp_path):
    """`--workers 2`: this process serves the oracle on 127.0.0.1, two worker processes
    it started train the trials, and the command ends with the usual results."""
    run_dir = tmp_path / "run"
    search = start_cli(*SEARCH, "--run-dir", run_dir, "--max-trials", "4", "--workers", "2")
    code, out = finish(search)
    assert code == 0, out[-3000:]
    assert re.search(r"2 local workers \(\d+ threads? each\) ask the oracle at 127\.0\.0\.1:\d+", out), out[-3000:]
    board = pd.read_csv(run_dir / "leaderboard.csv", dtype={"trial_id": str})
    assert len(board) == 4 and (board["status"] == "COMPLETED").all()
    assert set(board["worker"]) == {"local-1", "local-2"}
    assert set(oracle_trials(run_dir)) == set(board["trial_id"])
    best = json.loads((run_dir / "best_hparams.json").read_text())
    assert best["val_accuracy"] == pytest.approx(board["val_accuracy"].max())
    assert "Best val_accuracy So Far" not in out  # KerasTuner's own display stays quiet on workers


def test_local_workers_do_not_go_with_a_distributed_role(tmp_path):
    from cli import assert_user_error, run_cli

    result = run_cli(*SEARCH, "--run-dir", tmp_path / "run", "--workers", "2", "--distributed", "chief")
    assert_user_error(result, "--workers 2", "--distributed chief")
    assert not (tmp_path / "run").exists()
