"""Export: a SavedModel that takes what the user has, checked against the Keras model.

The `serving_default` signature takes, for array datasets, `images` uint8
[batch, 28, 28]; for image-file datasets, `image_bytes` string [batch] of encoded
PNG/JPEG/BMP/GIF files (TensorFlow Serving's convention for images), decoded and
fitted to the storage size inside (data_pipeline/images.py). Either way it does the
RGB conversion, resize and the backbone's preprocessing inside (the same
`prepare_images` the training pipeline uses), so a server needs nothing from this
project. When the retrain found flip test-time augmentation to help on validation,
the signature averages each image's prediction with its mirror's. It returns
`probabilities` float32 [batch, K], `class_id` int64 [batch]
and `class_name` string [batch].
"""

import json
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from common import atomic
from common.errors import UsageError
from data_pipeline.images import decode_batch
from data_pipeline.pipeline import prepare_images
from hypermodel.backbones import get_backbone
from tuning.retrain import flip_images, read_best

PARITY_IMAGES = 512
PARITY_TOLERANCE = 1e-5


class ParityError(RuntimeError):
    """The reloaded SavedModel disagrees with the in-memory model."""


def load_trained_model(run_dir):
    path = Path(run_dir) / "model.keras"
    if not path.is_file():
        raise UsageError(f"{path} not found: run `python search.py retrain` first")
    return keras.models.load_model(path, compile=False, safe_mode=True)


def predict_probabilities(model, images, tta=False):
    """The model's float32 probabilities for preprocessed images, flip-averaged if `tta`."""
    probabilities = tf.cast(model(images, training=False), tf.float32)
    if tta:
        flipped = tf.cast(model(flip_images(images), training=False), tf.float32)
        probabilities = (probabilities + flipped) / 2
    return probabilities


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


def export(run_dir, settings, dataset, log=print):
    """Writes `run_dir/export/` atomically, after a parity check on the reloaded copy.

    Returns:
        The parity record, also stored in metrics.json under "export".
    """
    run_dir = Path(run_dir)
    _, config = read_best(run_dir)
    model = load_trained_model(run_dir)
    backbone = get_backbone(config.backbone)
    metrics_path = run_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    tta = bool(metrics.get("tta", {}).get("used"))  # decided on validation by the retrain
    storage_size = settings.storage_size if dataset.files is not None else None
    serve = serving_function(model, config.resolution, backbone.preprocess_input, dataset.class_names, tta,
                             storage_size)
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serving_default", serve)
    with atomic.directory(run_dir / "export") as tmp:
        archive.write_out(str(tmp), verbose=False)
        parity = check_parity(tmp, model, parity_inputs(dataset), config.resolution, backbone.preprocess_input,
                              tta, storage_size)
        if not parity["passed"]:
            raise ParityError(f"exported model disagrees with the trained one: {parity}")
    metrics["export"] = {"dir": str(run_dir / "export"), "flip_tta": tta, **parity}
    atomic.write_json(metrics_path, metrics)
    log(f"exported {run_dir / 'export'} (parity on {parity['images']} images: max |Δp| "
        f"{parity['max_abs_diff']:.2e}, same classes: {parity['same_classes']})")
    return parity


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
