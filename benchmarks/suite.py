"""The suite of real datasets (issue 38): the tool against the probe and the hand recipe, on each.

    python benchmarks/suite.py --list
    python benchmarks/suite.py --build-only                        # build (and cache) every dataset
    python benchmarks/suite.py --datasets digits8,icons --stages probe
    python benchmarks/suite.py                                     # every dataset, every stage

Stages, each scored by this script on the dataset's fixed test split (accuracy,
balanced accuracy, macro-F1, wall time):

- probe: the floor. A logistic regression (scikit-learn) on the global-average-pooled
  features of MobileNetV2 α 0.5 (the vendored ImageNet weights), images letterboxed to
  square. The resolution (RESOLUTIONS) and C (CS) are picked on a validation split
  carved from train by source identity (at most SELECT_TRAIN/SELECT_VAL images), then
  the regression is refit on all of train at that choice.
- hand: the keras-io "Transfer learning & fine-tuning" guide's two phases with its fixed
  settings (benchmarks/hand_recipe_folder.py), given the default job's wall time
  (that of this run, else the one recorded in the dataset's JSON, else --hand-wall-time).
- smoke: `python search.py --profile smoke --data ROOT --run-dir …`.
- default: `python search.py --data ROOT --run-dir …` (up to an hour a dataset).

smoke and default are scored from `python search.py predict --model RUN/export` on the
test files. Results merge into benchmarks/suite_results/<name>.json (one entry per stage,
each with its date, commit and CPU), and a table is printed at the end.
"""

import argparse
import csv
import datetime
import json
import os
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from benchmarks.datasets import DATASETS  # noqa: E402
from benchmarks.datasets.common import (  # noqa: E402
    IMAGE_SUFFIXES, DatasetUnavailable, build_cached, identity_rank)
from benchmarks.machine import cpu_description  # noqa: E402

STAGES = ("probe", "hand", "smoke", "default")
RESULTS = Path(__file__).resolve().parent / "suite_results"
WEIGHTS = ROOT / "weights" / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.5_224_no_top.h5"
RESOLUTIONS = (96, 128, 160, 224)
CS = (0.01, 0.1, 1.0, 10.0)
VALIDATION_FRACTION = 0.2
SELECT_TRAIN, SELECT_VAL = 3000, 1000
BATCH = 64


def lscpu_model():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return None
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), None)


def git_commit():
    out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True)
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def list_split(root, split):
    """(paths, labels, class names) of one split of a built tree, sorted."""
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    paths, labels = [], []
    for index, name in enumerate(classes):
        for path in sorted((root / split / name).iterdir()):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                paths.append(path)
                labels.append(index)
    return paths, np.array(labels), classes


def identity(path):
    """A file's source identity: its name before `__`, else its stem."""
    return path.stem.split("__", 1)[0]


def carve_validation(paths, labels, fraction=VALIDATION_FRACTION):
    """(train indices, validation indices): per class, `fraction` of the identities (sha1-ranked)."""
    by_class = defaultdict(set)
    for path, label in zip(paths, labels):
        by_class[label].add(identity(path))
    held = set()
    for label, identities in by_class.items():
        ranked = sorted(identities, key=lambda i: identity_rank(i, "validation"))
        if len(ranked) >= 2:
            held.update((label, i) for i in ranked[:max(1, round(fraction * len(ranked)))])
    val = np.array([i for i, (p, y) in enumerate(zip(paths, labels)) if (y, identity(p)) in held])
    train = np.setdiff1d(np.arange(len(paths)), val)
    return train, val


def subsample(indices, labels, cap):
    """At most `cap` of `indices`, stratified, the same every run."""
    if len(indices) <= cap:
        return indices
    rng = np.random.default_rng(0)
    keep = []
    for label in np.unique(labels[indices]):
        members = indices[labels[indices] == label]
        keep.extend(rng.permutation(members)[:max(1, int(round(cap * len(members) / len(indices))))])
    return np.sort(np.array(keep))


def background(rgb):
    """The median colour of an image's border: the pad that adds no edge around the object."""
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    return tuple(int(v) for v in np.median(border, axis=0))


