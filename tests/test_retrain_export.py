"""The whole job (search → retrain → export → report), the SavedModel and predict."""

import dataclasses
import json
import subprocess

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from PIL import Image

from cli import assert_user_error, run_cli, run_main_without_tensorflow
from conftest import SMOKE_TEST_IMAGES
from data_pipeline import load_dataset
from deploy import runtimes
from reference import load_model_keras, mobilenet_inputs, trial_val_accuracies


@pytest.fixture(scope="module")
def job(smoke_job):
    """The whole smoke job (tests/conftest.py): its run dir and the job's CompletedProcess."""
    return smoke_job.run_dir, smoke_job.job


@pytest.fixture(scope="module")
def smoke_data(smoke_job):
    """The dataset the smoke job read: a slice of Fashion-MNIST (tests/conftest.py)."""
    return load_dataset(smoke_job.data)


def epoch_scalars(log_dir, tag):
    """Values of one per-epoch scalar (e.g. epoch_loss) in a TensorBoard log dir, in step order."""
    values = {}
    for path in sorted(log_dir.glob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                if value.tag == tag:
                    values[event.step] = float(tf.make_ndarray(value.tensor)) if value.HasField("tensor") \
                        else value.simple_value
    return [values[step] for step in sorted(values)]


def keras_probabilities(run_dir, images):
    """(plain, flip-averaged) probabilities of run/model.keras, preprocessed by this test."""
    model = load_model_keras(run_dir / "model.keras")
    resolution = json.loads((run_dir / "metrics.json").read_text())["hyperparameters"]["resolution"]
    plain = model.predict(mobilenet_inputs(images, resolution), verbose=0)
    mirrored = model.predict(mobilenet_inputs(images[:, :, ::-1], resolution), verbose=0)
    return plain, (plain + mirrored) / 2


def test_whole_smoke_job_is_sane(job):
    run_dir, result = job
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["test_accuracy"] >= 0.75
    assert metrics["test_images"] == SMOKE_TEST_IMAGES
    assert set(metrics["per_class"]) == set(load_dataset().class_names)
    assert np.array(metrics["confusion_matrix"]).sum() == SMOKE_TEST_IMAGES
    # The trial retrained: the search's best, or a finalist better on the whole validation split.
    board = pd.read_csv(run_dir / "leaderboard.csv", dtype={"trial_id": str}).set_index("trial_id")
    retrained = board.loc[metrics["trial_id"]]
    assert retrained["unfrozen_blocks"] in (2, 5)
    # The exact linear head challenged the searched head (4 000 retrain images: a linear
    # head was a candidate), and the better on validation was kept.
    challenge = metrics.get("linear_head_challenge")
    if retrained["head"] == "linear":
        assert challenge is None
    else:
        assert challenge["replaced"] == (metrics["hyperparameters"]["head"] == "linear"), challenge
    # Both of the searched head's phases really trained (a phase 2 {"skipped": ...} must
    # not pass): each has a history with one finite loss per epoch, and TensorBoard logged
    # the same epochs.
    for phase in ("phase1", "phase2"):
        record = metrics.get("replaced_phases", metrics)[phase]
        assert "skipped" not in record, record
        assert record["epochs"] >= 1
        history = record["history"]
        for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
            assert len(history[key]) == record["epochs"], (phase, key)
        assert np.isfinite(history["loss"]).all() and np.isfinite(history["val_loss"]).all()
        logged = epoch_scalars(run_dir / "tensorboard" / "retrain" / phase / "train", "epoch_loss")
        assert len(logged) == record["epochs"], phase
        np.testing.assert_allclose(logged, history["loss"], rtol=1e-5)
    assert "test accuracy" in result.stdout and "export" in result.stdout and "tensorboard" in result.stdout
    for name in ("report.md", "learning_curves.png", "confusion_matrix.png", "model.keras", "leaderboard.csv"):
        assert (run_dir / name).is_file(), name
    report = (run_dir / "report.md").read_text()
    for section in ("## Data", "### Top 10", "### Best hyperparameters", "## Retraining", "## Test evaluation",
                    "## Wall time", "## Serving the model"):
        assert section in report
    assert "Flip test-time augmentation" in report
    assert (run_dir / "tensorboard" / "retrain" / "phase1").is_dir()


def test_the_finalists_are_scored_again_on_the_whole_validation_split(job):
    """The smoke search validates on a 500-image slice; the retrain on all 2 000 validation
    images. Its finalists' checkpoints, evaluated here on those, decide what is retrained."""
    run_dir, result = job
    metrics = json.loads((run_dir / "metrics.json").read_text())
    finalists = metrics["finalists"]
    searched = json.loads((run_dir / "config.json").read_text())["search_images"]["validation"]
    assert searched <= 500 and finalists["search_validation_images"] == searched  # a stratified 500
    assert finalists["validation_images"] == 2000
    board = pd.read_csv(run_dir / "leaderboard.csv", dtype={"trial_id": str}).set_index("trial_id")
    scored = finalists["finalists"]
    best = json.loads((run_dir / "best_hparams.json").read_text())
    # The search's best first, then the next by the search's score, a handful at most.
    assert scored[0]["trial_id"] == best["trial_id"] and 2 <= len(scored) <= 6
    search_scores = [board.loc[f["trial_id"], "score"] for f in scored]
    assert search_scores == sorted(search_scores, reverse=True)
    evaluated, images = trial_val_accuracies(run_dir, whole_validation=True, trial_ids={f["trial_id"] for f in scored})
    assert images == 2000
    for finalist in scored:  # ±1.5 images: a near tie may round either way between kernels
        assert abs(finalist["whole_validation_score"] - evaluated[finalist["trial_id"]]) <= 1.5 / images, finalist
    # The one retrained (and exported) is the finalist best on the whole split.
    top = max(evaluated[f["trial_id"]] for f in scored)
    assert evaluated[finalists["chosen"]] >= top - 1.5 / images
    assert metrics["trial_id"] == finalists["chosen"]
    retrained = board.loc[finalists["chosen"]]
    assert metrics["hyperparameters"]["backbone"] == retrained["backbone"]
    assert metrics["hyperparameters"]["unfrozen_blocks"] == retrained["unfrozen_blocks"]
    assert "finalists scored again on the whole validation split (2,000 images" in result.stdout
    assert "finalists scored again on the whole validation split" in (run_dir / "report.md").read_text()


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


def test_reloaded_saved_model_matches_model_keras_on_fresh_images(job):
    """The SavedModel, reloaded here, gives model.keras's probabilities on test images the
    tool's own parity check never saw (it uses the first 512), with flip TTA exactly when
    the retrain chose it."""
    run_dir, _ = job
    dataset = load_dataset()
    images = dataset.x_test[-300:]
    serve = tf.saved_model.load(str(run_dir / "export")).signatures["serving_default"]
    served = serve(images=tf.constant(images))
    plain, flip_averaged = keras_probabilities(run_dir, images)
    used = json.loads((run_dir / "metrics.json").read_text())["tta"]["used"]
    expected, other = (flip_averaged, plain) if used else (plain, flip_averaged)
    probabilities = served["probabilities"].numpy()
    np.testing.assert_allclose(probabilities, expected, atol=2e-5)
    assert np.abs(probabilities - other).max() > 1e-3  # and not the other variant
    np.testing.assert_array_equal(served["class_id"].numpy(), expected.argmax(axis=1))
    names = [n.decode() for n in served["class_name"].numpy()]
    assert names == [dataset.class_names[i] for i in expected.argmax(axis=1)]
    assert np.mean(expected.argmax(axis=1) == dataset.y_test[-300:]) >= 0.7  # a trained model, not noise


def test_saved_model_cli_run_on_npy(job, tmp_path):
    """TensorFlow's own CLI runs the export on a .npy batch: the outputs it writes are the
    signature's, for those images."""
    run_dir, _ = job
    images = load_dataset().x_test[:4]
    np.save(tmp_path / "x.npy", images)
    result = subprocess.run(
        ["saved_model_cli", "run", "--dir", str(run_dir / "export"), "--tag_set", "serve",
         "--signature_def", "serving_default", "--inputs", f"images={tmp_path / 'x.npy'}",
         "--outdir", str(tmp_path / "out")],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    expected = tf.saved_model.load(str(run_dir / "export")).signatures["serving_default"](images=tf.constant(images))
    probabilities = np.load(tmp_path / "out" / "probabilities.npy")
    assert probabilities.shape == (4, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(probabilities, expected["probabilities"].numpy(), atol=1e-6)
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "class_id.npy"), probabilities.argmax(axis=1))
    names = np.load(tmp_path / "out" / "class_name.npy", allow_pickle=True)
    assert [bytes(n).decode() for n in names] == [n.decode() for n in expected["class_name"].numpy()]


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


def write_idx3(path, images):
    """An IDX3 image file, as in the Fashion-MNIST distribution (uncompressed)."""
    header = (0x803).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in images.shape)
    path.write_bytes(header + images.tobytes())


