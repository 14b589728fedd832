"""The image store: file images decoded once, at one storage size, as uint8 RGB.

Decoding a folder of JPEGs is the expensive part of reading it, so it happens once
per (dataset content, storage size): the pixels are written to a file in the run dir
(atomically, temp + rename), reused by every trial, the retrain and resumed runs, and
rebuilt only when the dataset's checksum or the storage size changes. The store is
held in RAM while it fits a budget; beyond it, batches are read from the file as they
are needed (positional reads, not a memory map, so the process's memory stays bounded
by the batch rather than growing with every page touched).
"""

import json
import os
from pathlib import Path

import numpy as np

from common import atomic
from common.errors import DataError


class ImageStore:
    """uint8 [count, size, size, 3] pixels, in RAM or read from a file per batch.

    Args:
        path: The store's pixel file.
        count, size: Its shape.
        in_memory: Load the whole file into RAM.
    """

    def __init__(self, path, count, size, in_memory):
        self.path = Path(path)
        self.shape = (count, size, size, 3)
        self.row_bytes = size * size * 3
        self.array = np.fromfile(self.path, dtype=np.uint8).reshape(self.shape) if in_memory else None
        self._fd = None if in_memory else os.open(self.path, os.O_RDONLY)

    @property
    def in_memory(self):
        return self.array is not None

    def read(self, rows):
        """The images at `rows` (any order, repeats allowed), as a new uint8 array."""
        rows = np.asarray(rows, dtype=np.int64)
        if self.array is not None:
            return self.array[rows]
        out = np.empty((len(rows), *self.shape[1:]), dtype=np.uint8)
        flat = out.reshape(len(rows), self.row_bytes)
        for i in np.argsort(rows, kind="stable"):  # ascending offsets read fastest
            flat[i] = np.frombuffer(os.pread(self._fd, self.row_bytes, int(rows[i]) * self.row_bytes), np.uint8)
        return out

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)


class StoredImages:
    """Rows of an `ImageStore`, indexed like a numpy array without copying pixels.

    `view[indices]` and `view[a:b]` are views; `view[i]` and `np.asarray(view)` read pixels.
    """

    def __init__(self, store, rows):
        self.store = store
        self.rows = np.asarray(rows, dtype=np.int64)

    dtype = np.dtype(np.uint8)
    ndim = 4

    @property
    def shape(self):
        return (len(self.rows), *self.store.shape[1:])

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer)):
            return self.store.read([self.rows[key]])[0]
        return StoredImages(self.store, self.rows[key])

    def __array__(self, dtype=None, copy=None):
        array = self.store.read(self.rows)
        return array if dtype is None else array.astype(dtype)

    def gather(self, positions):
        """uint8 pixels of the view's images at `positions`."""
        return self.store.read(self.rows[positions])


def storage_path(directory, checksum, size):
    return Path(directory) / f"{checksum[:16]}-{size}px.u8"


def open_or_build(paths, checksum, size, directory, budget_mb, log=print):
    """The store of `paths` (in this order) at `size` px, built if not on disk yet.

    Args:
        paths: Image files, in the order their rows get.
        checksum: The dataset's content checksum (the store's key, with `size`).
        size: Storage side in px.
        directory: Where the store lives (the run dir's `image_store/`).
        budget_mb: Hold the store in RAM only if it is at most this big.

    Returns:
        An `ImageStore`.
    """
    path = storage_path(directory, checksum, size)
    meta = {"checksum": checksum, "size": size, "count": len(paths), "padding": "border colour"}
    if not _is_complete(path, meta):
        _build(paths, size, path, log)
        atomic.write_json(path.with_suffix(".json"), meta)
    else:
        log(f"image store: reusing {path} ({len(paths)} images at {size} px)")
    nbytes = len(paths) * size * size * 3
    return ImageStore(path, len(paths), size, in_memory=nbytes <= budget_mb * 2**20)


def _is_complete(path, meta):
    try:
        return (json.loads(path.with_suffix(".json").read_text()) == meta
                and path.stat().st_size == meta["count"] * meta["size"] ** 2 * 3)
    except (OSError, ValueError):
        return False


def _build(paths, size, path, log):
    import tensorflow as tf

    from data_pipeline.images import decode_square

    log(f"image store: decoding {len(paths)} images to {size}×{size} RGB (once) → {path}")
    decode = lambda file: decode_square(tf.io.read_file(file), size)  # noqa: E731
    ds = tf.data.Dataset.from_tensor_slices([str(p) for p in paths])
    ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE).batch(64).prefetch(2)
    written = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic.open_for_replace(path) as out:
        try:
            for batch in ds:
                out.write(batch.numpy().tobytes())
                written += len(batch)
        except tf.errors.InvalidArgumentError:
            _raise_for_undecodable(paths[written:], size)
            raise


def _raise_for_undecodable(paths, size):
    """Names the first file TensorFlow cannot decode (the batch it was in failed as a whole)."""
    import tensorflow as tf

    from data_pipeline.images import decode_square

    for file in paths:
        try:
            decode_square(tf.io.read_file(str(file)), size)
        except tf.errors.InvalidArgumentError as e:
            raise DataError(file, f"cannot be decoded ({e.message.splitlines()[0]})") from None
