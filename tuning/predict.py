"""`search.py predict`: classify images with an exported SavedModel (no project code needed
by the model itself; this is just a convenient client)."""

import csv
import io
from pathlib import Path

import numpy as np

from common import atomic
from data_pipeline import validate
from common.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def load_inputs(paths):
    """Reads every input into (names, uint8 N×28×28), refusing bad files before any work."""
    names, batches = [], []
    for path in map(Path, paths):
        images = read_images(path)
        batches.append(images)
        names += [str(path)] if len(images) == 1 and path.suffix.lower() in IMAGE_SUFFIXES else [
            f"{path}[{i}]" for i in range(len(images))
        ]
    return names, np.concatenate(batches)


def read_images(path):
    """One input file → uint8 N×28×28.

    PNG/JPEG: converted to grayscale and resized to 28×28 (Fashion-MNIST images are
    light objects on a black background). IDX (.gz or raw): an idx3 image file.
    CSV: rows of 784 pixels, with an optional `label` column. NPY: N×28×28 / N×784.
    """
    if not path.is_file():
        raise DataError(path, "file not found")
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as image:
                gray = image.convert("L").resize((28, 28), Image.BILINEAR)
                return np.asarray(gray, dtype=np.uint8)[np.newaxis]
        except (UnidentifiedImageError, OSError) as e:
            raise DataError(path, f"not a readable {suffix[1:].upper()} image ({e})") from None
    if suffix == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise DataError(path, f"not a valid .npy file ({e})") from None
        return validate.as_images(array[np.newaxis] if array.shape == (28, 28) else array, path)
    if suffix == ".csv":
        return _read_csv_images(path)
    if "idx3" in path.name:
        return validate.parse_idx(path, expect_images=True)
    raise DataError(path, f"unsupported input type '{suffix}': use PNG, JPEG, NPY, CSV or an idx3 file")


def _read_csv_images(path):
    import pandas as pd

    try:
        frame = pd.read_csv(path)
    except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as e:
        raise DataError(path, f"not a valid CSV file ({str(e).splitlines()[0]})") from None
    frame = frame.drop(columns=[c for c in frame.columns if str(c).strip() == "label"])
    if frame.isna().any().any():
        raise DataError(path, "empty or missing pixel values")
    try:
        values = frame.to_numpy(dtype=np.float64)
    except ValueError:
        raise DataError(path, "non-numeric pixel values") from None
    return validate.as_images(values, path)


def load_serving(model_dir):
    """The exported `serving_default` signature, after checking it is one of ours."""
    import tensorflow as tf

    model_dir = Path(model_dir)
    if not (model_dir / "saved_model.pb").is_file():
        raise DataError(model_dir, "not a SavedModel directory (no saved_model.pb): pass a run's export/")
    try:
        serve = tf.saved_model.load(str(model_dir)).signatures["serving_default"]
    except (KeyError, OSError, ValueError) as e:
        raise DataError(model_dir, f"unreadable SavedModel ({e})") from None
    spec = serve.structured_input_signature[1].get("images")
    if spec is None or spec.dtype != tf.uint8:
        raise DataError(model_dir, "serving_default does not take uint8 `images`: not exported by this tool")
    return serve


def predict(model_dir, paths, output=None, log=print, before_model=None):
    """Prints (and optionally writes) input, class name and confidence for every image.

    Args:
        before_model: Called after the inputs are validated, before TensorFlow loads.
    """
    names, images = load_inputs(paths)
    if before_model is not None:
        before_model()
    import tensorflow as tf

    serve = load_serving(model_dir)
    rows = []
    for start in range(0, len(images), 256):
        out = serve(images=tf.constant(images[start : start + 256]))
        for i, (name, confidence) in enumerate(
            zip(out["class_name"].numpy(), out["probabilities"].numpy().max(axis=1))
        ):
            rows.append({"input": names[start + i], "class_name": name.decode(), "confidence": float(confidence)})
    width = max(len(r["input"]) for r in rows)
    for r in rows:
        log(f"{r['input']:<{width}}  {r['class_name']:<14} {r['confidence']:.4f}")
    if output:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=["input", "class_name", "confidence"])
        writer.writeheader()
        writer.writerows(rows)
        atomic.write_text(output, buffer.getvalue())
    return rows
