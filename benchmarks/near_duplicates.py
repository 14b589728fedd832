"""Can near-duplicates be told apart from other images of their class, so that a
validation split keeps them on one side? Measured on a suite dataset whose files name
their source: the same icon at two sizes (`edit-copy__oxygen_32.png`, `…_48.png`) is a
pair of "size twins".

    python benchmarks/near_duplicates.py --dataset icons

For each training image, within its class: the distance to its nearest size twin and to
its nearest other image, by two signatures: 16×16 grayscale thumbnails (RMS difference,
pixels in 0–1) and pooled MobileNetV2 α 0.5 features at 96 px (cosine distance). A
signature that separates them catches most twins at a threshold under which few other
images have a neighbour. One JSON line per signature: the percentiles of both distances
and, at thresholds catching 50–90 % of the twins, the share of other images paired too;
then the CPU.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from benchmarks.machine import cpu_description  # noqa: E402
from benchmarks.datasets.common import cache_root  # noqa: E402
from benchmarks.suite import FeatureExtractor, letterbox, list_split  # noqa: E402


def twin_key(path):
    """The source and its variant without the size: `edit-copy__oxygen_32` → `edit-copy__oxygen`."""
    return path.stem.rsplit("_", 1)[0]


def nearest_distances(signatures, labels, keys, distance):
    """(to the nearest size twin, to the nearest other image) for each image with both, within its class."""
    twins, others = [], []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        d = distance(signatures[members])
        np.fill_diagonal(d, np.inf)
        same = np.equal.outer(keys[members], keys[members])
        for row in range(len(members)):
            twin, other = d[row][same[row]], d[row][~same[row]]
            if np.isfinite(twin).any() and len(other):
                twins.append(twin.min())
                others.append(other.min())
    return np.array(twins), np.array(others)


def rms(thumbnails):
    return np.sqrt(np.maximum(((thumbnails[:, None] - thumbnails[None]) ** 2).mean(-1), 0))


def cosine(features):
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    return 1 - unit @ unit.T


def summary(name, twins, others):
    thresholds = np.percentile(twins, [50, 70, 90])
    return {"signature": name, "images": len(twins),
            "twin_distance_p50_p90": [round(float(v), 3) for v in np.percentile(twins, [50, 90])],
            "other_nearest_p10_p50": [round(float(v), 3) for v in np.percentile(others, [10, 50])],
            "at_threshold": [{"threshold": round(float(t), 3), "twins_caught": round(float(np.mean(twins < t)), 2),
                              "others_paired": round(float(np.mean(others < t)), 3)} for t in thresholds]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="icons")
    args = parser.parse_args()
    root = cache_root() / args.dataset
    paths, labels, _ = list_split(root, "train")
    labels, keys = np.asarray(labels), np.array([twin_key(p) for p in paths])
    gray = np.stack([letterbox(p, 16).mean(axis=-1).ravel() / 255 for p in paths])
    features = FeatureExtractor(root.parent / (root.name + ".features"))(paths, 96)
    for name, signatures, distance in (("thumbnail_16px_rms", gray, rms), ("features_96px_cosine", features, cosine)):
        print(json.dumps({"dataset": args.dataset, **summary(name, *nearest_distances(signatures, labels, keys,
                                                                                        distance))}))
    print(json.dumps({"cpu": cpu_description()}))


if __name__ == "__main__":
    main()
