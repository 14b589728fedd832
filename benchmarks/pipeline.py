"""Benchmark: can the tf.data pipeline feed a frozen ResNet50, and in how much memory?

Runs the full 60k Fashion-MNIST training set (vendored) through
`data_pipeline.pipeline.make_dataset` at `--size` px (ResNet50 preprocessing,
batch 64, shuffled) for one full pass and reports images/s, then times a frozen
ResNet50 (random weights: the speed does not depend on them) on a few batches of the
same pipeline and reports the images/s it consumes. The pipeline should outpace the
model (ratio >= 3) while the whole process stays small (peak RSS <= 1500 MB): nothing
is materialised at the model's resolution except the batches in flight.

    python benchmarks/pipeline.py --size 224 [--model-batches 6] [--model-batch-size 16] [--naive-estimate]

The last line printed is JSON:
    {"size", "images_per_s", "model_images_per_s", "ratio", "peak_rss_mb"}
"""

import argparse
import ctypes
import gc
import json
import os
import resource
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import psutil  # noqa: E402

GOAL_PEAK_RSS_MB = 1500
GOAL_RATIO = 3.0
TRAIN_IMAGES, CHANNELS, FLOAT32_BYTES = 60000, 3, 4


class PeakRSS:
    """Peak resident memory of this process: a sampling thread plus the kernel's ru_maxrss."""

    def __init__(self, interval=0.02):
        self.interval = interval
        self._process = psutil.Process()
        self.sampled = self._process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(self.interval):
            self.sampled = max(self.sampled, self._process.memory_info().rss)

    def start(self):
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        self._thread.join()

    def now_mb(self):
        return self._process.memory_info().rss / 2**20

    def peak_mb(self):
        # ru_maxrss is in KiB on Linux; it also catches spikes between samples.
        kernel = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
        return max(kernel, self.sampled / 2**20)


def naive_bytes(size, count=TRAIN_IMAGES):
    """What materialising every image resized to size×size×3 float32 would take."""
    return count * size * size * CHANNELS * FLOAT32_BYTES


def time_pipeline(x, y, size, preprocess_input, batch_size):
    from data_pipeline.pipeline import make_dataset

    ds = make_dataset(x, y, size, preprocess_input, batch_size=batch_size, shuffle_seed=0)
    count, started, cpu_started = 0, time.perf_counter(), time.process_time()
    for images, _ in ds:
        count += int(images.shape[0])
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    assert count == len(x), (count, len(x))
    assert tuple(images.shape[1:]) == (size, size, 3), images.shape
    return count, seconds, cpu_seconds


