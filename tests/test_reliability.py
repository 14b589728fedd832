"""Reliability: kill -9 and resume, atomic writers, corrupt caches, loopback services, seeds."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pandas as pd
import pytest

from cli import ROOT, free_port, run_cli, start_cli, wait_for
from common import atomic
from data_pipeline.feature_cache import FeatureCache
from hypermodel.backbones import get_backbone
from hypermodel.model import PREFIX_NAME, build_transfer_model
from hypermodel.space import SearchChoices, TrialConfig
from reference import assert_recorded_accuracies_are_the_checkpoints


def leaderboard(run_dir):
    path = run_dir / "leaderboard.csv"
    return pd.read_csv(path, dtype={"trial_id": str}) if path.exists() else pd.DataFrame()


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    """A smoke search SIGKILLed after two trials, then rerun to the end (also the run the
    TensorBoard test serves). Its trials train on 600 images, validated on 200: the smoke
    profile's Hyperband all the same, in less time."""
    run_dir = tmp_path_factory.mktemp("killed") / "run"
    command = ("search", "--profile", "smoke", "--train-subset", "600", "--val-subset", "200", "--run-dir", run_dir,
               "--time-budget", "0")
    process = start_cli(*command)
    try:
        assert wait_for(lambda: len(leaderboard(run_dir)) >= 2, timeout=400), "no two trials finished"
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    before = leaderboard(run_dir)
    return run_dir, before, run_cli(*command)


def test_sigkill_mid_search_then_rerun_finishes_keeping_finished_trials(killed_and_resumed):
    run_dir, before, result = killed_and_resumed
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    after = leaderboard(run_dir)
    assert after["trial_id"].is_unique
    assert set(after["status"]) == {"COMPLETED"} and after["val_accuracy"].between(0, 1).all()
    # Hyperband(max_epochs=2, factor=2) runs 5 trials, killed or not.
    assert len(after) == 5
    kept = after.set_index("trial_id").loc[before["trial_id"]]
    assert np.allclose(kept["val_accuracy"], before["val_accuracy"].to_numpy())
    assert np.allclose(kept["seconds"], before["seconds"].to_numpy())
    # The kept trials' checkpoints survived the kill: re-evaluated here, they score what
    # the leaderboard recorded, and best_hparams.json names the best of them.
    assert_recorded_accuracies_are_the_checkpoints(run_dir, after)


WRITER = """
import sys
from common import atomic
payload = sys.argv[2].encode() * 8_000_000
print("writing", flush=True)
while True:
    atomic.write_bytes(sys.argv[1], payload)
"""