def letterbox(path, side):
    """uint8 [side, side, 3]: alpha composited on white, padded to square with the border colour, resized."""
    with Image.open(path) as image:
        image.seek(0)
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            flat = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            flat.alpha_composite(rgba)
            rgb = flat.convert("RGB")
        else:
            rgb = image.convert("RGB")
    pixels = np.asarray(rgb)
    height, width = pixels.shape[:2]
    square = Image.new("RGB", (max(height, width),) * 2, background(pixels))
    square.paste(rgb, ((max(height, width) - width) // 2, (max(height, width) - height) // 2))
    return np.asarray(square.resize((side, side), Image.BICUBIC))


class FeatureExtractor:
    """Pooled MobileNetV2 α 0.5 features at one resolution, cached on disk per file list."""

    def __init__(self, cache):
        self.cache = cache
        self.models = {}
        self.extracted = 0  # images run through the backbone (not read from the cache) in this process

    def model(self, side):
        if side not in self.models:
            import keras

            self.models[side] = keras.applications.MobileNetV2(
                input_shape=(side, side, 3), alpha=0.5, include_top=False, weights=str(WEIGHTS), pooling="avg")
        return self.models[side]

    def __call__(self, paths, side):
        import hashlib

        from keras.applications.mobilenet_v2 import preprocess_input

        key = hashlib.sha1("\n".join(str(p) for p in paths).encode()).hexdigest()[:16]
        cached = self.cache / f"features_{side}_{key}.npy"
        if cached.exists():
            return np.load(cached)
        model, chunks = self.model(side), []
        for start in range(0, len(paths), BATCH):
            batch = np.stack([letterbox(p, side) for p in paths[start:start + BATCH]]).astype(np.float32)
            chunks.append(model.predict_on_batch(preprocess_input(batch)))
        features = np.concatenate(chunks)
        self.extracted += len(paths)
        self.cache.mkdir(parents=True, exist_ok=True)
        np.save(cached, features)
        return features


def scores(truth, predicted):
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

    return {"test_accuracy": round(float(accuracy_score(truth, predicted)), 4),
            "balanced_accuracy": round(float(balanced_accuracy_score(truth, predicted)), 4),
            "macro_f1": round(float(f1_score(truth, predicted, average="macro")), 4),
            "test_images": int(len(truth))}


def fit_probe(features, labels, c):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=3000)).fit(features, labels)


def run_probe(root, meta, resolutions=RESOLUTIONS):
    """The floor: side and C chosen on validation, the regression refit on all of train, scored on test."""
    from threadpoolctl import threadpool_limits

    # Two BLAS threads beside TensorFlow's on 2 busy cores spin against each other: a fit
    # that takes 0.4 s on one thread took 16 s on two.
    with threadpool_limits(1, user_api="blas"):
        return _run_probe(root, meta, resolutions)


def _run_probe(root, meta, resolutions):
    started = time.time()
    train_paths, train_labels, classes = list_split(root, "train")
    test_paths, test_labels, _ = list_split(root, "test")
    fit_idx, val_idx = carve_validation(train_paths, train_labels)
    fit_idx = subsample(fit_idx, train_labels, SELECT_TRAIN)
    val_idx = subsample(val_idx, train_labels, SELECT_VAL)
    extract = FeatureExtractor(root.parent / (root.name + ".features"))
    grid = []
    for side in resolutions:
        fit_x = extract([train_paths[i] for i in fit_idx], side)
        val_x = extract([train_paths[i] for i in val_idx], side)
        for c in CS:
            model = fit_probe(fit_x, train_labels[fit_idx], c)
            grid.append({"resolution": side, "C": c,
                         "val_accuracy": round(float(model.score(val_x, train_labels[val_idx])), 4)})
            print(f"  probe {meta['name']}: {side} px, C {c}: validation {grid[-1]['val_accuracy']:.4f}", flush=True)
    best = max(grid, key=lambda g: (g["val_accuracy"], -g["resolution"], -g["C"]))
    model = fit_probe(extract(train_paths, best["resolution"]), train_labels, best["C"])
    predicted = model.predict(extract(test_paths, best["resolution"]))
    return {**scores(test_labels, predicted), "resolution": best["resolution"], "C": best["C"],
            "val_accuracy": best["val_accuracy"], "validation_images": int(len(val_idx)),
            "selection_train_images": int(len(fit_idx)), "candidates": list(resolutions),
            "extracted_images": extract.extracted, "grid": grid, "wall_s": round(time.time() - started, 1)}


