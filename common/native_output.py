"""Hides what native libraries print straight to the process's stdout/stderr.

TensorFlow Lite's converter and interpreter write progress notes ("fully_quantize: 0 ...",
"Created TensorFlow Lite XNNPACK delegate") from C++, below Python's `sys.stdout`, so
logging settings cannot silence them. `silenced()` points file descriptors 1 and 2 at a
temporary file for the duration of a block and replays the text if the block fails.
TensorFlow's own import prints its start-up notes (oneDNN, CUDA probing) through absl
before any log level applies; `quiet_import_tensorflow()` sends them to /dev/null.
"""

import contextlib
import importlib
import os
import sys
import tempfile


@contextlib.contextmanager
def silenced():
    """Runs the block with fds 1 and 2 captured; on an exception the capture goes to stderr."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as capture:
        os.dup2(capture.fileno(), 1)
        os.dup2(capture.fileno(), 2)
        failed = False
        try:
            yield
        except BaseException:
            failed = True
            raise
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            if failed:
                capture.seek(0)
                sys.stderr.write(capture.read().decode(errors="replace"))
                sys.stderr.flush()


def quiet_import_tensorflow():
    """Imports TensorFlow with fd 2 on /dev/null (what it prints while loading goes
    nowhere; an import error is still raised). Every process the tool starts does this
    before its first TensorFlow import."""
    if "tensorflow" in sys.modules:
        return
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        importlib.import_module("tensorflow")
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
