"""The HyperModel and the search: real smoke searches on a slice of Fashion-MNIST."""

import glob
import json
import re
import time

import pandas as pd
import pytest
import tensorflow as tf

from cli import run_cli
from conftest import SMOKE_TEST_IMAGES, SMOKE_TRAIN_IMAGES, fashion_slice
from data_pipeline import load_dataset
from common.errors import DataError
from hypermodel.space import SearchChoices
from reference import assert_recorded_accuracies_are_the_checkpoints
from tuning.leaderboard import COLUMNS
from tuning.jobs import search_data
from tuning.settings import Settings
from tuning.tuner import run_search


def hparams_trials(tensorboard_dir):
    """Trial ids whose event files carry HParams plugin data."""
    trials = set()
    for path in glob.glob(f"{tensorboard_dir}/*/execution0/events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(path):
            if any(v.metadata.plugin_data.plugin_name == "hparams" for v in event.summary.value):
                trials.add(path.split("/")[-3])
    return trials


@pytest.fixture(scope="module")
def smoke_run(smoke_job):
    """A smoke search stopped by a 1 s budget after its first trial, then resumed to its
    end by the whole job (tests/conftest.py)."""
    return smoke_job.run_dir, smoke_job.search, smoke_job.first_board, smoke_job.job


def test_time_budget_stops_cleanly_and_resume_continues(smoke_run):
    run_dir, first, first_board, second = smoke_run
    assert first.returncode == 0, first.stderr
    # No estimate exists before the first trial, so exactly one trial runs, then the
    # oracle refuses a trial that cannot finish within the budget.
    assert list(first_board["trial_id"]) == ["0000"]
    assert "time budget reached" in first.stdout
    assert second.returncode == 0, second.stderr
    assert "Reloading Tuner" in second.stdout
    board = pd.read_csv(run_dir / "leaderboard.csv", dtype={"trial_id": str})
    assert board["trial_id"].is_unique
    assert len(board) >= 4
    # The first trial was kept, not redone.
    kept = board[board["trial_id"] == "0000"].iloc[0]
    assert kept["val_accuracy"] == pytest.approx(first_board.iloc[0]["val_accuracy"])
    assert kept["seconds"] == pytest.approx(first_board.iloc[0]["seconds"])


def test_run_dir_contract(smoke_run):
    run_dir, _, _, second = smoke_run
    config = json.loads((run_dir / "config.json").read_text())
    assert config["settings"]["profile"] == "smoke"
    # The data as read: a slice of Fashion-MNIST, so not the official files (the vendored
    # ones are verified in tests/test_data.py).
    assert config["data"]["checksum_status"] == "computed"
    assert (config["data"]["train"], config["data"]["test"]) == (SMOKE_TRAIN_IMAGES, SMOKE_TEST_IMAGES)
    assert {"tensorflow", "keras", "keras_tuner"} <= set(config["versions"])
    assert (run_dir / "tuner" / "oracle.json").is_file()

    board = pd.read_csv(run_dir / "leaderboard.csv", dtype={"trial_id": str})
    assert list(board.columns[: len(COLUMNS)]) == COLUMNS
    assert set(board["status"]) == {"COMPLETED"}
    assert set(board["worker"]) == {"local"}
    assert board["val_accuracy"].between(0, 1).all()
    # A real search: at least three hyperparameters take several values.
    varied = [c for c in ("backbone", "unfrozen_blocks", "dense_units", "dropout", "learning_rate", "lr_schedule")
              if board[c].nunique() > 1]
    assert len(varied) >= 3, varied

    # Every recorded accuracy, and the best trial, agree with the saved checkpoints
    # re-evaluated here on the validation split.
    assert_recorded_accuracies_are_the_checkpoints(run_dir, board)
    best = json.loads((run_dir / "best_hparams.json").read_text())
    assert best["hyperparameters"]["backbone"] in ("mobilenet_v2_0.35", "mobilenet_v2_0.5")

    # TensorBoard: one log dir per trial, each with HParams plugin data.
    assert hparams_trials(run_dir / "tensorboard") == set(board["trial_id"])

    # Console: where to look, one line per trial, and the top 5.
    assert "tensorboard --logdir" in second.stdout
    assert second.stdout.count("trial 0") >= len(board) - 1
    assert "Top 5:" in second.stdout


def test_changed_settings_refuse_to_resume(smoke_job, tmp_path):
    run_dir = smoke_job.run_dir
    before = sorted(p.name for p in run_dir.iterdir())
    result = run_cli("search", "--profile", "smoke", "--data", smoke_job.data, "--unfrozen-blocks", "2,5",
                     "--run-dir", run_dir, "--resolutions", "64")
    assert result.returncode == 2
    assert "different settings (choices)" in result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in run_dir.iterdir()) == before


