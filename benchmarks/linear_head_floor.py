"""The exact linear head's spread floor: float accuracy, and what per-class int8 rounding of
its weights (how the converter stores a Dense layer) leaves of it.

    python benchmarks/linear_head_floor.py --datasets fashion,stamps,icons16,digits8

For each dataset: MobileNetV2 α 0.5's frozen pooled features at the dataset's side, a
validation split carved from train (Fashion-MNIST: a 3 000/1 000 slice, and its first
2 000 test images), and for each floor (`hypermodel.linear_head.SPREAD_FLOOR`, a share of
the median feature's spread) a linear head fitted cold at each C, C chosen on validation. Test
accuracy in float and with the kernel rounded per class to int8. One JSON line each, then
a summary line with the CPU. The suite's datasets are built by `benchmarks/suite.py
--build-only` (in ~/.cache/transfer-tuner/suite).
"""

import argparse
import json
import os
import sys
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

import hypermodel.linear_head as linear_head  # noqa: E402
from benchmarks.machine import cpu_description  # noqa: E402
from data_pipeline import load_dataset  # noqa: E402
from data_pipeline.splits import training_data  # noqa: E402
from hypermodel.model import build_transfer_model  # noqa: E402
from hypermodel.space import TrialConfig  # noqa: E402
from tuning.jobs import materialize  # noqa: E402

SUITE = Path.home() / ".cache" / "transfer-tuner" / "suite"
# (path, side searched, side stored): each set at a side its probe chose or the tool searches.
DATASETS = {
    "fashion": (None, 96, 28),
    "stamps": (SUITE / "stamps", 160, 160),
    "icons16": (SUITE / "icons16", 224, 16),
    "digits8": (SUITE / "digits8", 160, 32),
}


def int8_rounded(kernel):
    """`kernel` rounded per output column to 255 symmetric levels of its largest weight."""
    step = np.abs(kernel).max(axis=0) / 127 + 1e-12
    return np.round(kernel / step) * step


def features(name, work):
    path, side, stored = DATASETS[name]
    source = load_dataset(path)
    dataset = materialize(source, types.SimpleNamespace(storage_size=stored, image_budget_mb=4096), work / name)
    subset = dict(train_subset=3000, val_subset=1000) if name == "fashion" else {}
    data = training_data(dataset, 0.2, 0, **subset)
    count = 2000 if name == "fashion" else len(dataset.y_test)
    config = TrialConfig("mobilenet_v2_0.5", side, 0, "avg", 64, 0.0, 1e-3, "constant", 0, "adam", "none",
                         head="linear")
    model = build_transfer_model(config, dataset.num_classes, "imagenet", 0)
    extract = lambda images: linear_head.pooled_features(model, config, images, 64)  # noqa: E731
    return (extract(data.x_train), data.y_train, extract(data.x_val), data.y_val,
            extract(dataset.x_test[:count]), dataset.y_test[:count], dataset.num_classes)


def best_head(train, train_labels, val, val_labels, num_classes):
    best = None
    for c in linear_head.INVERSE_L2:
        kernel, bias = linear_head.LinearProbe(num_classes).fit(train, train_labels, c)
        score = float(np.mean(np.argmax(val @ kernel + bias, axis=1) == val_labels))
        if best is None or score > best[0]:
            best = (score, c, kernel, bias)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--floors", default="0.1,0.3,1.0")
    parser.add_argument("--work", default="/tmp/linear_head_floor", help="where image stores are decoded")
    args = parser.parse_args()
    rows = []
    for name in args.datasets.split(","):
        train, train_labels, val, val_labels, test, test_labels, num_classes = features(name, Path(args.work))
        for floor in map(float, args.floors.split(",")):
            linear_head.SPREAD_FLOOR = floor
            score, c, kernel, bias = best_head(train, train_labels, val, val_labels, num_classes)
            accuracy = lambda k: round(float(np.mean(np.argmax(test @ k + bias, axis=1) == test_labels)), 4)  # noqa: E731
            weights = np.abs(kernel)
            row = {"dataset": name, "floor": floor, "C": c, "val_accuracy": round(score, 4),
                   "test_float": accuracy(kernel), "test_int8_weights": accuracy(int8_rounded(kernel)),
                   "weights_rounded_to_zero": round(float(np.mean(weights < weights.max(axis=0) / 254)), 3)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(json.dumps({"cpu": cpu_description(), "rows": len(rows)}))


if __name__ == "__main__":
    main()
