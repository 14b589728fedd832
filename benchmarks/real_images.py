"""Check: the whole smoke job on a folder of real photographs the tests never see.

Builds a class-per-folder dataset from scikit-image's bundled photographs (needs
`pip install -r benchmarks/requirements.txt`): random crops of five textures and
scenes — brick, grass, gravel (grayscale photos), immunohistochemistry cells and the
Hubble deep field (colour) — of mixed sizes (40–220 px, not square), saved as JPEG,
PNG, BMP, GIF and RGBA PNG in grayscale, RGB and palette modes. Then runs
`python search.py --profile smoke --data DIR` as a user would, scores the exported
SavedModel on the raw test files' bytes (from splits.csv) and compares with
metrics.json and the majority class.

    python benchmarks/real_images.py [--per-class 60] [--keep DIR]

Goals (issue 13): wall ≤ 15 min on 2 cores; |export - metrics.json| ≤ 0.5 pp; test
accuracy clearly above the majority class. The last line printed is JSON:
    {"images", "wall_s", "test_accuracy", "export_accuracy", "majority", "cpu"}
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from benchmarks.folder_pipeline import cpu_description  # noqa: E402

SOURCES = ("brick", "grass", "gravel", "immunohistochemistry", "hubble_deep_field")
SAVES = (("jpg", None), ("png", None), ("bmp", None), ("gif", "P"), ("png", "RGBA"), ("jpg", "L"))


def write_dataset(folder, per_class, seed=0):
    import skimage.data

    rng = np.random.default_rng(seed)
    for source in SOURCES:
        photo = getattr(skimage.data, source)()
        (folder / source).mkdir(parents=True)
        for i in range(per_class):
            width, height = (int(v) for v in rng.integers(40, 221, 2))
            top = int(rng.integers(0, photo.shape[0] - height + 1))
            left = int(rng.integers(0, photo.shape[1] - width + 1))
            crop = np.rot90(photo[top : top + height, left : left + width], k=int(rng.integers(0, 4)))
            image = Image.fromarray(np.ascontiguousarray(crop))
            suffix, mode = SAVES[i % len(SAVES)]
            if mode == "RGBA":
                image = image.convert("RGBA")
                alpha = np.full((image.height, image.width), 255, np.uint8)
                alpha[: image.height // 5] = 0  # a transparent band
                image.putalpha(Image.fromarray(alpha))
            elif mode:
                image = image.convert(mode)
            kwargs = {"quality": int(rng.integers(70, 96))} if suffix == "jpg" else {}
            image.save(folder / source / f"{source}_{i:03d}.{suffix}", **kwargs)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=60)
    parser.add_argument("--keep", help="build the dataset and run dir here and keep them")
    args = parser.parse_args()
    work = Path(args.keep or tempfile.mkdtemp(prefix="real_images_"))
    data, run_dir = work / "textures", work / "run"
    shutil.rmtree(data, ignore_errors=True)
    shutil.rmtree(run_dir, ignore_errors=True)
    write_dataset(data, args.per_class)
    started = time.time()
    result = subprocess.run([sys.executable, str(ROOT / "search.py"), "--profile", "smoke", "--data", str(data),
                             "--run-dir", str(run_dir)], cwd=ROOT, text=True, capture_output=True)
    wall = time.time() - started
    print(result.stdout[-3000:], result.stderr[-2000:], flush=True)
    result.check_returncode()

    import pandas as pd
    import tensorflow as tf

    splits = pd.read_csv(run_dir / "splits.csv")
    test = splits[splits["split"] == "test"]
    serve = tf.saved_model.load(str(run_dir / "export")).signatures["serving_default"]
    names = np.concatenate([
        serve(image_bytes=tf.constant([(data / p).read_bytes() for p in test["path"][i : i + 64]]))["class_name"].numpy()
        for i in range(0, len(test), 64)
    ])
    export_accuracy = float(np.mean([n.decode() for n in names] == test["label"].to_numpy()))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    summary = {
        "images": int(len(splits)),
        "wall_s": round(wall),
        "test_accuracy": metrics["test_accuracy"],
        "export_accuracy": round(export_accuracy, 4),
        "majority": round(float(test["label"].value_counts().max() / len(test)), 4),
        "resolutions": json.loads((run_dir / "config.json").read_text())["settings"]["choices"]["resolutions"],
        "cpu": cpu_description(),
    }
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
