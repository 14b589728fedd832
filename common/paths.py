"""Where the tool finds things on disk, and what a file holds (its sha256)."""

import hashlib
import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def keras_home():
    """Keras' cache root: `$KERAS_HOME`, else `~/.keras` (Keras' own rule).

    Every download and cache lookup of the tool (weights, datasets) goes through here,
    and is passed to `keras.utils.get_file(cache_dir=...)` so Keras agrees.
    """
    return Path(os.environ.get("KERAS_HOME") or Path.home() / ".keras")


def file_sha256(path, digest=None):
    """The sha256 hex digest of a file's bytes, read in chunks; with `digest` (a
    `hashlib` object), its bytes are added to that instead and None returned."""
    with open(path, "rb") as stream:
        if digest is None:
            return hashlib.file_digest(stream, "sha256").hexdigest()
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return None
