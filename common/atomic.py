"""Atomic writers: write to a temporary sibling, fsync, then rename over the target.

A reader therefore sees either the old complete file or the new complete one, never
half of one, whenever the process is killed. Temporaries are named
`.<name>.<host>-<pid>.<random>.tmp`, so a leftover can be told apart from another
process's write in progress (`remove_stale_temporaries`).
"""

import contextlib
import json
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

import numpy as np


@contextlib.contextmanager
def exclusive(path):
    """Holds an exclusive lock on the file `path` (created if missing) for the block:
    processes on this host that ask for the same lock wait for it. The lock goes with
    the process, so a killed holder never leaves it taken."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def write_bytes(path, data):
    """Atomically replaces `path` with `data`."""
    with open_for_replace(path) as f:
        f.write(data)


@contextlib.contextmanager
def open_for_replace(path):
    """A binary file to write that replaces `path` only if the block succeeds.

    Example:
        with atomic.open_for_replace(store_path) as f:
            for batch in batches:
                f.write(batch)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temporary_prefix(path), suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_arrays(path, arrays):
    """Atomically replaces `path` with the numpy arrays `arrays`, in order (an .npz)."""
    with open_for_replace(path) as f:
        np.savez(f, *arrays)


def read_arrays(path):
    """The arrays `write_arrays` wrote to `path`, in order."""
    with np.load(path, allow_pickle=False) as stored:
        return [stored[f"arr_{i}"] for i in range(len(stored.files))]


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
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=_temporary_prefix(path), suffix=".tmp"))
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


def _temporary_prefix(path):
    return f".{path.name}.{_HOST}-{os.getpid()}."


_HOST = socket.gethostname().replace(".", "_").replace("-", "_")
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<host>[^.]+)-(?P<pid>\d+)\.[^.]*\.tmp$")


def remove_stale_temporaries(folder):
    """Deletes leftovers of this machine's writers that were killed mid-write.

    Only temporaries whose writer is provably gone are removed: written on this host by
    a process id that no longer runs. Other hosts' temporaries (a shared run dir) and
    live processes' writes in progress are left alone.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return
    for leftover in folder.rglob(".*.tmp"):
        match = _TEMPORARY.match(leftover.name)
        if not match or match["host"] != _HOST or _is_running(int(match["pid"])):
            continue
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def _is_running(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
