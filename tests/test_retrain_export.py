"""The whole job (search → retrain → export → report), the SavedModel and predict."""

import json
import subprocess

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from cli import run_cli
from data_pipeline import load_dataset


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("job") / "run"
    result = run_cli("--profile", "smoke", "--run-dir", run_dir)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return run_dir, result


def test_whole_smoke_job_is_sane(job):
    run_dir, result = job
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["test_accuracy"] >= 0.75
    assert metrics["test_images"] == 10000
    assert set(metrics["per_class"]) == set(load_dataset().class_names)
    assert np.array(metrics["confusion_matrix"]).sum() == 10000
    for phase in ("phase1", "phase2"):
        assert phase in metrics
    assert "test accuracy" in result.stdout and "export" in result.stdout and "tensorboard" in result.stdout
    for name in ("report.md", "learning_curves.png", "confusion_matrix.png", "model.keras", "leaderboard.csv"):
        assert (run_dir / name).is_file(), name
    report = (run_dir / "report.md").read_text()
    for section in ("## Data", "### Top 10", "### Best hyperparameters", "## Retraining", "## Test evaluation",
                    "## Wall time", "## Serving the model"):
        assert section in report
    assert "Flip test-time augmentation" in report
    assert (run_dir / "tensorboard" / "retrain" / "phase1").is_dir()


def test_export_signature_is_raw_uint8_in_probabilities_out(job):
    run_dir, _ = job
    serve = tf.saved_model.load(str(run_dir / "export")).signatures["serving_default"]
    spec = serve.structured_input_signature[1]
    assert list(spec) == ["images"]
    assert spec["images"].dtype == tf.uint8 and spec["images"].shape.as_list() == [None, 28, 28]
    outputs = serve.structured_outputs
    assert set(outputs) == {"probabilities", "class_id", "class_name"}
    assert outputs["probabilities"].dtype == tf.float32
    assert outputs["class_id"].dtype == tf.int64
    assert outputs["class_name"].dtype == tf.string

    shown = subprocess.run(["saved_model_cli", "show", "--dir", str(run_dir / "export"), "--all"],
                           capture_output=True, text=True, check=True).stdout
    serving = shown.split("signature_def['serving_default']")[1]
    assert "inputs['images']" in serving and "DT_UINT8" in serving
    for key in ("probabilities", "class_id", "class_name"):
        assert f"outputs['{key}']" in serving


def test_export_parity_recorded(job):
    run_dir, _ = job
    parity = json.loads((run_dir / "metrics.json").read_text())["export"]
    assert parity["images"] >= 512
    assert parity["max_abs_diff"] <= 1e-5 and parity["same_classes"] and parity["passed"]