def test_named_backbone_without_weights_exits_2_naming_the_file(tmp_path):
    # An empty Keras cache and --offline: the same outcome with or without a network.
    result = run_cli("search", "--profile", "smoke", "--backbones", "resnet50", "--offline",
                     "--run-dir", tmp_path / "r", env={"KERAS_HOME": str(tmp_path / "keras")})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len([l for l in lines if l.startswith("error:")]) == 1
    assert "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5" in lines[-1]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "r").exists()


@pytest.fixture
def empty_keras_home(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))


def test_default_list_drops_backbones_without_weights(tmp_path, empty_keras_home, capsys):
    from tuning.jobs import with_available_backbones

    choices = SearchChoices(backbones=("mobilenet_v2_0.5", "vgg16", "mobilenet_v2_0.35"))
    settings, dropped = with_available_backbones(small_settings(tmp_path, offline=True, choices=choices), False)
    assert settings.choices.backbones == ("mobilenet_v2_0.5", "mobilenet_v2_0.35")
    assert list(dropped) == ["vgg16"] and "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5" in dropped["vgg16"]
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "left out of the search: vgg16" in out[0]
    with pytest.raises(DataError, match="no ImageNet weights"):
        with_available_backbones(small_settings(tmp_path, offline=True, choices=SearchChoices(backbones=("vgg16",))),
                                 False)


def test_offline_gpu_profile_falls_back_to_the_shipped_weights(tmp_path, empty_keras_home, capsys):
    from tuning.cli import parse, resolve_settings
    from tuning.jobs import with_available_backbones

    from data_pipeline import load_dataset
    from tuning.jobs import decided

    settings = resolve_settings(parse(["--profile", "gpu", "--offline", "--run-dir", str(tmp_path / "r")]).options)
    settings, _ = decided(settings, load_dataset(None), log=lambda _: None)  # as `search` does first
    settings, dropped = with_available_backbones(settings, explicit=False)
    assert set(dropped) == {"resnet50", "efficientnet_b0", "mobilenet_v2_1.0"}
    assert settings.choices.backbones == ("mobilenet_v2_0.5", "mobilenet_v2_0.35")
    # A 3×3 final map at 96 px, and a GPU's compute affords 54 000 images at 224 px.
    assert settings.choices.resolutions == (96, 224)
    assert "warning: profile gpu" in capsys.readouterr().out


def small_settings(tmp_path, **overrides):
    base = dict(
        profile="smoke", run_dir=str(tmp_path / "run"), tuner="random", max_trials=2, max_epochs=1,
        train_subset=300, val_subset=100, batch_size=50,
        choices=SearchChoices(backbones=("mobilenet_v2_0.35",), resolutions=(32,), unfrozen_blocks=(0, 1)),
    )
    base.update(overrides)
    return Settings(**base)


def search_in_process(settings):
    from tuning.run_dir import prepare_run_dir

    dataset = load_dataset()
    run_dir = prepare_run_dir(settings, dataset)
    return run_search(settings, search_data(dataset, settings), run_dir, log=lambda m: None), run_dir


def test_random_weights_search_leaves_no_traced_graphs_behind(tmp_path):
    from common.shims import custom_gradient_keys

    before = custom_gradient_keys()
    result, run_dir = search_in_process(small_settings(tmp_path, weights="none", max_trials=2))
    assert result["completed"] == 2
    assert (run_dir / "best_hparams.json").is_file()
    # Each trial's traced train step registers custom gradients that pin its whole graph
    # (tensorflow#80895); the tuner drops them after each trial.
    assert custom_gradient_keys() == before


