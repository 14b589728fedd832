"""Runs an exported artifact through its own runtime: the SavedModel through
`tf.saved_model.load`, a `.tflite` file through the LiteRT interpreter (`ai-edge-litert`).

Every artifact is loaded as an `Artifact`, which says what input it takes and returns
class probabilities, so scoring, latency and `search.py predict` treat all formats alike.
Inputs, by `input_kind`:
    "images":      uint8 [batch, 28, 28] (array datasets, every format);
    "image_bytes": encoded image files, tf.string [batch] (SavedModels of image files);
    "pixels":      uint8 [batch, S, S, 3], the files decoded and letterboxed to the
                   store's side S (`.tflite` of image files: LiteRT has no image decoder).
Class names come with the artifact: the SavedModel returns them, a `.tflite` file has
`labels.txt` beside it (the usual LiteRT convention).

Run as `python -m deploy.runtimes --threads N --input X.npy ARTIFACT...` to time artifacts
in a fresh process with N threads (TensorFlow fixes its thread pools at start-up): it
loads them, prints "ready", and times them once a line arrives on its stdin.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from common import native_output
from common.cpus import usable_cpus
from common.errors import DataError

LABELS_FILE = "labels.txt"
TFLITE_BATCH = 64
LATENCY_CALLS = 200
LATENCY_WARMUP = 20
READY = "ready"  # a latency process's line once loaded
LATENCY_TIMEOUT_S = 300  # for all of a measurement's processes: loading and timing take seconds each


class Artifact:
    """An exported model, called through its own runtime.

    Attributes:
        path: The SavedModel directory or `.tflite` file.
        input_kind: "images", "image_bytes" or "pixels" (see the module docstring).
        pixel_size: S for "pixels" inputs, else None.
        class_names: The class names, in output order.
    """

    def probabilities(self, inputs):
        """float32 [batch, K] for a batch of inputs of this artifact's kind."""
        raise NotImplementedError

    def predict_all(self, inputs, batch_size=TFLITE_BATCH):
        """Probabilities for any number of inputs, in batches."""
        return np.concatenate([self.probabilities(inputs[i : i + batch_size]) for i in range(0, len(inputs), batch_size)])


class SavedModelArtifact(Artifact):
    """A SavedModel's `serving_default` on TensorFlow."""

    def __init__(self, path):
        import tensorflow as tf

        self.path = Path(path)
        if not (self.path / "saved_model.pb").is_file():
            raise DataError(self.path, "not a SavedModel directory (no saved_model.pb): pass a run's export/")
        try:
            self._serve = tf.saved_model.load(str(self.path)).signatures["serving_default"]
        except (KeyError, OSError, ValueError) as e:
            raise DataError(self.path, f"unreadable SavedModel ({e})") from None
        inputs = self._serve.structured_input_signature[1]
        if "image_bytes" in inputs and inputs["image_bytes"].dtype == tf.string:
            self.input_kind = "image_bytes"
        elif "images" in inputs and inputs["images"].dtype == tf.uint8:
            self.input_kind = "images"
        else:
            raise DataError(self.path, "serving_default takes neither `images` nor `image_bytes`: not exported by this tool")
        self.pixel_size = None
        self.class_names = _read_labels(self.path)

    def probabilities(self, inputs):
        import tensorflow as tf

        return self._serve(**{self.input_kind: tf.constant(inputs)})["probabilities"].numpy()


class LiteRtModel:
    """A `.tflite` model (a file or bytes) on the LiteRT interpreter: a batch of any size
    in, its first output out.

    Args:
        threads: CPU threads (default: all).
        model: `model_path=` or `model_content=`, as the interpreter takes them.
    """

    def __init__(self, threads=None, **model):
        from ai_edge_litert.interpreter import Interpreter

        with native_output.silenced():  # "Created TensorFlow Lite XNNPACK delegate for CPU."
            self._interpreter = Interpreter(**model, num_threads=threads or usable_cpus())
        (self.input,) = self._interpreter.get_input_details()
        self._output = self._interpreter.get_output_details()[0]
        self._batch = None

    def __call__(self, inputs):
        inputs = np.ascontiguousarray(inputs, dtype=self.input["dtype"])
        if self._batch != len(inputs):
            self._interpreter.resize_tensor_input(self.input["index"], [len(inputs), *inputs.shape[1:]])
            with native_output.silenced():
                self._interpreter.allocate_tensors()
            self._batch = len(inputs)
        self._interpreter.set_tensor(self.input["index"], inputs)
        self._interpreter.invoke()
        return self._interpreter.get_tensor(self._output["index"]).copy()


class TfliteArtifact(Artifact):
    """A `.tflite` file on the LiteRT interpreter (XNNPACK, `threads` CPU threads)."""

    def __init__(self, path, threads=None):
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(self.path, "file not found")
        try:
            self._model = LiteRtModel(threads, model_path=str(self.path))
        except ValueError as e:
            raise DataError(self.path, f"not a valid .tflite model ({str(e).splitlines()[0]})") from None
        source = self._model.input
        shape = list(source["shape_signature"])
        if source["dtype"] != np.uint8 or shape[1:] not in ([28, 28],) and not (
            len(shape) == 4 and shape[1] == shape[2] and shape[3] == 3
        ):
            raise DataError(self.path, f"input {source['dtype'].__name__} {shape}: not exported by this tool")
        self.input_kind = "images" if len(shape) == 3 else "pixels"
        self.pixel_size = int(shape[1]) if self.input_kind == "pixels" else None
        self.class_names = _read_labels(self.path.parent)

    def probabilities(self, inputs):
        return self._model(inputs)


