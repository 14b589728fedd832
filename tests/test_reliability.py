"""Reliability: kill -9 and resume, atomic writers, corrupt caches, loopback services, seeds."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pandas as pd
import pytest

from cli import ROOT, free_port, run_cli, start_cli, wait_for
from data_pipeline import atomic
from data_pipeline.feature_cache import FeatureCache
from hypermodel.space import SearchChoices, TrialConfig
from hypermodel.transfer import PREFIX_NAME, build_transfer_model


def leaderboard(run_dir):
    path = run_dir / "leaderboard.csv"
    return pd.read_csv(path, dtype={"trial_id": str}) if path.exists() else pd.DataFrame()


def test_sigkill_mid_search_then_rerun_finishes_keeping_finished_trials(tmp_path):
    run_dir = tmp_path / "run"
    command = ("search", "--profile", "smoke", "--run-dir", run_dir, "--time-budget", "0")
    process = start_cli(*command)
    try:
        assert wait_for(lambda: len(leaderboard(run_dir)) >= 2, timeout=400), "no two trials finished"
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    before = leaderboard(run_dir)
    result = run_cli(*command)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    after = leaderboard(run_dir)
    assert after["trial_id"].is_unique
    assert set(after["status"]) == {"COMPLETED"} and after["val_accuracy"].between(0, 1).all()
    # Hyperband(max_epochs=2, factor=2) runs 5 trials, killed or not.
    assert len(after) == 5
    kept = after.set_index("trial_id").loc[before["trial_id"]]
    assert np.allclose(kept["val_accuracy"], before["val_accuracy"].to_numpy())
    assert np.allclose(kept["seconds"], before["seconds"].to_numpy())
    best = json.loads((run_dir / "best_hparams.json").read_text())
    top = after.sort_values(["val_accuracy", "trial_id"], ascending=[False, True]).iloc[0]
    assert best["trial_id"] == top["trial_id"]


WRITER = """
import sys
from data_pipeline import atomic
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
    messages = []
    first = FeatureCache(tmp_path, log=messages.append).features(prefix, config, images, "slice/train")
    (path,) = tmp_path.glob("*.npy")
    path.write_bytes(path.read_bytes()[:-100])  # truncated, as by a crash mid-copy
    cache = FeatureCache(tmp_path, log=messages.append)
    again = cache.features(prefix, config, images, "slice/train")
    assert cache.builds == 1 and any("unusable" in m for m in messages)
    np.testing.assert_array_equal(first, again)
    # Same size, flipped bytes: caught by the sha256.
    raw = bytearray(path.read_bytes())
    raw[-10:] = bytes(b ^ 0xFF for b in raw[-10:])
    path.write_bytes(bytes(raw))
    cache = FeatureCache(tmp_path, log=messages.append)
    cache.features(prefix, config, images, "slice/train")
    assert cache.builds == 1


def non_loopback_address():
    import psutil

    for addresses in psutil.net_if_addrs().values():
        for a in addresses:
            if a.family == socket.AF_INET and not a.address.startswith("127."):
                return a.address
    return None


def test_tensorboard_serves_hparams_on_loopback_only(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "tensorboard").mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({"settings": {"profile": "smoke", "run_dir": str(run_dir),
                                                                  "choices": {}}, "data": {}}))
    port = free_port()
    process = start_cli("tensorboard", "--run-dir", run_dir, "--port", port)
    try:
        def listing():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/plugins_listing", timeout=2) as r:
                    return json.loads(r.read())
            except OSError:
                return None

        assert wait_for(lambda: listing() is not None, timeout=60), "TensorBoard did not answer on 127.0.0.1"
        assert "hparams" in listing()
        other = non_loopback_address()
        if other is not None:
            with pytest.raises(OSError):
                socket.create_connection((other, port), timeout=2).close()
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def test_same_seed_proposes_the_same_trials(tmp_path):
    from data_pipeline import load_dataset
    from tuning.run import RunSettings, prepare_run_dir, training_data
    from tuning.tuner import run_search

    dataset = load_dataset()
    boards = []
    for name in ("a", "b"):
        settings = RunSettings(
            profile="smoke", run_dir=str(tmp_path / name), tuner="random", max_trials=3, max_epochs=1,
            train_subset=200, val_subset=100, batch_size=50, seed=0,  # 0 is KerasTuner's 'random'
            choices=SearchChoices(backbones=("mobilenet_v2_0.35", "mobilenet_v2_0.5"), resolutions=(32,),
                                  unfrozen_blocks=(0,)),
        )
        run_dir = prepare_run_dir(settings, dataset)
        boards.append(run_search(settings, training_data(dataset, settings), run_dir,
                                 feature_cache=FeatureCache(None), log=lambda m: None)["leaderboard"])
    columns = ["trial_id", "backbone", "dense_units", "dropout", "learning_rate", "lr_schedule", "optimizer"]
    pd.testing.assert_frame_equal(boards[0][columns], boards[1][columns])