def test_a_writer_killed_mid_write_leaves_the_old_complete_file(tmp_path):
    target = tmp_path / "data.bin"
    atomic.write_bytes(target, b"old" * 8_000_000)
    process = subprocess.Popen([sys.executable, "-c", WRITER, str(target), "new"], cwd=ROOT,
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "writing"
    time.sleep(0.7)
    process.kill()
    process.wait()
    content = target.read_bytes()
    assert content in (b"old" * 8_000_000, b"new" * 8_000_000)
    atomic.remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.bin"]


def test_a_failing_writer_changes_nothing(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"
    atomic.write_json(target, {"test_accuracy": 0.9})

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        atomic.write_json(target, {"test_accuracy": 0.1})
    assert json.loads(target.read_text()) == {"test_accuracy": 0.9}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_a_failing_directory_writer_keeps_the_old_directory(tmp_path):
    export = tmp_path / "export"
    with atomic.directory(export) as tmp:
        (tmp / "saved_model.pb").write_text("v1")
    with pytest.raises(RuntimeError):
        with atomic.directory(export) as tmp:
            (tmp / "saved_model.pb").write_text("half")
            raise RuntimeError("killed mid-export")
    assert (export / "saved_model.pb").read_text() == "v1"
    assert [p.name for p in tmp_path.iterdir()] == ["export"]


def test_a_corrupt_cache_file_is_detected_and_rebuilt(tmp_path):
    from data_pipeline import load_dataset

    images = load_dataset().x_train[:64]
    config = TrialConfig("mobilenet_v2_0.35", 32, 0, "avg", 64, 0.0, 1e-3, "constant", 0, "adam", "none")
    prefix = build_transfer_model(config, 10).get_layer(PREFIX_NAME)
    preprocess_input = get_backbone(config.backbone).preprocess_input
    messages = []

    def features(cache):
        return cache.features(prefix, images, source=config.backbone, resolution=config.resolution,
                              preprocess_input=preprocess_input, data_key="slice/train")

    first = features(FeatureCache(tmp_path, log=messages.append))
    (path,) = tmp_path.glob("*.npy")
    path.write_bytes(path.read_bytes()[:-100])  # truncated, as by a crash mid-copy
    cache = FeatureCache(tmp_path, log=messages.append)
    again = features(cache)
    assert cache.builds == 1 and any("unusable" in m for m in messages)
    np.testing.assert_array_equal(first, again)
    # Same size, flipped bytes: caught by the sha256.
    raw = bytearray(path.read_bytes())
    raw[-10:] = bytes(b ^ 0xFF for b in raw[-10:])
    path.write_bytes(bytes(raw))
    cache = FeatureCache(tmp_path, log=messages.append)
    features(cache)
    assert cache.builds == 1


def hparams_api(port, route, body):
    """POSTs a JSON request to TensorBoard's HParams plugin (what its dashboard does)."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/data/plugin/hparams/{route}", data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"}, method="POST",
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read())


def listening_sockets(pid):
    """(ip, port) of every listening TCP socket of a process and its children."""
    import psutil

    process = psutil.Process(pid)
    return {
        (c.laddr.ip, c.laddr.port)
        for p in (process, *process.children(recursive=True))
        for c in p.net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN
    }


def test_tensorboard_serves_the_searched_hparams_on_loopback_only(killed_and_resumed):
    run_dir, _, searched = killed_and_resumed
    assert searched.returncode == 0, searched.stderr[-2000:]
    trials = leaderboard(run_dir)
    port = free_port()
    process = start_cli("tensorboard", "--run-dir", run_dir, "--port", port)
    try:
        def experiment():
            try:
                answer = hparams_api(port, "experiment", {"experimentName": ""})
            except OSError:
                return None
            return answer if answer.get("hparamInfos") else None  # empty until the logs are loaded

        assert wait_for(lambda: experiment() is not None, timeout=90), "no HParams experiment on 127.0.0.1"
        infos = {info["name"]: info for info in experiment()["hparamInfos"]}
        assert {"backbone", "resolution", "unfrozen_blocks", "dense_units", "dropout", "learning_rate",
                "lr_schedule"} <= set(infos)
        assert set(infos["backbone"]["domainDiscrete"]) <= {"mobilenet_v2_0.35", "mobilenet_v2_0.5"}
        assert set(infos["backbone"]["domainDiscrete"]) == set(trials["backbone"])
        # One session group per trial, carrying that trial's hyperparameters.
        groups = hparams_api(port, "session_groups", {
            "experimentName": "", "startIndex": 0, "sliceSize": 100, "colParams": [],
            "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"],
        })["sessionGroups"]
        shown = {g["name"]: g["hparams"] for g in groups}
        assert set(shown) == set(trials["trial_id"])
        for row in trials.itertuples():
            assert shown[row.trial_id]["backbone"] == row.backbone
            assert shown[row.trial_id]["learning_rate"] == pytest.approx(row.learning_rate)
        # Each trial's cost, training time and footprint are metric columns beside its accuracy.
        metrics = {(m["name"]["group"], m["name"]["tag"]): m["value"] for g in groups if g["name"] == trials["trial_id"][0]
                   for m in g["metricValues"]}
        first = trials.iloc[0]
        assert metrics[("trial", "trial/seconds")] == pytest.approx(first["seconds"], rel=1e-3)
        assert metrics[("trial", "trial/train_seconds")] == pytest.approx(first["train_s"], rel=1e-3)
        assert metrics[("trial", "deployment/latency_ms")] == pytest.approx(first["latency_ms"], rel=1e-3)
        assert metrics[("trial", "deployment/model_mb")] == pytest.approx(first["model_mb"], rel=1e-3)
        assert 0 < first["train_s"] < first["seconds"]
        # Listening on the loopback interface only, not on 0.0.0.0 / every interface.
        sockets = listening_sockets(process.pid)
        assert ("127.0.0.1", port) in sockets, sockets
        assert all(ip in ("127.0.0.1", "::1") for ip, _ in sockets), sockets
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def test_same_seed_proposes_the_same_trials(tmp_path):
    from data_pipeline import load_dataset
    from tuning.jobs import search_data
    from tuning.run_dir import prepare_run_dir
    from tuning.settings import Settings
    from tuning.tuner import run_search

    dataset = load_dataset()
    boards = []
    for name in ("a", "b"):
        settings = Settings(
            profile="smoke", run_dir=str(tmp_path / name), tuner="random", max_trials=3, max_epochs=1,
            train_subset=200, val_subset=100, batch_size=50, seed=0,  # 0 is KerasTuner's 'random'
            choices=SearchChoices(backbones=("mobilenet_v2_0.35", "mobilenet_v2_0.5"), resolutions=(32,),
                                  unfrozen_blocks=(0,)),
        )
        run_dir = prepare_run_dir(settings, dataset)
        boards.append(run_search(settings, search_data(dataset, settings), run_dir,
                                 feature_cache=FeatureCache(None), log=lambda m: None)["leaderboard"])
    columns = ["trial_id", "backbone", "dense_units", "dropout", "learning_rate", "lr_schedule", "optimizer"]
    pd.testing.assert_frame_equal(boards[0][columns], boards[1][columns])