def load(path, threads=None):
    """The artifact at `path`: a `.tflite` file, else a SavedModel directory."""
    return TfliteArtifact(path, threads) if is_tflite(path) else SavedModelArtifact(path)


def is_tflite(path):
    return Path(path).suffix == ".tflite"


def _read_labels(folder):
    path = Path(folder) / LABELS_FILE
    if not path.is_file():
        raise DataError(path, "missing: an exported model keeps its class names there")
    return path.read_text().splitlines()


def as_inputs(artifact, raw):
    """Raw user inputs (uint8 28×28 arrays, or encoded file bytes) → this artifact's input."""
    if artifact.input_kind != "pixels":
        return raw
    import tensorflow as tf

    from data_pipeline.images import decode_batch

    return np.concatenate([
        decode_batch(tf.constant(raw[i : i + 256]), artifact.pixel_size).numpy() for i in range(0, len(raw), 256)
    ])


def single_image_latency(artifact, one_input, calls=LATENCY_CALLS, warmup=LATENCY_WARMUP):
    """(p50, p95) milliseconds of one call on a batch of one, after `warmup` calls."""
    for _ in range(warmup):
        artifact.probabilities(one_input)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        artifact.probabilities(one_input)
        times.append((time.perf_counter() - start) * 1000)
    return float(np.percentile(times, 50)), float(np.percentile(times, 95))


class LatencyProcess:
    """A fresh process that loads `paths` with `threads` threads, then times each of them
    on one input when told to (`time_in_fresh_processes` starts several at once).

    Args:
        paths: Artifacts taking the same kind of input.
        one_input: One input of that kind.
        threads: The process's CPU threads (TensorFlow fixes its pools at start-up).
        folder: Where the input and the process's stderr are kept.
    """

    def __init__(self, paths, one_input, threads, folder):
        import subprocess

        sample = Path(folder) / f"input_{id(self)}.npy"
        np.save(sample, np.array([one_input], dtype=object if isinstance(one_input, bytes) else None),
                allow_pickle=isinstance(one_input, bytes))
        self._stderr = open(Path(folder) / f"stderr_{id(self)}.txt", "w+")  # a file: a full pipe would block it
        self._killed_because = None
        self._process = subprocess.Popen(
            [sys.executable, "-m", "deploy.runtimes", "--threads", str(threads), "--input", str(sample),
             *map(str, paths)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, text=True,
            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"), cwd=Path(__file__).resolve().parents[1],
        )

    def wait_until_ready(self):
        for line in self._process.stdout:
            if line.strip() == READY:
                return
        self._fail()  # it ended before it was ready

    def time(self):
        """{path: (p50, p95)}, timed now (nothing else should be running)."""
        try:
            self._process.stdin.write("go\n")
            self._process.stdin.close()
        except BrokenPipeError:
            self._fail()
        out = self._process.stdout.read()
        if self._process.wait() != 0 or not out.strip():
            self._fail()
        return {path: tuple(value) for path, value in json.loads(out.strip().splitlines()[-1]).items()}

    def kill(self, why=None):
        """Ends the process (from any thread); `why` goes into the measurement's error."""
        self._killed_because = self._killed_because or why
        if self._process.poll() is None:
            self._process.kill()

    def stop(self):
        self.kill()
        self._process.wait()
        self._stderr.close()

    def _fail(self):
        self.kill()
        self._process.wait()
        self._stderr.seek(0)
        why = self._killed_because or f"exit {self._process.returncode}"
        raise RuntimeError(f"latency measurement failed ({why}):\n"
                           f"{self._stderr.read()[-3000:]}")


def time_in_fresh_processes(jobs, timeout_s=LATENCY_TIMEOUT_S):
    """[{path: (p50, p95)}] for each (paths, one_input, threads) job, each timed by its own
    fresh process.

    The processes start together, so their start-ups (importing TensorFlow, loading the
    artifacts: seconds each) overlap; then they time one at a time, the others idle.
    Processes still running after `timeout_s` are killed, and the measurement fails.
    """
    import tempfile
    import threading

    with tempfile.TemporaryDirectory() as folder:
        processes = [LatencyProcess(*job, folder) for job in jobs]
        watchdog = threading.Timer(timeout_s, lambda: [process.kill(f"still running after {timeout_s} s")
                                                       for process in processes])
        watchdog.start()
        try:
            for process in processes:
                process.wait_until_ready()
            return [process.time() for process in processes]
        finally:
            watchdog.cancel()
            for process in processes:
                process.stop()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--input", required=True, help=".npy holding a batch of one input")
    parser.add_argument("artifacts", nargs="+")
    args = parser.parse_args(argv)
    if not all(map(is_tflite, args.artifacts)):  # LiteRT alone needs no TensorFlow
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    raw = np.load(args.input, allow_pickle=True)
    artifacts = {path: load(path, threads=args.threads) for path in args.artifacts}
    for artifact in artifacts.values():
        artifact.probabilities(raw)  # traces or allocates now, not while timed
    print(READY, flush=True)
    sys.stdin.readline()  # "go": the other processes are idle
    print(json.dumps({path: single_image_latency(artifact, raw) for path, artifact in artifacts.items()}))


if __name__ == "__main__":
    main()