def test_predict_npy_csv_and_idx_inputs(job, tmp_path):
    """Real test images in each batch format: one output row per image, each with the
    class the SavedModel gives that image."""
    import pandas as pd

    run_dir, _ = job
    dataset = load_dataset()
    batches = {  # distinct images per file, so a mix-up between files shows
        "batch.npy": dataset.x_test[9000:9005],
        "kaggle.csv": dataset.x_test[9005:9009],
        "t10k-images-idx3-ubyte": dataset.x_test[9009:9015],
    }
    np.save(tmp_path / "batch.npy", batches["batch.npy"])
    frame = pd.DataFrame(batches["kaggle.csv"].reshape(-1, 784), columns=[f"pixel{i}" for i in range(1, 785)])
    frame.insert(0, "label", dataset.y_test[9005:9009])  # Kaggle's format, label column first
    frame.to_csv(tmp_path / "kaggle.csv", index=False)
    write_idx3(tmp_path / "t10k-images-idx3-ubyte", batches["t10k-images-idx3-ubyte"])

    paths = [tmp_path / name for name in batches]
    result = run_cli("predict", "--model", run_dir / "export", *paths, "--output", tmp_path / "p.csv")
    assert result.returncode == 0, result.stderr[-2000:]
    printed = result.stdout.strip().splitlines()
    written = pd.read_csv(tmp_path / "p.csv")
    assert list(written.columns) == ["input", "class_name", "confidence"]
    assert len(printed) == len(written) == 15

    serve = tf.saved_model.load(str(run_dir / "export")).signatures["serving_default"]
    expected_inputs, expected_names, expected_confidence = [], [], []
    for path, images in zip(paths, batches.values()):
        out = serve(images=tf.constant(images))
        expected_inputs += [f"{path}[{i}]" for i in range(len(images))]
        expected_names += [n.decode() for n in out["class_name"].numpy()]
        expected_confidence += list(out["probabilities"].numpy().max(axis=1))
    assert list(written["input"]) == expected_inputs
    assert list(written["class_name"]) == expected_names
    np.testing.assert_allclose(written["confidence"], expected_confidence, rtol=1e-5)
    for line, name, class_name in zip(printed, expected_inputs, expected_names):
        assert line.startswith(name) and f" {class_name} " in line, line