def run_cli_job(root, meta, stage, run_dir, log):
    """Runs search.py on the tree as a user would, then scores its export on the test files."""
    command = [sys.executable, "search.py", "--data", str(root), "--run-dir", str(run_dir)]
    if stage == "smoke":
        command[2:2] = ["--profile", "smoke"]
    if run_dir.exists():  # the same --run-dir would resume the old run, and its wall time would mean nothing
        shutil.rmtree(run_dir)
    started = time.time()
    with open(log, "w") as out:
        code = subprocess.run(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT).returncode
    wall = time.time() - started
    if code != 0:
        return {"error": f"exit {code}; see {log}", "wall_s": round(wall, 1), "command": " ".join(command[1:])}
    test_paths, test_labels, classes = list_split(root, "test")
    predictions = run_dir / "suite_predictions.csv"
    folders = sorted({str(p.parent) for p in test_paths})
    subprocess.run([sys.executable, "search.py", "predict", "--model", str(run_dir / "export"), *folders,
                    "--output", str(predictions)], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    by_file = {}
    with open(predictions) as rows:
        for row in csv.DictReader(rows):
            by_file[Path(row["input"]).resolve()] = row["class_name"]
    index = {name: i for i, name in enumerate(classes)}
    predicted = np.array([index.get(by_file.get(p.resolve()), -1) for p in test_paths])
    result = {**scores(test_labels, predicted), "wall_s": round(wall, 1), "command": " ".join(command[1:]),
              "unpredicted": int((predicted == -1).sum())}
    metrics = run_dir / "metrics.json"
    if metrics.exists():
        result["metrics_json_test_accuracy"] = json.loads(metrics.read_text()).get("test_accuracy")
    return result


def run_hand(root, meta, wall_time, log):
    command = [sys.executable, "benchmarks/hand_recipe_folder.py", "--data", str(root)]
    if wall_time:
        command += ["--wall-time", str(round(wall_time))]
    started = time.time()
    with open(log, "w") as out:
        done = subprocess.run(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=out, text=True)
    wall = time.time() - started
    last = (done.stdout.strip().splitlines() or ["{}"])[-1]
    if done.returncode != 0:
        return {"error": f"exit {done.returncode}; see {log}", "wall_s": round(wall, 1)}
    recipe = json.loads(last)
    predicted = np.array(recipe.pop("test_predictions"))
    _, test_labels, _ = list_split(root, "test")
    return {**scores(test_labels, predicted), **recipe, "wall_s": round(wall, 1), "wall_time_given_s": wall_time}


def load_results(name):
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else {"dataset": name, "stages": {}}


def print_table(rows):
    print(f"\n{'dataset':<13}{'images':>7}{'cls':>5}{'imbal':>7} | " +
          " | ".join(f"{s:^24}" for s in STAGES))
    print(f"{'':<32} | " + " | ".join(f"{'acc':>6}{'bal':>6}{'F1':>6}{'wall s':>6}" for _ in STAGES))
    for record in rows:
        meta = record["meta"]
        cells = []
        for stage in STAGES:
            r = record["stages"].get(stage)
            cells.append(f"{r['test_accuracy']:>6.3f}{r['balanced_accuracy']:>6.3f}{r['macro_f1']:>6.3f}"
                         f"{r['wall_s']:>6.0f}" if r and "test_accuracy" in r else f"{'-':^24}")
        print(f"{meta['name']:<13}{meta['images']:>7}{meta['classes']:>5}{meta['imbalance']:>7} | " + " | ".join(cells))


def print_markdown(metas):
    """The datasets' table (README) from their dataset.json."""
    print("| name | source package | licence | images (train/test) | classes | sides px (min/median/max) "
          "| imbalance | smallest class | covers |")
    print("|---|---|---|---|---|---|---|---|---|")
    for meta in metas:
        licences = sorted({v for v in meta["licence"].values()})
        licence = "; ".join(licences) if len(licences) <= 3 else f"{len(licences)} licences, mostly " + \
            max(licences, key=lambda v: sum(x == v for x in meta["licence"].values()))
        print(f"| {meta['name']} | {meta['source']} | {licence} | {meta['images']} ({meta['train']}/{meta['test']}) "
              f"| {meta['classes']} | {meta['side_min']}/{meta['side_median']}/{meta['side_max']} "
              f"| {meta['imbalance']}:1 | {meta['smallest_class']} | {meta['covers']} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", help=f"comma-separated subset of {','.join(DATASETS)}")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    parser.add_argument("--list", action="store_true", help="list the datasets and exit")
    parser.add_argument("--build-only", action="store_true", help="build (or find cached) datasets and exit")
    parser.add_argument("--markdown", action="store_true",
                        help="build (or find cached) datasets and print their table for datasets/README.md")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the datasets' cached trees")
    parser.add_argument("--resolutions", type=lambda v: tuple(int(x) for x in v.split(",")), default=RESOLUTIONS,
                        help="the probe's candidate sides, comma-separated (default %(default)s)")
    parser.add_argument("--hand-wall-time", type=float,
                        help="seconds for the hand recipe where no default job's wall time is known")
    args = parser.parse_args()
    if args.list:
        for name, module in DATASETS.items():
            print(f"{name:<13} {module.COVERS}\n{'':<13} source: {module.SOURCE}")
        return
    names = args.datasets.split(",") if args.datasets else list(DATASETS)
    stages = args.stages.split(",")
    bad = [n for n in names if n not in DATASETS] + [s for s in stages if s not in STAGES]
    if bad:
        print(f"suite.py: unknown {', '.join(bad)}; datasets: {', '.join(DATASETS)}; stages: {', '.join(STAGES)}",
              file=sys.stderr)
        sys.exit(2)
    machine = {**cpu_description(), "lscpu_model": lscpu_model()}
    commit = git_commit()  # the code this process runs, whatever is committed while it runs
    RESULTS.mkdir(exist_ok=True)
    try:
        built = {name: build_cached(DATASETS[name], rebuild=args.rebuild) for name in names}
    except DatasetUnavailable as error:
        print(f"suite.py: {error}", file=sys.stderr)
        sys.exit(1)
    if args.markdown:
        print_markdown([meta for _, meta in built.values()])
        return
    rows = []
    for name in names:
        root, meta = built[name]
        print(f"{name}: {meta['images']} images ({meta['train']} train, {meta['test']} test), "
              f"{meta['classes']} classes, imbalance {meta['imbalance']}:1, at {root}", flush=True)
        record = load_results(name)
        record["meta"] = {k: v for k, v in meta.items() if k != "per_class"}
        runs = RESULTS / "runs" / name
        for stage in [s for s in ("probe", "smoke", "default", "hand") if s in stages and not args.build_only]:
            print(f"{name}: {stage} …", flush=True)
            runs.mkdir(parents=True, exist_ok=True)
            if stage == "probe":
                result = run_probe(root, meta, args.resolutions)
            elif stage in ("smoke", "default"):
                result = run_cli_job(root, meta, stage, runs / stage, runs / f"{stage}.log")
            else:
                default = record["stages"].get("default", {})
                result = run_hand(root, meta, default.get("wall_s") or args.hand_wall_time, runs / "hand.log")
            result.update(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                          commit=commit, machine=machine)
            record["stages"][stage] = result
            (RESULTS / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")
            print(f"{name}: {stage}: " + json.dumps({k: v for k, v in result.items() if k not in ("grid", "machine")}),
                  flush=True)
        rows.append(record)
    if not args.build_only:
        print_table(rows)
    print(json.dumps({"machine": machine, "datasets": {r["meta"]["name"]: {s: {k: v.get(k) for k in (
        "test_accuracy", "balanced_accuracy", "macro_f1", "wall_s")} for s, v in r["stages"].items()}
        for r in rows}}))


if __name__ == "__main__":
    main()