def release_freed_memory():
    """Collects garbage and hands freed heap pages back to the OS (glibc malloc_trim),
    so one phase's freed buffers do not count again in the next phase's RSS."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def time_model(x, y, size, preprocess_input, batch_size, batches):
    """Images/s a frozen ResNet50 (inference mode) consumes, after one warm-up batch.

    CPU inference throughput barely depends on the batch size, but activation memory
    grows with it: at 224 px a batch of 64 alone takes ResNet50 to ~1.5 GB RSS (about
    800 MB of activations over the ~720 MB TensorFlow runtime), hence a default of 16.
    """
    import keras
    import tensorflow as tf

    from data_pipeline.pipeline import make_dataset

    model = keras.applications.ResNet50(weights=None, include_top=False, input_shape=(size, size, 3))
    model.trainable = False
    forward = tf.function(lambda images: model(images, training=False), reduce_retracing=True)

    # Batches come from the same pipeline; they are fetched outside the timed region
    # so only the model is measured.
    need = (batches + 1) * batch_size
    ds = make_dataset(x[:need], y[:need], size, preprocess_input, batch_size=batch_size, shuffle_seed=0)
    iterator = iter(ds)
    warm = next(iterator)[0]
    forward(warm).numpy()  # trace + first run
    del warm
    count, seconds, cpu_seconds = 0, 0.0, 0.0
    for _ in range(batches):
        images = next(iterator)[0]
        started, cpu_started = time.perf_counter(), time.process_time()
        out = forward(images)
        out.numpy()  # block until done
        seconds += time.perf_counter() - started
        cpu_seconds += time.process_time() - cpu_started
        count += int(images.shape[0])
    return count, seconds, cpu_seconds, tuple(out.shape[1:])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=224, help="model input side in px (default 224)")
    parser.add_argument("--model-batches", type=int, default=6,
                        help="batches timed on ResNet50 after one warm-up batch (default 6)")
    parser.add_argument("--batch-size", type=int, default=64, help="pipeline batch size (default 64)")
    parser.add_argument("--model-batch-size", type=int, default=16,
                        help="ResNet50 batch size (default 16: same images/s on a CPU, less activation memory)")
    parser.add_argument("--naive-estimate", action="store_true",
                        help="also print what materialising every resized image would need (not allocated)")
    args = parser.parse_args(argv)

    monitor = PeakRSS().start()
    import keras
    import tensorflow as tf

    from data_pipeline import load_dataset

    preprocess_input = keras.applications.resnet50.preprocess_input
    dataset = load_dataset()
    x, y = dataset.x_train, dataset.y_train
    print(f"data: {len(x)} training images {x.shape[1]}x{x.shape[2]} {x.dtype} "
          f"({x.nbytes / 2**20:.0f} MB raw), size {args.size} px, batch {args.batch_size}; "
          f"TF {tf.__version__}, Keras {keras.__version__}, {os.cpu_count()} CPUs", flush=True)
    print(f"rss after loading: {monitor.now_mb():.0f} MB", flush=True)

    if args.naive_estimate:
        nbytes = naive_bytes(args.size, len(x))
        print(f"naive eager approach (resize all {len(x)} images to {args.size}x{args.size}x3 float32 "
              f"up front): {len(x)}x{args.size}x{args.size}x3x4 B = {nbytes / 2**20:,.0f} MB "
              f"({nbytes / 2**30:.1f} GiB), not allocated", flush=True)

    count, seconds, cpu_seconds = time_pipeline(x, y, args.size, preprocess_input, args.batch_size)
    images_per_s = count / seconds
    pipeline_peak = monitor.peak_mb()
    print(f"pipeline: {count} images in {seconds:.1f} s = {images_per_s:.0f} images/s; "
          f"{cpu_seconds:.0f} CPU s = {count / cpu_seconds:.0f} images per CPU s "
          f"(peak rss so far {pipeline_peak:.0f} MB)", flush=True)
    release_freed_memory()
    print(f"rss after the pipeline pass: {monitor.now_mb():.0f} MB", flush=True)

    m_count, m_seconds, m_cpu_seconds, out_shape = time_model(
        x, y, args.size, preprocess_input, args.model_batch_size, args.model_batches
    )
    model_images_per_s = m_count / m_seconds
    print(f"ResNet50 (frozen, weights=None, training=False) at {args.size} px, batch "
          f"{args.model_batch_size}: {m_count} images in "
          f"{m_seconds:.1f} s = {model_images_per_s:.1f} images/s; {m_cpu_seconds:.0f} CPU s = "
          f"{m_count / m_cpu_seconds:.1f} images per CPU s (output {out_shape})", flush=True)

    monitor.stop()
    peak = monitor.peak_mb()
    ratio = images_per_s / model_images_per_s
    print(f"ratio pipeline/model: {ratio:.1f} (goal >= {GOAL_RATIO:g}: "
          f"{'met' if ratio >= GOAL_RATIO else 'NOT met'}); per CPU second, less sensitive to other "
          f"load on a shared machine: {(count / cpu_seconds) / (m_count / m_cpu_seconds):.1f}")
    print(f"peak rss whole process: {peak:.0f} MB (goal <= {GOAL_PEAK_RSS_MB}: "
          f"{'met' if peak <= GOAL_PEAK_RSS_MB else 'NOT met'})", flush=True)
    print(json.dumps({
        "size": args.size,
        "images_per_s": round(images_per_s, 1),
        "model_images_per_s": round(model_images_per_s, 1),
        "ratio": round(ratio, 2),
        "peak_rss_mb": round(peak, 1),
    }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