@pytest.fixture
def nan_above_learning_rate(monkeypatch):
    """Forces a NaN loss in every trial whose learning rate exceeds 1e-2.

    (Adam with a huge learning rate stays finite under Keras's clipped cross-entropy,
    so divergence is injected where the trial compiles its model.)
    """
    import keras

    from hypermodel import training

    original = training.compile_for_training

    def compile_with_nan(model, config, *args, **kwargs):
        original(model, config, *args, **kwargs)
        if config.learning_rate > 1e-2:
            model.compile(optimizer=model.optimizer, loss=lambda y, p: keras.ops.mean(p) * float("nan"),
                          metrics=["accuracy"])

    monkeypatch.setattr(training, "compile_for_training", compile_with_nan)


def test_diverging_trial_is_failed_and_search_goes_on(tmp_path, nan_above_learning_rate):
    choices = SearchChoices(backbones=("mobilenet_v2_0.35",), resolutions=(32,), unfrozen_blocks=(0,),
                            learning_rate=(1e-3, 1e-1), lr_schedules=("constant",))
    result, run_dir = search_in_process(small_settings(tmp_path, max_trials=4, seed=1, choices=choices))
    board = result["leaderboard"]
    failed = board[board["status"] == "FAILED"]
    assert len(failed) >= 1 and (board["status"] == "COMPLETED").sum() >= 1, board[["status", "learning_rate"]]
    assert failed["error"].str.contains("diverged").all()
    assert (failed["learning_rate"] > 1e-2).all()
    assert (board[board["status"] == "COMPLETED"]["learning_rate"] <= 1e-2).all()


def test_consecutive_failures_stop_with_one_line(tmp_path, nan_above_learning_rate):
    from tuning.jobs import search
    from tuning.tuner import SearchStopped

    choices = SearchChoices(backbones=("mobilenet_v2_0.35",), resolutions=(32,), unfrozen_blocks=(0,),
                            learning_rate=(0.1, 1.0))
    settings = small_settings(tmp_path, max_trials=5, choices=choices)
    with pytest.raises(SearchStopped, match="3 trials in a row failed"):
        search(settings)
    board = pd.read_csv(tmp_path / "run" / "leaderboard.csv")
    assert list(board["status"]) == ["FAILED"] * 3


def test_a_search_with_no_completed_trial_ends_in_one_user_error(tmp_path, nan_above_learning_rate):
    from tuning.jobs import NoCompletedTrial, search

    choices = SearchChoices(backbones=("mobilenet_v2_0.35",), resolutions=(32,), unfrozen_blocks=(0,),
                            learning_rate=(0.1, 1.0))
    settings = small_settings(tmp_path, max_trials=2, max_consecutive_failures=5, choices=choices)
    with pytest.raises(NoCompletedTrial, match="completed no trial .*leaderboard.csv") as raised:
        search(settings)
    assert len(str(raised.value).splitlines()) == 1
    assert list(pd.read_csv(tmp_path / "run" / "leaderboard.csv")["status"]) == ["FAILED"] * 2


