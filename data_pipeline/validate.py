"""Every check on raw input. Each failure raises one `DataError(path, fault)`."""

import gzip
import zlib

import numpy as np

from common.errors import DataError

IMAGE_SIDE = 28
IDX_IMAGES_MAGIC = 0x00000803  # unsigned byte, 3 dimensions
IDX_LABELS_MAGIC = 0x00000801  # unsigned byte, 1 dimension


def read_bytes(path):
    """Reads a file, transparently gunzipping `.gz` files.

    Args:
        path: `pathlib.Path` of the file.

    Returns:
        The (decompressed) bytes.
    """
    if not path.exists():
        raise DataError(path, "file not found")
    if not path.is_file():
        raise DataError(path, "not a regular file")
    raw = path.read_bytes()
    if not raw:
        raise DataError(path, "file is empty")
    if path.suffix != ".gz":
        return raw
    if raw[:2] != b"\x1f\x8b":
        raise DataError(path, "not a gzip file (bad magic bytes)")
    try:
        return gzip.decompress(raw)
    except EOFError:
        raise DataError(path, "truncated gzip stream") from None
    except (gzip.BadGzipFile, zlib.error, OSError) as e:
        raise DataError(path, f"corrupt gzip stream ({e})") from None


def parse_idx(path, expect_images):
    """Parses an IDX file of images (N×28×28) or labels (N).

    Args:
        path: `pathlib.Path` of the IDX file (optionally gzipped).
        expect_images: True for an idx3 image file, False for an idx1 label file.

    Returns:
        A uint8 numpy array.
    """
    data = read_bytes(path)
    magic_wanted = IDX_IMAGES_MAGIC if expect_images else IDX_LABELS_MAGIC
    ndim = 3 if expect_images else 1
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise DataError(path, f"too short for an IDX header ({len(data)} bytes)")
    magic = int.from_bytes(data[:4], "big")
    if magic != magic_wanted:
        raise DataError(
            path,
            f"wrong IDX magic 0x{magic:08x}, expected 0x{magic_wanted:08x} "
            f"({'images' if expect_images else 'labels'})",
        )
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    if expect_images and dims[1:] != [IMAGE_SIDE, IMAGE_SIDE]:
        raise DataError(path, f"images are {dims[1]}x{dims[2]}, expected 28x28")
    expected = header_len + int(np.prod(dims))
    if len(data) != expected:
        raise DataError(
            path,
            f"IDX header declares {dims} ({expected} bytes) but the file has {len(data)} bytes"
            + (" (truncated)" if len(data) < expected else ""),
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header_len).reshape(dims)


def as_images(array, path):
    """Validates image data and returns it as a uint8 N×28×28 array.

    Accepts N×28×28, N×784 and N×28×28×1, integer or integral float values 0..255.
    """
    array = np.asarray(array)
    if array.ndim == 4 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 2 and array.shape[1] == IMAGE_SIDE * IMAGE_SIDE:
        array = array.reshape(-1, IMAGE_SIDE, IMAGE_SIDE)
    if array.ndim != 3 or array.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE):
        raise DataError(
            path, f"images have shape {array.shape}, expected N×28×28, N×784 or N×28×28×1"
        )
    if len(array) == 0:
        raise DataError(path, "zero images")
    if array.dtype == np.uint8:
        return array
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise DataError(path, f"images have dtype {array.dtype}, expected numbers 0..255")
    if not np.all(np.isfinite(array)):
        raise DataError(path, "images contain NaN or infinite values")
    if array.min() < 0 or array.max() > 255:
        raise DataError(
            path, f"pixel values range {array.min()}..{array.max()}, expected 0..255"
        )
    if np.issubdtype(array.dtype, np.floating) and np.any(array != np.round(array)):
        raise DataError(path, "pixel values are not integers (expected raw 0..255 bytes)")
    return array.astype(np.uint8)


def as_labels(array, path, count):
    """Validates labels (non-negative integers, one per image) as an int32 vector."""
    array = np.asarray(array)
    if array.ndim == 2 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 1:
        raise DataError(path, f"labels have shape {array.shape}, expected a vector")
    if len(array) != count:
        raise DataError(path, f"{len(array)} labels for {count} images")
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise DataError(path, f"labels have dtype {array.dtype}, expected integers")
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)) or np.any(array != np.round(array)):
            bad = array[~np.isfinite(array) | (array != np.round(array))][0]
            raise DataError(path, f"label {bad} is not an integer")
    if array.min() < 0:
        raise DataError(path, f"negative label {array.min()}")
    if array.max() > np.iinfo(np.int32).max:  # would wrap around in the int32 cast
        raise DataError(path, f"label {array.max()} is too large")
    return array.astype(np.int32)


def check_classes(y_train, y_test, train_path, test_path):
    """Checks labels are 0..K-1 with K ≥ 2 and returns K (inferred from train)."""
    present = np.unique(y_train)
    if len(present) < 2:
        raise DataError(train_path, f"a single class ({present[0]}): need at least 2")
    num_classes = int(present.max()) + 1
    if len(present) < num_classes:
        # The first few absent labels, without building range(K) (K may be huge).
        missing = np.setdiff1d(np.arange(min(num_classes, len(present) + 10)), present)
        raise DataError(
            train_path,
            f"labels must be 0..K-1: classes {missing[:10].tolist()} never occur (max label {num_classes - 1})",
        )
    if y_test.max() >= num_classes:
        raise DataError(
            test_path,
            f"label {int(y_test.max())} out of range: train has classes 0..{num_classes - 1}",
        )
    return num_classes


def read_class_names(path, num_classes):
    """Reads `classes.txt` (one name per line) and checks it has K names."""
    names = [line.strip() for line in path.read_text(errors="replace").splitlines()]
    names = [n for n in names if n]
    if len(names) != num_classes:
        raise DataError(path, f"{len(names)} class names for {num_classes} classes")
    return tuple(names)
