"""Export: the SavedModel and LiteRT (.tflite) files, each scored by its own runtime.

Formats (`--formats`, default all):
    savedmodel   `export/` itself (TF Serving, `saved_model_cli`, `tf.saved_model.load`);
    tflite       `export/model.tflite`, float32;
    tflite-fp16  `export/model_fp16.tflite`, float16 weights (half the size);
    tflite-int8  `export/model_int8.tflite`, full-integer: weights and activations int8,
                 calibrated on training images (never test images), its trainable top
                 fine-tuned on the int8 prefix's features (deploy/int8_tuning.py).
Every artifact takes the user's raw pixels and does the backbone's preprocessing (and
the flip test-time augmentation when the retrain kept it) inside. The SavedModel's
`serving_default` takes, for array datasets, `images` uint8 [batch, 28, 28]; for
image-file datasets, `image_bytes` string [batch] of encoded PNG/JPEG/BMP/GIF files
(TensorFlow Serving's convention), decoded and letterboxed inside
(data_pipeline/images.py). It returns `probabilities` float32 [batch, K], `class_id`
int64 [batch] and `class_name` string [batch]. A `.tflite` file returns `probabilities`;
it takes `images` like the SavedModel, or for image files `pixels` uint8
[batch, S, S, 3] (the files decoded and letterboxed to the store's side S: LiteRT has
no image decoder); class names are in `labels.txt`.

Each artifact is then scored on the whole test split through its own runtime
(deploy/runtimes.py): accuracy, drop against the Keras model, size, sha256 and
single-image latency (p50/p95, 1 thread and all threads, each timed in a fresh
process). One that drops more than `max_accuracy_drop` pp, or breaks
`max_latency_ms` / `max_model_mb`, is still written but marked rejected with the
figure in `export/exports.json`, `metrics.json` and the command's output.
"""

import hashlib
import json
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from common import atomic, native_output, shims
from common.cpus import usable_cpus
from common.errors import UsageError
from common.paths import file_sha256
from data_pipeline.images import decode_batch
from data_pipeline.pipeline import flip_images, prepare_images
from data_pipeline.splits import training_data
from deploy import runtimes
from deploy.int8_tuning import fit_top_to_int8_prefix
from hypermodel.backbones import get_backbone
from hypermodel.footprint import Footprint, Limits
from hypermodel.model import PREFIX_NAME

TFLITE_FILES = {"tflite": "model.tflite", "tflite-fp16": "model_fp16.tflite", "tflite-int8": "model_int8.tflite"}
EXPORTS_FILE = "exports.json"
CALIBRATION_IMAGES = 300
TEST_CHUNK = 512
PARITY_IMAGES = 512
# The SavedModel runs the same float32 graph as the Keras model, but its kernels may fuse and
# order operations differently: probabilities then differ by rounding, up to ~1e-5 on a
# 62-class MobileNetV2 (the suite's glyphs). A wrong preprocessing moves them by far more.
PARITY_TOLERANCE = 1e-4


class ParityError(RuntimeError):
    """The reloaded SavedModel disagrees with the in-memory model."""


def load_trained_model(run_dir):
    path = Path(run_dir) / "model.keras"
    if not path.is_file():
        raise UsageError(f"{path} not found: run `python search.py retrain` first")
    return keras.models.load_model(path, compile=False, safe_mode=True)


def predict_probabilities(model, images, tta=False):
    """The model's float32 probabilities for preprocessed images, flip-averaged if `tta`.

    With `tta` the images and their mirrors go through the model as one batch, so a
    converted graph holds the model once (a quantised copy per branch would double it).
    """
    if not tta:
        return tf.cast(model(images, training=False), tf.float32)
    count = tf.shape(images)[0]
    both = tf.cast(model(tf.concat([images, flip_images(images)], axis=0), training=False), tf.float32)
    return (both[:count] + both[count:]) / 2


def model_inputs(raw, resolution, preprocess_input, storage_size=None):
    """What the user gives (uint8 arrays, or encoded image bytes when `storage_size`
    is set) → the model's preprocessed input; the same ops served and checked."""
    if storage_size is not None:
        raw = decode_batch(raw, storage_size)
    return prepare_images(raw, resolution, preprocess_input)


