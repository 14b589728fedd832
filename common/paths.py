"""Where the tool finds things on disk."""

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def keras_home():
    """Keras' cache root: `$KERAS_HOME`, else `~/.keras` (Keras' own rule).

    Every download and cache lookup of the tool (weights, datasets) goes through here,
    and is passed to `keras.utils.get_file(cache_dir=...)` so Keras agrees.
    """
    return Path(os.environ.get("KERAS_HOME") or Path.home() / ".keras")