def test_gpu_profile_runs_on_cpu_with_a_tiny_budget(tmp_path):
    """The gpu profile's whole job (mixed precision, batch 128, a job deadline) on CPU, tiny inputs.

    MobileNetV2 α 0.35 stands in for ResNet50, and a slice of Fashion-MNIST for the whole:
    float16 passes are slow on a CPU, and this checks wiring, not learning.
    """
    data = fashion_slice(tmp_path / "fashion", test_images=1000, train_images=3000)
    run_dir = tmp_path / "run"
    result = run_cli(
        "--profile", "gpu", "--data", data, "--backbones", "mobilenet_v2_0.35", "--weights", "none", "--resolutions", "32",
        "--unfrozen-blocks", "4",
        "--train-subset", "200", "--val-subset", "100", "--retrain-subset", "300", "--tuner", "random",
        "--max-trials", "2", "--max-epochs", "1", "--seed", "2", "--job-time-budget", "60s", "--run-dir", run_dir,
        "--formats", "savedmodel",  # the LiteRT files are tested on the smoke jobs
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    config = json.loads((run_dir / "config.json").read_text())
    assert (config["data"]["train"], config["data"]["test"]) == (3000, 1000)
    settings = config["settings"]
    assert settings["mixed_precision"] is True
    assert settings["batch_size"] == 128 and settings["job_time_budget_s"] == 60
    board = pd.read_csv(run_dir / "leaderboard.csv")
    assert list(board["status"]) == ["COMPLETED", "COMPLETED"]
    assert set(board["backbone"]) == {"mobilenet_v2_0.35"}
    # The phase-2 plan shows its reasoning, from this machine's timing, in the log and timings.json.
    assert re.search(r"phase2 plan, timed on this machine: \d+ steps × \d+ ms \+ validation .* s per epoch; "
                     r"-?\d+ s left → (\d+ epochs|1 epoch, the minimum) before the job's deadline", result.stdout), \
        result.stdout
    plan = json.loads((run_dir / "timings.json").read_text())["retrain_plan"]
    assert plan["steps_per_epoch"] == 3  # 300 retrain images, batch 128
    # 60 s for the whole job, less the reserve for test and export (a minute and the timed
    # inference): no time is left, and phase 2 still gets its one epoch.
    assert plan["finish_reserve_s"] >= 60 and plan["seconds_left"] < 0 and plan["epochs"] == 1
    assert plan["reasoning"] in (run_dir / "report.md").read_text()
    # The longest stage shows progress: a line per epoch with the time left in the job.
    assert re.search(r"phase2 epoch 1/\d+: accuracy \d\.\d+, val_accuracy \d\.\d+ .*min left in the job",
                     result.stdout), result.stdout
    # Only the tool's own lines: no library warnings.
    assert "Warning" not in result.stdout + result.stderr, result.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    # The profile's augmentation, less its flips where the phase-1 model's mirror test says so
    # (a 1-epoch model on random weights is near chance: either verdict can come out).
    expected = "flip_shift_erase" if metrics["flips"]["invariant"] else "shift_erase"
    assert metrics["phase2"]["augmentation"] == expected and 1 <= metrics["phase2"]["epochs"] <= plan["epochs"]
    assert metrics["export"]["passed"] and metrics["export"]["flip_tta"] == metrics["tta"]["used"]


def test_a_long_rounds_cost_is_estimated_from_fixed_cost_plus_its_rate_not_from_one_round_trials():
    """Short Hyperband rounds are mostly fixed cost: a search that read a nine-round trial's
    cost off one-round trials (seconds / rounds) would stop with minutes unused."""
    from tuning.oracle import estimate_trial_seconds

    fixed, rate = {"a": 8.0, "b": 8.0}, {"a": 3.0, "b": 9.0}  # how these made-up trials cost
    runs = [("a", 1), ("a", 1), ("a", 1), ("b", 1), ("b", 1), ("a", 2), ("b", 2), ("a", 6)]
    costs = [[key, n, fixed[key] + rate[key] * n] for key, n in runs]
    costs[0][2] += 13.0  # the first trial of "a" also computed its cached features
    for key in ("a", "b"):
        truth = fixed[key] + rate[key] * 9
        assert estimate_trial_seconds(costs, key, 9) == pytest.approx(truth, rel=0.3), key
    assert estimate_trial_seconds(costs, "a", 9) < 9 * (8 + 3 + 13) / 2  # far below seconds / rounds
    # A new architecture is priced at the rate of all trials; one trial length alone gives no
    # fixed cost, so the estimate is proportional (and pessimistic).
    assert estimate_trial_seconds(costs, "new", 9) > estimate_trial_seconds(costs, "a", 9)
    assert estimate_trial_seconds([["a", 1, 10.0], ["a", 1, 12.0]], "a", 9) == pytest.approx(99.0)


def test_a_worker_that_gets_no_trial_pauses_before_asking_again(tmp_path):
    """KerasTuner asks the oracle again at once after an IDLE answer (a Hyperband round
    waiting for another worker): the tuner paces those asks."""
    from hypermodel.hypermodel import TransferHyperModel
    from hypermodel.space import SearchChoices
    from tuning.settings import Settings
    from tuning.tuner import IDLE_PAUSE_S, make_tuner

    settings = Settings(profile="smoke", run_dir=str(tmp_path))
    tuner = make_tuner(settings, TransferHyperModel(SearchChoices(), 10), tmp_path)
    started = time.monotonic()
    tuner.pre_create_trial()  # the first ask after a trial: at once
    first = time.monotonic() - started
    tuner.pre_create_trial()  # asked again without a trial: paced
    second = time.monotonic() - started - first
    assert first < IDLE_PAUSE_S / 2 and second >= IDLE_PAUSE_S