def serving_function(model, resolution, preprocess_input, class_names, tta=False, storage_size=None):
    """The raw input → {probabilities, class_id, class_name} function that gets exported.

    Args:
        storage_size: For image-file datasets: the store's side; the function then
            takes `image_bytes` (tf.string) instead of `images` (uint8 28×28).
    """
    names = tf.constant(list(class_names))
    if storage_size is None:
        spec = tf.TensorSpec([None, 28, 28], tf.uint8, name="images")
    else:
        spec = tf.TensorSpec([None], tf.string, name="image_bytes")

    def serve(raw):
        inputs = model_inputs(raw, resolution, preprocess_input, storage_size)
        probabilities = predict_probabilities(model, inputs, tta)
        class_id = tf.argmax(probabilities, axis=-1, output_type=tf.int64)
        return {"probabilities": probabilities, "class_id": class_id, "class_name": tf.gather(names, class_id)}

    return tf.function(serve, input_signature=[spec])  # the signature's input is named after `spec`


def parity_inputs(dataset):
    """Raw test inputs as a user would send them: uint8 arrays, or the test files' bytes."""
    if dataset.files is None:
        return np.asarray(dataset.x_test[:PARITY_IMAGES])
    return np.array([f.path.read_bytes() for f in dataset.files.split("test")[:PARITY_IMAGES]], dtype=object)


def tflite_function(model, resolution, preprocess_input, tta=False, pixel_size=None):
    """The raw pixels → {probabilities} function the `.tflite` files are converted from.

    Args:
        pixel_size: For image-file datasets: S of the `pixels` uint8 [batch, S, S, 3]
            input; else the input is `images` uint8 [batch, 28, 28].
    """

    def serve(raw):
        return {"probabilities": predict_probabilities(model, prepare_images(raw, resolution, preprocess_input), tta)}

    return tf.function(serve, input_signature=[_tflite_input_spec(pixel_size)])


def prefix_function(model, resolution, preprocess_input, tta=False, pixel_size=None):
    """Raw pixels → the frozen prefix's features, batched as `tflite_function` batches
    them (image and mirror as one batch with `tta`, so int8 calibration sees the same)."""

    def features(raw):
        images = prepare_images(raw, resolution, preprocess_input)
        if tta:
            images = tf.concat([images, flip_images(images)], axis=0)
        return {"features": model.get_layer(PREFIX_NAME)(images, training=False)}

    return tf.function(features, input_signature=[_tflite_input_spec(pixel_size)])


def _tflite_input_spec(pixel_size):
    if pixel_size is None:
        return tf.TensorSpec([None, 28, 28], tf.uint8, name="images")
    return tf.TensorSpec([None, pixel_size, pixel_size, 3], tf.uint8, name="pixels")


def convert(function, model, fmt, calibration=None):
    """`function` (one uint8 input, over `model`'s weights) → `.tflite` bytes in format `fmt`.

    Args:
        calibration: uint8 raw inputs for `tflite-int8`'s activation ranges.
    """
    converter = shims.tflite_converter(function, model)
    if fmt == "tflite-fp16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif fmt == "tflite-int8":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([calibration[i : i + 1]] for i in range(len(calibration)))
        # Integer kernels only: a graph that needs a float fallback fails here, not on a device.
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    elif fmt != "tflite":
        raise ValueError(f"format {fmt!r} is not one of {', '.join(TFLITE_FILES)}")
    with native_output.silenced():  # the converter's C++ progress notes
        return converter.convert()


def calibration_inputs(dataset, count=CALIBRATION_IMAGES, seed=0):
    """`count` training images (random, seeded) as a `.tflite` file takes them."""
    rng = np.random.default_rng(seed)
    picked = np.sort(rng.choice(len(dataset.x_train), size=min(count, len(dataset.x_train)), replace=False))
    return np.asarray(dataset.x_train[picked])


def test_inputs(dataset, input_kind):
    """Yields (raw inputs, labels) chunks of the test split for an artifact's `input_kind`."""
    for start in range(0, len(dataset.y_test), TEST_CHUNK):
        stop = start + TEST_CHUNK
        if input_kind == "image_bytes":
            raw = np.array([f.path.read_bytes() for f in dataset.files.split("test")[start:stop]], dtype=object)
        else:  # uint8 arrays, or the store's decoded, letterboxed test images
            raw = np.asarray(dataset.x_test[start:stop])
        yield raw, dataset.y_test[start:stop]


