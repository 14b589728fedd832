"""Benchmark: a folder of JPEG photos larger than RAM allows at 224 px, through the pipeline.

Generates `--images` photo-like JPEGs (default 20 000 at 500×375: smooth gradients,
texture and shapes, quality 90) in class folders, then:
1. first pass: scans and checks the folder, decodes every image once into the image
   store at 224 px (data_pipeline/store.py; RAM budget `--budget-mb`, so a store
   bigger than that is read from disk per batch), then runs one full training pass of
   the tf.data pipeline at 224 px (shuffled, flip+shift augmentation, MobileNetV2
   preprocessing, batch 64);
2. cached pass: the same training pass again, from the store;
3. a frozen MobileNetV2 1.0 forward pass at 224 px on `--model-batches` batches of the
   same pipeline (random weights: speed does not depend on them).
Goals: peak RSS ≤ 2 GB while the decoded set at 224 px is ≥ 5 GB (use --images 34000),
the cached pass ≥ 5× faster than the first, and ≥ 3× faster than the model.

    python benchmarks/folder_pipeline.py [--images 34000] [--folder /tmp/photos] [--keep]

The last line printed is JSON:
    {"images", "decoded_gb_at_224", "first_pass_images_per_s", "cached_pass_images_per_s",
     "model_images_per_s", "cached_vs_first", "cached_vs_model", "peak_rss_mb", "cpu"}
"""

import argparse
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

from benchmarks.machine import cpu_description  # noqa: E402
from benchmarks.pipeline import PeakRSS  # noqa: E402

SIZE, BATCH = 224, 64
CLASSES = 10


def photo(seed, width=500, height=375):
    """A photo-like RGB image: a smooth two-colour gradient, fine texture, a few shapes."""
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    angle = rng.uniform(0, np.pi)
    t = (np.cos(angle) * x + np.sin(angle) * y)[..., None]
    pixels = a * (1 - t) + b * t + rng.normal(0, 12, (height, width, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    pen = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(2, 6))):
        x0, y0 = rng.integers(0, width - 60), rng.integers(0, height - 60)
        w, h = rng.integers(30, 200, 2)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (pen.ellipse if rng.random() < 0.5 else pen.rectangle)((x0, y0, x0 + w, y0 + h), fill=colour)
    return image.filter(ImageFilter.GaussianBlur(0.8))


def _write(args):
    folder, index = args
    path = Path(folder) / f"class_{index % CLASSES}" / f"photo_{index:06d}.jpg"
    photo(index).save(path, quality=90)


def generate(folder, count):
    folder = Path(folder)
    for k in range(CLASSES):
        (folder / f"class_{k}").mkdir(parents=True, exist_ok=True)
    todo = [(str(folder), i) for i in range(count)
            if not (folder / f"class_{i % CLASSES}" / f"photo_{i:06d}.jpg").exists()]
    with multiprocessing.Pool(os.cpu_count()) as pool:
        pool.map(_write, todo, chunksize=64)


def training_pass(images, labels):
    """Seconds for one shuffled, augmented pass over `images` at 224 px."""
    import keras

    from data_pipeline.pipeline import make_dataset

    ds = make_dataset(images, labels, SIZE, keras.applications.mobilenet_v2.preprocess_input, BATCH,
                      shuffle_seed=0, augmentation="flip_shift")
    started = time.perf_counter()
    for _ in ds:
        pass
    return time.perf_counter() - started


def model_images_per_s(images, labels, batches):
    import keras

    from data_pipeline.pipeline import make_dataset

    model = keras.applications.MobileNetV2(input_shape=(SIZE, SIZE, 3), include_top=False, weights=None,
                                           pooling="avg")
    model.trainable = False
    ds = make_dataset(images, labels, SIZE, keras.applications.mobilenet_v2.preprocess_input, BATCH).take(batches + 1)
    timed = 0.0
    for i, (x, _) in enumerate(ds):
        started = time.perf_counter()
        model.predict_on_batch(x)
        if i:  # the first batch traces the model
            timed += time.perf_counter() - started
    return batches * BATCH / timed


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--folder", help="where to generate the JPEGs (default: a temp dir, deleted after)")
    parser.add_argument("--keep", action="store_true", help="keep the generated folder and store")
    parser.add_argument("--budget-mb", type=int, default=1024, help="RAM budget of the image store")
    parser.add_argument("--model-batches", type=int, default=8)
    args = parser.parse_args()

    work = Path(args.folder or tempfile.mkdtemp(prefix="folder_pipeline_"))
    started = time.perf_counter()
    generate(work / "photos", args.images)
    print(f"generated {args.images} JPEGs in {time.perf_counter() - started:.0f} s "
          f"({sum(p.stat().st_size for p in (work / 'photos').rglob('*.jpg')) / 2**30:.2f} GB)", flush=True)
    subprocess.run(["sync"], check=False)

    from data_pipeline import Dataset
    from data_pipeline.folders import scan
    from data_pipeline.store import open_or_build, storage_path

    peak = PeakRSS().start()
    shutil.rmtree(work / "store", ignore_errors=True)
    started = time.perf_counter()
    files = scan(work / "photos")
    scanned = time.perf_counter() - started
    store = open_or_build([f.path for f in files.files], files.checksum, SIZE, work / "store", args.budget_mb)
    built = time.perf_counter() - started
    dataset = Dataset.from_files(files, store)
    images = dataset.x_train
    first_pass = built + training_pass(images, dataset.y_train)
    print(f"first pass: scan {scanned:.0f} s, decode into the store {built - scanned:.0f} s, total {first_pass:.0f} s; "
          f"store in RAM: {store.in_memory}", flush=True)
    cached_pass = training_pass(images, dataset.y_train)
    print(f"cached pass: {cached_pass:.0f} s", flush=True)
    peak.stop()
    pipeline_peak = peak.peak_mb()
    model_rate = model_images_per_s(images, dataset.y_train, args.model_batches)
    count = len(images)
    result = {
        "images": count,
        "decoded_gb_at_224": round(len(files.files) * SIZE * SIZE * 3 / 1e9, 2),
        "store_gb_on_disk": round(storage_path(work / "store", files.checksum, SIZE).stat().st_size / 1e9, 2),
        "first_pass_images_per_s": round(count / first_pass, 1),
        "cached_pass_images_per_s": round(count / cached_pass, 1),
        "model_images_per_s": round(model_rate, 1),
        "cached_vs_first": round(first_pass / cached_pass, 2),
        "cached_vs_model": round(count / cached_pass / model_rate, 2),
        "peak_rss_mb": round(pipeline_peak),  # both passes (the model's own activations come after)
        "cpu": cpu_description(),
    }
    if not args.keep and not args.folder:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
