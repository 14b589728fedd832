"""`search.py predict`: classify images with any exported artifact (no project code needed
by the models themselves; this is just a convenient client).

`--model` is a SavedModel directory (`export/`) or a `.tflite` file; each runs on its
own runtime (deploy/runtimes.py), and all print the same lines. Models exported from
image files take PNG/JPEG/BMP/GIF files, or folders of them (the SavedModel gets their
bytes; a `.tflite` file gets them decoded and letterboxed as in training). Models
exported from 28×28 arrays take `images`: image files are converted to grayscale
28×28, and IDX/CSV/NPY files of such arrays are read as they are. Every input is
checked before the model is loaded.
"""

import csv
import io
from pathlib import Path

import numpy as np

from common import atomic
from common.errors import DataError
from data_pipeline import validate
from data_pipeline.folders import IMAGE_SUFFIXES, check_image

ARRAY_SUFFIXES = (".npy", ".csv")


def expand_inputs(paths):
    """Files as given, folders as their image files (recursively, sorted; hidden ones skipped)."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not found:
                raise DataError(path, "folder has no PNG, JPEG, BMP or GIF images")
            files += found
        elif not path.is_file():
            raise DataError(path, "file not found")
        else:
            files.append(path)
    return files


def check_inputs(files):
    """Checks every input file before any model is loaded."""
    for path in files:
        suffix = path.suffix.lower()
        if suffix in IMAGE_SUFFIXES:
            check_image(path)
        elif suffix in ARRAY_SUFFIXES or "idx3" in path.name:
            read_arrays(path)
        else:
            raise DataError(path, f"unsupported input type '{suffix}': use PNG, JPEG, BMP, GIF, NPY, CSV or an idx3 file")


def read_arrays(path):
    """An array input → uint8 N×28×28: NPY (N×28×28 / N×784 / 28×28), CSV rows of 784
    pixels (optional `label` column), or an idx3 image file."""
    if path.suffix.lower() == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise DataError(path, f"not a valid .npy file ({e})") from None
        return validate.as_images(array[np.newaxis] if array.shape == (28, 28) else array, path)
    if path.suffix.lower() == ".csv":
        return _read_csv_images(path)
    return validate.parse_idx(path, expect_images=True)


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


def as_gray_28(path):
    """An image file → uint8 1×28×28 (Fashion-MNIST style: for models trained on such arrays)."""
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("L").resize((28, 28), Image.BILINEAR), dtype=np.uint8)[np.newaxis]


def model_batches(files, input_kind):
    """(names, raw inputs) per file for the model's input kind (raw: see `runtimes.as_inputs`)."""
    for path in files:
        if input_kind in ("image_bytes", "pixels"):
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                raise DataError(path, "this model was trained on image files: give PNG, JPEG, BMP or GIF files")
            yield [str(path)], np.array([path.read_bytes()], dtype=object)
        elif path.suffix.lower() in IMAGE_SUFFIXES:
            yield [str(path)], as_gray_28(path)
        else:
            images = read_arrays(path)
            yield [f"{path}[{i}]" for i in range(len(images))], images


def predict(model_dir, paths, output=None, log=print, before_tensorflow=lambda: None):
    """Prints (and optionally writes) input, class name and confidence for every image.

    Args:
        before_tensorflow: Called after the inputs are checked, before TensorFlow loads;
            a `.tflite` file given arrays needs no TensorFlow (LiteRT runs it).
    """
    files = expand_inputs(paths)
    check_inputs(files)
    from deploy import runtimes

    if not runtimes.is_tflite(model_dir):
        before_tensorflow()
    artifact = runtimes.load(model_dir)
    if artifact.input_kind == "pixels":
        before_tensorflow()  # image files are decoded and letterboxed by TensorFlow
    names, inputs = [], []
    for batch_names, batch in model_batches(files, artifact.input_kind):
        names += batch_names
        inputs.append(batch)
    inputs = runtimes.as_inputs(artifact, np.concatenate(inputs))
    probabilities = artifact.predict_all(inputs)
    rows = [
        {"input": name, "class_name": artifact.class_names[k], "confidence": float(p[k])}
        for name, p, k in zip(names, probabilities, probabilities.argmax(axis=1))
    ]
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