def export(run_dir, config, settings, dataset, log=print, calibration=None):
    """Writes `run_dir/export/` atomically: the chosen formats, each scored on the test split.

    Args:
        run_dir: The run directory (reads model.keras and metrics.json, writes export/).
        config: The retrained model's `TrialConfig` (metrics.json's hyperparameters).
        settings: The run's `Settings` (`formats`, `max_accuracy_drop`, `max_latency_ms`,
            `max_model_mb`, `storage_size`).
        dataset: The run's `Dataset`.
        calibration: Raw inputs calibrating `tflite-int8` (default: training images).

    Returns:
        {format: record} as in `export/exports.json`, also in metrics.json under "exports".
    """
    run_dir = Path(run_dir)
    model = load_trained_model(run_dir)
    preprocess_input = get_backbone(config.backbone).preprocess_input
    metrics_path = run_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    tta = bool(metrics.get("tta", {}).get("used"))  # decided on validation by the retrain
    storage_size = settings.storage_size if dataset.files is not None else None
    paths, int8_tuning = {}, None
    with atomic.directory(run_dir / "export") as tmp:
        if "savedmodel" in settings.formats:
            serve = serving_function(model, config.resolution, preprocess_input, dataset.class_names, tta,
                                     storage_size)
            _write_saved_model(model, serve, tmp)
            parity = check_parity(tmp, model, parity_inputs(dataset), config.resolution, preprocess_input, tta,
                                  storage_size)
            if not parity["passed"]:
                raise ParityError(f"exported model disagrees with the trained one: {parity}")
            metrics["export"] = {"dir": str(run_dir / "export"), "flip_tta": tta, **parity}
            log(f"exported the SavedModel (parity on {parity['images']} images: max |Δp| "
                f"{parity['max_abs_diff']:.2e}, same classes: {parity['same_classes']})")
            paths["savedmodel"] = tmp
        tflite_formats = [f for f in settings.formats if f in TFLITE_FILES]
        if tflite_formats:
            if calibration is None and "tflite-int8" in tflite_formats:
                calibration = calibration_inputs(dataset, seed=settings.seed)
            floats = [f for f in tflite_formats if f != "tflite-int8"]
            files = converted(tflite_function(model, config.resolution, preprocess_input, tta, storage_size), model,
                              floats) if floats else {}
            if "tflite-int8" in tflite_formats:
                tuned, int8_tuning = int8_tuned_model(run_dir, config, preprocess_input, tta, storage_size, settings,
                                                      dataset, calibration, log)
                files.update(converted(tflite_function(tuned, config.resolution, preprocess_input, tta, storage_size),
                                       tuned, ["tflite-int8"], calibration))
            for fmt in tflite_formats:
                paths[fmt] = tmp / TFLITE_FILES[fmt]
                paths[fmt].write_bytes(files[fmt])
        atomic.write_text(tmp / runtimes.LABELS_FILE, "".join(f"{name}\n" for name in dataset.class_names))
        scored = score_artifacts(paths, dataset, metrics.get("test_accuracy"), settings, log)
        if int8_tuning is not None:
            scored["tflite-int8"]["top_tuning"] = int8_tuning
        # Paths as they will be once the directory is in place.
        records = {fmt: {**r, "path": str(run_dir / "export" / Path(r["path"]).relative_to(tmp))}
                   for fmt, r in scored.items()}
        atomic.write_json(tmp / EXPORTS_FILE, records)
    metrics["exports"] = records
    atomic.write_json(metrics_path, metrics)
    return records


def int8_tuned_model(run_dir, config, preprocess_input, tta, storage_size, settings, dataset, calibration, log):
    """A fresh copy of the trained model with its top fine-tuned on the int8 prefix's
    features (deploy/int8_tuning.py), and that tuning's record."""
    model = load_trained_model(run_dir)
    prefix = converted(prefix_function(model, config.resolution, preprocess_input, tta, storage_size),
                       model, ["tflite-int8"], calibration)["tflite-int8"]
    data = training_data(dataset, settings.validation_fraction, settings.seed, settings.retrain_subset)
    record = fit_top_to_int8_prefix(model, prefix, data, tta, settings.batch_size, settings.seed,
                                    settings.cache_budget_mb, log)
    return model, record


def converted(function, model, formats, calibration=None):
    """{format: `.tflite` bytes} of `function` (raw uint8 in, over `model`)."""
    return {fmt: convert(function, model, fmt, calibration) for fmt in formats}


def _write_saved_model(model, function, directory):
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serving_default", function)
    archive.write_out(str(directory), verbose=False)


