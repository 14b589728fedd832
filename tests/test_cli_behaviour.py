"""The real CLI: the Bayesian tuner, --overwrite, and the distributed flags' validation.

Every user error is checked the same way: exit code 2, exactly one line on stderr naming
the fault, no traceback, and nothing written into the run dir.
"""

import json
import shutil

import pandas as pd
import pytest

from cli import StillRunning, assert_user_error, free_port, run_cli
from reference import assert_recorded_accuracies_are_the_checkpoints

# A search small enough to cost seconds: 300 training / 100 validation images at 48 px.
SMALL = ("--profile", "smoke", "--train-subset", "300", "--val-subset", "100")


def leaderboard(run_dir):
    return pd.read_csv(run_dir / "leaderboard.csv", dtype={"trial_id": str})


def trial_dirs(run_dir):
    return sorted(p.name for p in (run_dir / "tuner").glob("trial_*"))


def snapshot(folder):
    """Relative path → bytes of every file under `folder` (to prove nothing changed)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def bayesian_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("bayesian") / "run"
    # Shallow fine-tuning only: 10 blocks at the top of the rate range can collapse on 300 images.
    result = run_cli("search", *SMALL, "--tuner", "bayesian", "--max-trials", "2", "--unfrozen-blocks", "0,2",
                     "--run-dir", run_dir)
    return run_dir, result


@pytest.fixture(scope="module")
def finished_run(bayesian_run):
    """A finished 2-trial search (the Bayesian one): the existing run that --overwrite meets."""
    run_dir, result = bayesian_run
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert len(leaderboard(run_dir)) == 2
    return run_dir


def test_bayesian_tuner_runs_its_trials_through_the_cli(bayesian_run):
    run_dir, result = bayesian_run
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert json.loads((run_dir / "config.json").read_text())["settings"]["tuner"] == "bayesian"
    # KerasTuner saved a Bayesian-optimisation oracle (its Gaussian process's alpha and
    # beta), not another tuner's under the name.
    oracle = json.loads((run_dir / "tuner" / "oracle.json").read_text())
    assert {"alpha", "beta"} <= set(oracle)
    board = leaderboard(run_dir)
    assert len(board) == 2 and board["trial_id"].is_unique
    assert list(board["status"]) == ["COMPLETED", "COMPLETED"]
    assert (board["val_accuracy"] > 0.2).all() and (board["val_accuracy"] <= 1).all()  # above chance (0.1)
    assert len(trial_dirs(run_dir)) == 2
    assert_recorded_accuracies_are_the_checkpoints(run_dir, board)


def test_overwrite_starts_a_run_afresh(finished_run, tmp_path):
    run_dir = finished_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    result = run_cli("search", *SMALL, "--tuner", "random", "--max-trials", "1", "--seed", "3",
                     "--overwrite", "--run-dir", copy)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    board = leaderboard(copy)
    assert len(board) == 1 and list(board["status"]) == ["COMPLETED"]  # the 2 old trials are gone
    assert len(trial_dirs(copy)) == 1
    assert len(list((copy / "trials").iterdir())) == 1
    settings = json.loads((copy / "config.json").read_text())["settings"]
    assert settings["tuner"] == "random" and settings["seed"] == 3
    old = set(leaderboard(run_dir)["learning_rate"].round(12))
    assert not set(board["learning_rate"].round(12)) & old


def test_overwrite_refuses_a_folder_that_is_not_a_run(tmp_path):
    folder = tmp_path / "photos"
    (folder / "2024").mkdir(parents=True)
    (folder / "notes.txt").write_text("my notes")
    (folder / "2024" / "beach.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    before = snapshot(folder)
    result = run_cli("search", *SMALL, "--overwrite", "--run-dir", folder)
    assert_user_error(result, str(folder), "not a run of this tool")
    assert snapshot(folder) == before


@pytest.mark.parametrize("flags, named", [
    (("--distributed", "worker"), "--worker-id"),
    (("--distributed", "worker", "--worker-id", "chief-2"), "--worker-id"),
    (("--distributed", "chief", "--oracle", "nonsense"), "--oracle"),
    (("--distributed", "worker", "--worker-id", "w1", "--oracle", "10.0.0.5:port"), "--oracle"),
])
def test_bad_distributed_flags_exit_2_before_any_work(tmp_path, flags, named):
    run_dir = tmp_path / "run"
    result = run_cli("search", *SMALL, "--run-dir", run_dir, *flags, timeout=120)  # a hang fails
    assert_user_error(result, named)
    assert not run_dir.exists()


def test_a_worker_refuses_overwrite_and_leaves_the_shared_run_dir_alone(finished_run, tmp_path):
    """--overwrite on a worker would delete the run dir the chief and the other workers share."""
    shared = tmp_path / "shared"
    shutil.copytree(finished_run, shared)
    before = snapshot(shared)
    try:  # no chief listens on this port: a worker that does not refuse waits for it
        result = run_cli("search", *SMALL, "--tuner", "bayesian", "--max-trials", "2", "--run-dir", shared,
                             "--distributed", "worker", "--worker-id", "w1", "--oracle", f"127.0.0.1:{free_port()}",
                             "--overwrite", timeout=60)
    except StillRunning:
        result = None
    after = snapshot(shared) if shared.is_dir() else {}
    assert after == before, f"the worker changed the shared run dir: {sorted(set(before) ^ set(after))[:10]}"
    assert result is not None, "the worker waited for an oracle instead of refusing --overwrite"
    assert_user_error(result, "--overwrite")


def test_a_latency_limit_below_every_model_rejects_all_trials_untrained(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli("search", *SMALL, "--max-latency-ms", "0.001", "--run-dir", run_dir)
    assert_user_error(result, "every trial")
    assert "rejected by the deployment limits before training" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    board = leaderboard(run_dir)
    assert len(board) >= 2 and set(board["status"]) == {"REJECTED"}
    assert (board["latency_ms"] > 0.001).all() and board["val_accuracy"].isna().all()
    assert board["error"].str.startswith("REJECTED: latency").all()
    # Nothing trained: no epoch ran, no checkpoint or feature cache was written.
    assert (board["epochs"] == 0).all()
    assert not list((run_dir / "tuner").rglob("checkpoint.weights.*")) and not list(run_dir.glob("feature_cache/*"))


def test_a_size_limit_trains_only_the_models_within_it(tmp_path):
    """MobileNetV2 α 0.5 weighs over 2.8 MB in float32 with any smoke head; α 0.35 ~2.2 MB with a
    64–128-unit head (2.85 MB with 256 units)."""
    run_dir = tmp_path / "run"
    result = run_cli("search", *SMALL, "--heads", "mlp", "--max-model-mb", "2.8", "--run-dir", run_dir)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    board = leaderboard(run_dir)
    trained, rejected = board[board["status"] == "COMPLETED"], board[board["status"] == "REJECTED"]
    assert len(trained) and len(rejected), board
    assert set(trained["backbone"]) == {"mobilenet_v2_0.35"} and "mobilenet_v2_0.5" in set(rejected["backbone"])
    assert (trained["model_mb"] <= 2.8).all() and (rejected["model_mb"] > 2.8).all()
    assert (trained["train_s"] > 0).all() and (trained["train_s"] < trained["seconds"]).all()
    assert rejected["error"].str.contains("--max-model-mb 2.8").all()
    assert "rejected by the deployment limits" in result.stdout