def test_retrain_that_diverges_exits_2_with_one_line(job, tmp_path):
    """An absurd learning rate in best_hparams.json makes the loss NaN (1e4 is not enough:
    Adam then only collapses the model to chance, finite loss); the retrain says so in one line."""
    import shutil

    run_dir, _ = job
    copy = tmp_path / "run"
    copy.mkdir()
    for name in ("config.json", "best_hparams.json"):
        shutil.copy(run_dir / name, copy / name)
    shutil.copytree(run_dir / "feature_cache", copy / "feature_cache")  # only to save time
    best = json.loads((copy / "best_hparams.json").read_text())
    best["hyperparameters"]["learning_rate"] = 1e30
    (copy / "best_hparams.json").write_text(json.dumps(best))
    inputs = {name: (copy / name).read_bytes() for name in ("config.json", "best_hparams.json")}
    result = run_cli("retrain", "--run-dir", copy)
    assert_user_error(result, "diverged")
    assert {name: (copy / name).read_bytes() for name in inputs} == inputs
    for name in ("model.keras", "metrics.json", "export", "timings.json", "confusion_matrix.png"):
        assert not (copy / name).exists(), name


@pytest.mark.parametrize("name, content, fault", [
    ("broken.png", b"\x89PNG\r\n\x1a\nnot really", "corrupt PNG"),
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


FORMATS = ["savedmodel", "tflite", "tflite-fp16", "tflite-int8"]
TFLITE_FILES = {"tflite": "model.tflite", "tflite-fp16": "model_fp16.tflite", "tflite-int8": "model_int8.tflite"}


def litert_classes(path, images):
    """The class a .tflite file gives each image, run here on the LiteRT interpreter directly."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    (source,) = interpreter.get_input_details()
    (output,) = interpreter.get_output_details()
    assert source["dtype"] == np.uint8 and list(source["shape_signature"]) == [-1, 28, 28]
    predicted = []
    for start in range(0, len(images), 500):
        batch = images[start : start + 500]
        interpreter.resize_tensor_input(source["index"], batch.shape)
        interpreter.allocate_tensors()
        interpreter.set_tensor(source["index"], batch)
        interpreter.invoke()
        predicted.append(interpreter.get_tensor(output["index"]).argmax(axis=1))
    return np.concatenate(predicted)


def test_a_latency_process_that_cannot_load_its_artifact_fails_the_measurement_with_its_error(tmp_path):
    (tmp_path / "not_a_model.tflite").write_bytes(b"not a flatbuffer")
    broken = ([str(tmp_path / "not_a_model.tflite")], np.zeros((28, 28), np.uint8), 1)
    absent = ([str(tmp_path / "absent.tflite")], np.zeros((28, 28), np.uint8), 2)
    with pytest.raises(RuntimeError, match="latency measurement failed") as failure:
        runtimes.time_in_fresh_processes([broken, absent])
    assert "not_a_model.tflite" in str(failure.value) and "not a valid .tflite model" in str(failure.value)


def test_a_latency_process_that_does_not_answer_in_time_is_killed_and_fails_the_measurement(tmp_path):
    # Not a .tflite: the process imports TensorFlow first (seconds), so it cannot be ready in
    # 1 s; left alone, it would fail later on the missing model, with another error.
    slow = ([str(tmp_path / "saved_model")], np.zeros((28, 28), np.uint8), 1)
    with pytest.raises(RuntimeError, match="still running after 1 s"):
        runtimes.time_in_fresh_processes([slow], timeout_s=1)


def test_on_one_cpu_latency_is_timed_once_for_one_thread_and_all(job, smoke_data, monkeypatch):
    import os

    from deploy.export import TFLITE_FILES, score_artifacts
    from tuning.settings import Settings

    run_dir, _ = job
    paths = {fmt: run_dir / "export" / TFLITE_FILES[fmt] for fmt in ("tflite", "tflite-int8")}
    jobs = []
    time_in_fresh_processes = runtimes.time_in_fresh_processes
    monkeypatch.setattr(runtimes, "time_in_fresh_processes", lambda js: jobs.extend(js) or time_in_fresh_processes(js))
    allowed = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(allowed)})
    try:
        records = score_artifacts(paths, smoke_data, None, Settings(profile="smoke"), log=lambda line: None)
    finally:
        os.sched_setaffinity(0, allowed)
    assert [threads for _, _, threads in jobs] == [1]  # one timing process: "all threads" is the one thread
    for record in records.values():
        assert 0 < record["latency_ms_p50_1_thread"] <= record["latency_ms_p95_1_thread"]
        assert record["latency_ms_p50_all_threads"] == record["latency_ms_p50_1_thread"]


def test_every_format_is_exported_and_scored_by_its_own_runtime(job, smoke_data):
    import hashlib

    run_dir, result = job
    exports = json.loads((run_dir / "export" / "exports.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert list(exports) == FORMATS and metrics["exports"] == exports
    dataset = smoke_data
    classes = {}
    for fmt, name in TFLITE_FILES.items():
        path = run_dir / "export" / name
        record = exports[fmt]
        assert record["path"] == str(path) and record["size_kb"] == pytest.approx(path.stat().st_size / 1024, abs=0.1)
        assert record["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        classes[fmt] = litert_classes(path, dataset.x_test)
    serve = tf.saved_model.load(str(run_dir / "export")).signatures["serving_default"]
    classes["savedmodel"] = np.concatenate([serve(images=tf.constant(dataset.x_test[i : i + 1000]))["class_id"].numpy()
                                            for i in range(0, len(dataset.x_test), 1000)])
    # The SavedModel is model.keras (test_reloaded_saved_model_matches_model_keras_on_fresh_images):
    # its accuracy here is the retrain's test accuracy, up to near ties the kernels may flip
    # (0.1 pp of the images: 2 of 2 000).
    keras_accuracy = metrics["test_accuracy"]
    images = len(dataset.y_test)
    assert abs(np.sum(classes["savedmodel"] == dataset.y_test) - keras_accuracy * images) <= 0.001 * images + 1e-6
    max_drop_pp = json.loads((run_dir / "config.json").read_text())["settings"]["max_accuracy_drop"]
    for fmt, record in exports.items():
        accuracy = np.mean(classes[fmt] == dataset.y_test)
        assert record["test_accuracy"] == pytest.approx(accuracy, abs=1e-9), fmt
        assert record["drop_pp"] == pytest.approx((keras_accuracy - accuracy) * 100, abs=1e-3), fmt
        for threads in ("1_thread", "all_threads"):
            assert 0 < record[f"latency_ms_p50_{threads}"] <= record[f"latency_ms_p95_{threads}"]
        assert f"  {fmt} " in result.stdout
    # Float conversions keep the Keras model's predictions: float32 flips only near ties
    # (other kernels sum in another order), float16 rounds weights and activations to 11
    # significant bits, which flips more near ties (0.3-0.6 % of images, by model and CPU
    # kind; the clear predictions are checked for equality in the predict test). Both ship.
    assert np.mean(classes["tflite"] == classes["savedmodel"]) >= 0.998
    assert np.mean(classes["tflite-fp16"] == classes["tflite"]) >= 0.99
    for fmt in ("savedmodel", "tflite", "tflite-fp16"):
        assert exports[fmt]["drop_pp"] <= max_drop_pp and exports[fmt]["status"] == "ok", exports[fmt]
    int8_drop_pp = (keras_accuracy - np.mean(classes["tflite-int8"] == dataset.y_test)) * 100
    assert (exports["tflite-int8"]["status"] == "rejected") == (int8_drop_pp > max_drop_pp), exports["tflite-int8"]
    assert exports["tflite-fp16"]["size_kb"] < 0.6 * exports["tflite"]["size_kb"]
    assert exports["tflite-int8"]["size_kb"] < 0.4 * exports["tflite"]["size_kb"]
    # The int8 file's top was fine-tuned on the int8 prefix's features, judged on validation.
    tuning = exports["tflite-int8"]["top_tuning"]
    assert 0 < tuning["images"] <= 10_000 and tuning["epochs"] == 2, tuning
    assert tuning["kept"] == (tuning["val_accuracy_after"] > tuning["val_accuracy_before"]), tuning
    assert "int8: top fine-tuned on the int8 prefix's features" in result.stdout
    report = (run_dir / "report.md").read_text()
    assert "## Exported artifacts" in report and "model_int8.tflite" in report
    assert "fine-tuned on the int8 prefix's own features" in report
    assert (run_dir / "accuracy_vs_latency.png").is_file()


def test_int8_is_fully_integer_with_raw_uint8_input(job):
    from ai_edge_litert.interpreter import Interpreter

    run_dir, _ = job
    interpreter = Interpreter(model_path=str(run_dir / "export" / "model_int8.tflite"))
    convolutions = [op for op in interpreter._get_ops_details() if op["op_name"] in ("CONV_2D", "DEPTHWISE_CONV_2D")]
    assert convolutions
    dtypes = {d["index"]: d["dtype"] for d in interpreter.get_tensor_details()}
    for op in convolutions:
        assert dtypes[op["inputs"][0]] == np.int8 and dtypes[op["inputs"][1]] == np.int8, op


def test_int8_calibrated_on_constant_images_is_marked_rejected(job, tmp_path):
    """A broken conversion is still written but marked rejected, with its drop."""
    import shutil

    from deploy.export import export
    from tuning.retrain import read_best
    from tuning.run_dir import read_config
    from tuning.settings import Settings

    run_dir, _ = job
    copy = tmp_path / "run"
    copy.mkdir()
    for name in ("config.json", "best_hparams.json", "metrics.json", "model.keras"):
        shutil.copy(run_dir / name, copy / name)
    # Wiring, not learning: no top tuning (a zero feature budget) and 2000 test images.
    settings = Settings.from_dict({**read_config(copy)["settings"], "formats": ("tflite-int8",),
                                   "cache_budget_mb": 0})
    dataset = load_dataset()
    dataset = dataclasses.replace(dataset, x_test=dataset.x_test[:2000], y_test=dataset.y_test[:2000])
    constant = np.full((64, 28, 28), 255, dtype=np.uint8)
    records = export(copy, read_best(copy)[1], settings, dataset, log=lambda _: None, calibration=constant)
    record = records["tflite-int8"]
    # The file is written, scored by its runtime (run here) far below the float model,
    # and rejected for that drop.
    accuracy = np.mean(litert_classes(copy / "export" / "model_int8.tflite", dataset.x_test) == dataset.y_test)
    assert record["test_accuracy"] == pytest.approx(accuracy, abs=1e-9)
    keras_accuracy = json.loads((run_dir / "metrics.json").read_text())["test_accuracy"]
    assert keras_accuracy - accuracy > 0.05, (keras_accuracy, accuracy)
    assert record["status"] == "rejected" and record["drop_pp"] > settings.max_accuracy_drop, record
    assert f"accuracy drop {record['drop_pp']:.2f} pp" in record["rejected_because"]
    saved = json.loads((copy / "metrics.json").read_text())["exports"]["tflite-int8"]
    assert saved["status"] == "rejected"


def test_int8_top_is_left_alone_when_the_feature_budget_holds_less_than_a_batch(job):
    from data_pipeline.splits import training_data
    from hypermodel.backbones import get_backbone
    from deploy.export import converted, load_trained_model, prefix_function
    from deploy.int8_tuning import fit_top_to_int8_prefix
    from tuning.retrain import read_best

    run_dir, _ = job
    _, config = read_best(run_dir)
    model = load_trained_model(run_dir)
    dataset = load_dataset()
    prefix = converted(prefix_function(model, config.resolution, get_backbone(config.backbone).preprocess_input),
                       model, ["tflite-int8"], dataset.x_train[:32])["tflite-int8"]
    before = [w.copy() for w in model.get_layer("trainable_top").get_weights()]
    lines = []
    record = fit_top_to_int8_prefix(model, prefix, training_data(dataset, train_subset=500, val_subset=100),
                                    tta=False, batch_size=64, seed=0, budget_mb=0, log=lines.append)
    assert record["images"] == 0 and record["epochs"] == 0 and not record["kept"], record
    assert lines == ["  int8: top not tuned: --cache-budget 0 MB holds the features of 0 images"]
    for kept, original in zip(model.get_layer("trainable_top").get_weights(), before):
        np.testing.assert_array_equal(kept, original)


def test_predict_runs_every_artifact_with_the_same_output(job, smoke_data, tmp_path):
    run_dir, _ = job
    dataset = smoke_data
    # The whole test split: the images the export scored each artifact on.
    np.save(tmp_path / "x.npy", dataset.x_test)
    exports = json.loads((run_dir / "export" / "exports.json").read_text())
    predicted = {}
    for fmt in FORMATS:
        model = run_dir / "export" / TFLITE_FILES.get(fmt, "")
        output = tmp_path / f"{fmt}.csv"
        if fmt == "savedmodel":
            result = run_cli("predict", "--model", model, tmp_path / "x.npy", "--output", output)
        else:  # LiteRT alone runs a .tflite file on arrays: TensorFlow's start-up is not paid
            result = run_main_without_tensorflow("predict", "--model", model, tmp_path / "x.npy", "--output", output)
        assert result.returncode == 0, result.stderr[-2000:]
        assert "XNNPACK" not in result.stdout + result.stderr
        rows = pd.read_csv(output)
        assert list(rows["input"][:2]) == [f"{tmp_path / 'x.npy'}[0]", f"{tmp_path / 'x.npy'}[1]"]
        predicted[fmt] = rows["class_name"].map(dataset.class_names.index).to_numpy()
        if fmt == "savedmodel":
            clear = rows["confidence"].to_numpy() >= 0.6
    # Float artifacts: the same class wherever the model is not torn between two
    # (float16 rounding may flip a near tie).
    assert clear.mean() > 0.8
    for fmt in ("tflite", "tflite-fp16"):
        np.testing.assert_array_equal(predicted[fmt][clear], predicted["savedmodel"][clear])
        assert np.mean(predicted[fmt] == predicted["savedmodel"]) >= 0.99, fmt
    # Each artifact, run by `predict`, scores what the export measured for it (int8
    # included, with its own drop), up to 0.1 pp of the images (2 of 2 000): near ties
    # the thread count may flip.
    images = len(dataset.y_test)
    for fmt, classes in predicted.items():
        correct = np.sum(classes == dataset.y_test)
        assert abs(correct - exports[fmt]["test_accuracy"] * images) <= 0.001 * images + 1e-6, (fmt, correct, exports[fmt])
