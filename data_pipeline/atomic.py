"""Atomic writers: write to a temporary sibling, fsync, then rename over the target.

A reader therefore sees either the old complete file or the new complete one, never
half of one, whenever the process is killed.
"""

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path


def write_bytes(path, data):
    """Atomically replaces `path` with `data`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text(path, text):
    write_bytes(path, text.encode("utf-8"))


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_jsonable) + "\n")


def _jsonable(value):
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


@contextlib.contextmanager
def directory(path):
    """Yields a temporary directory that replaces `path` only if the block succeeds.

    Example:
        with atomic.directory(run_dir / "export") as tmp:
            save_everything_into(tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_stale_temporaries(folder):
    """Deletes leftovers of writers that were killed mid-write (`.name.*.tmp`)."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for leftover in folder.rglob(".*.tmp"):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def make_keras_tuner_json_atomic():
    """Routes KerasTuner's JSON writes (trial.json, oracle.json, tuner0.json) through
    `write_json`, so a kill mid-write never leaves a truncated file that breaks resume."""
    from keras_tuner.src import utils as kt_utils

    def save_json(path, obj):
        text = json.dumps(obj)
        write_text(path, text)
        return text

    kt_utils.save_json = save_json