def test_saved_model_cli_run_on_npy(job, tmp_path):
    run_dir, _ = job
    images = load_dataset().x_test[:4]
    np.save(tmp_path / "x.npy", images)
    result = subprocess.run(
        ["saved_model_cli", "run", "--dir", str(run_dir / "export"), "--tag_set", "serve",
         "--signature_def", "serving_default", "--inputs", f"images={tmp_path / 'x.npy'}"],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "probabilities" in result.stdout and "class_name" in result.stdout


def test_predict_png_and_csv_output(job, tmp_path):
    run_dir, _ = job
    dataset = load_dataset()
    # A trouser (label 1) and a bag (label 8), upscaled like a user's photo would be.
    paths = []
    for label in (1, 8):
        index = int(np.flatnonzero(dataset.y_test == label)[0])
        path = tmp_path / f"item{label}.png"
        Image.fromarray(dataset.x_test[index]).resize((112, 112)).save(path)
        paths.append(path)
    result = run_cli("predict", "--model", run_dir / "export", *paths, "--output", tmp_path / "p.csv")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2
    assert "Trouser" in lines[0] and "Bag" in lines[1]
    csv = (tmp_path / "p.csv").read_text().splitlines()
    assert csv[0] == "input,class_name,confidence" and len(csv) == 3


@pytest.mark.parametrize("name, content, fault", [
    ("broken.png", b"\x89PNG\r\n\x1a\nnot really", "not a readable PNG"),
    ("x.npy", b"garbage", "not a valid .npy"),
    ("missing.png", None, "file not found"),
    ("notes.txt", b"hello", "unsupported input type"),
])
def test_predict_bad_input_exits_2(job, tmp_path, name, content, fault):
    run_dir, _ = job
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    result = run_cli("predict", "--model", run_dir / "export", path, "--output", tmp_path / "out.csv")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and name in result.stderr and fault in result.stderr
    assert not (tmp_path / "out.csv").exists()


def test_predict_refuses_a_folder_that_is_not_an_export(tmp_path):
    Image.fromarray(load_dataset().x_test[0]).save(tmp_path / "item.png")
    result = run_cli("predict", "--model", tmp_path, tmp_path / "item.png")
    assert result.returncode == 2 and "not a SavedModel" in result.stderr


def test_export_and_report_refuse_a_foreign_run_dir(tmp_path):
    (tmp_path / "something.txt").write_text("not a run")
    for command in ("retrain", "export", "report"):
        result = run_cli(command, "--run-dir", tmp_path)
        assert result.returncode == 2, command
        assert "not a run of this tool" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["something.txt"]


def test_retrain_refuses_best_hparams_outside_the_registry(job, tmp_path):
    import shutil

    run_dir, _ = job
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("export", "feature_cache", "tuner", "tensorboard"))
    best = json.loads((copy / "best_hparams.json").read_text())
    best["hyperparameters"]["backbone"] = "alexnet"
    (copy / "best_hparams.json").write_text(json.dumps(best))
    before = (copy / "metrics.json").read_bytes()
    result = run_cli("retrain", "--run-dir", copy)
    assert result.returncode == 2
    assert "best_hparams.json" in result.stderr and "alexnet" in result.stderr
    assert (copy / "metrics.json").read_bytes() == before


def synthetic_idx_dataset(folder, per_class_train=200, per_class_test=50, seed=0):
    """A non-Fashion 28×28 dataset in IDX format: bars and rings, with a classes.txt."""
    import gzip

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:28, :28]

    def draw(label):
        cy, cx = rng.integers(9, 19, size=2)
        if label == 0:
            image = (abs(yy - cy) < 2) & (abs(xx - cx) < 9)
        elif label == 1:
            image = (abs(xx - cx) < 2) & (abs(yy - cy) < 9)
        else:
            image = abs(np.hypot(yy - cy, xx - cx) - 6) < 1.5
        noisy = image * rng.uniform(150, 255) + rng.normal(0, 20, (28, 28))
        return np.clip(noisy, 0, 255).astype(np.uint8)

    def write(name, array, magic):
        header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
        (folder / name).write_bytes(gzip.compress(header + array.tobytes()))

    folder.mkdir(parents=True)
    for split, count in (("train", per_class_train), ("t10k", per_class_test)):
        labels = np.repeat(np.arange(3), count).astype(np.uint8)
        images = np.stack([draw(label) for label in labels])
        write(f"{split}-images-idx3-ubyte.gz", images, 0x803)
        write(f"{split}-labels-idx1-ubyte.gz", labels, 0x801)
    (folder / "classes.txt").write_text("horizontal bar\nvertical bar\nring\n")
    return folder


def test_whole_job_on_a_dataset_that_is_not_fashion_mnist(tmp_path):
    data = synthetic_idx_dataset(tmp_path / "shapes")
    run_dir = tmp_path / "run"
    result = run_cli("--profile", "smoke", "--data", data, "--run-dir", run_dir, "--val-subset", "0")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["class_names"] == ["horizontal bar", "vertical bar", "ring"]
    assert metrics["test_images"] == 150 and metrics["test_accuracy"] >= 0.75
    serve = tf.saved_model.load(str(run_dir / "export")).signatures["serving_default"]
    images = load_dataset(data).x_test[:3]
    out = serve(images=tf.constant(images))
    assert out["probabilities"].shape == (3, 3)
    assert {n.decode() for n in out["class_name"].numpy()} <= {"horizontal bar", "vertical bar", "ring"}