def score_artifacts(paths, dataset, keras_accuracy, settings, log=print):
    """{format: record}: each artifact's accuracy through its own runtime, size, sha256,
    latency and whether it passes the run's limits.

    Args:
        paths: {format: the artifact's path}.
        keras_accuracy: The trained Keras model's test accuracy (the drop's reference).
    """
    artifacts = {fmt: runtimes.load(path) for fmt, path in paths.items()}
    one = {}
    records = {}
    for fmt, artifact in artifacts.items():
        correct = total = 0
        for raw, labels in test_inputs(dataset, artifact.input_kind):
            predicted = artifact.predict_all(raw).argmax(axis=1)
            correct += int(np.sum(predicted == labels))
            total += len(labels)
            one.setdefault(artifact.input_kind, raw[:1])
        accuracy = correct / total
        drop = None if keras_accuracy is None else round((keras_accuracy - accuracy) * 100, 3)
        records[fmt] = {
            "format": fmt, "path": str(paths[fmt]), "input": artifact.input_kind,
            "sha256": _sha256(paths[fmt]), "size_kb": round(_size_bytes(paths[fmt]) / 1024, 1),
            "test_accuracy": accuracy, "drop_pp": drop,
        }
    # One fresh process per thread count and input kind; each artifact gets the input it takes.
    # Where the process may run on one CPU only, "all threads" is one thread: timed once.
    threads = {"1_thread": 1, "all_threads": usable_cpus()}
    kinds = {kind: [fmt for fmt, a in artifacts.items() if a.input_kind == kind]
             for kind in sorted({a.input_kind for a in artifacts.values()})}
    jobs = sorted({(count, kind) for count in threads.values() for kind in kinds})
    timings = dict(zip(jobs, runtimes.time_in_fresh_processes([([paths[f] for f in kinds[kind]], one[kind][0], count)
                                                               for count, kind in jobs])))
    for label, count in threads.items():
        for kind, formats in kinds.items():
            for fmt in formats:
                p50, p95 = timings[count, kind][str(paths[fmt])]
                records[fmt][f"latency_ms_p50_{label}"] = round(p50, 3)
                records[fmt][f"latency_ms_p95_{label}"] = round(p95, 3)
    for fmt, record in records.items():
        record["latency_ms_p50"] = record["latency_ms_p50_all_threads"]
        record["latency_ms_p95"] = record["latency_ms_p95_all_threads"]
        problems = limit_violations(record, settings)
        record["status"] = "rejected" if problems else "ok"
        record["rejected_because"] = "; ".join(problems)
        log(f"  {fmt:<12} {record['size_kb']:>9.1f} KB  test accuracy {record['test_accuracy']:.4f} "
            f"(drop {record['drop_pp'] if record['drop_pp'] is not None else float('nan'):+.2f} pp)  "
            f"latency p50 {record['latency_ms_p50_1_thread']:.2f} ms (1 thread), "
            f"{record['latency_ms_p50_all_threads']:.2f} ms (all)  "
            + ("OK" if not problems else f"REJECTED: {record['rejected_because']}"))
    return records


def limit_violations(record, settings):
    """What makes an artifact unfit to ship, as readable reasons (empty: none)."""
    problems = []
    if record["drop_pp"] is not None and record["drop_pp"] > settings.max_accuracy_drop:
        problems.append(f"accuracy drop {record['drop_pp']:.2f} pp > --max-accuracy-drop {settings.max_accuracy_drop:g}")
    # The search's limits, on the artifact's own latency (all threads) and file size.
    limits = Limits(settings.max_latency_ms, settings.max_model_mb)
    return problems + limits.violations(Footprint(record["latency_ms_p50"], record["size_kb"] / 1024))


def _model_files(path):
    path = Path(path)
    if path.is_file():
        return [path]
    # The SavedModel's own files (the directory also holds the other artifacts).
    return sorted([path / "saved_model.pb", path / "fingerprint.pb"] + list((path / "variables").rglob("*"))
                  + list((path / "assets").rglob("*")), key=str)


def _size_bytes(path):
    return sum(f.stat().st_size for f in _model_files(path) if f.is_file())


def _sha256(path):
    """Of the file; of a SavedModel, over its files' relative names and contents."""
    root = Path(path)
    if not root.is_dir():
        return file_sha256(root)
    digest = hashlib.sha256()
    for f in _model_files(path):
        if f.is_file():
            digest.update(str(f.relative_to(root)).encode())
            file_sha256(f, digest)
    return digest.hexdigest()


def check_parity(export_dir, model, raw, resolution, preprocess_input, tta=False, storage_size=None):
    """Compares the reloaded SavedModel's probabilities with the Keras model's on `raw` inputs."""
    reloaded = tf.saved_model.load(str(export_dir)).signatures["serving_default"]
    name = "images" if storage_size is None else "image_bytes"
    served = np.concatenate([
        reloaded(**{name: tf.constant(raw[i : i + 128])})["probabilities"].numpy() for i in range(0, len(raw), 128)
    ])
    expected = np.concatenate([
        predict_probabilities(
            model, model_inputs(tf.constant(raw[i : i + 128]), resolution, preprocess_input, storage_size), tta
        ).numpy()
        for i in range(0, len(raw), 128)
    ])
    diff = float(np.abs(served - expected).max())
    same = bool(np.array_equal(served.argmax(1), expected.argmax(1)))
    return {
        "images": int(len(raw)),
        "max_abs_diff": diff,
        "same_classes": same,
        "passed": diff <= PARITY_TOLERANCE and same,
    }
