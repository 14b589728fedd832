"""The exact linear head's C grid fitted cold (one L-BFGS fit from zero per C) against one
warm-started regularisation path (`LinearProbe.fit_path`, what the tool runs), in the
same process on the same features.

    python benchmarks/linear_head_path.py --datasets fashion,digits8

Features as `benchmarks/linear_head_floor.py` extracts them (MobileNetV2 α 0.5, frozen,
pooled). For each dataset one JSON line: seconds and validation accuracy at each C, both
ways, the ratio of the totals, and the C validation picks each way with its test
accuracy (the two can differ: each fit stops at L-BFGS's tolerance, not at the exact
optimum); then a line with the CPU.
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from benchmarks.linear_head_floor import DATASETS, features  # noqa: E402
from benchmarks.machine import cpu_description  # noqa: E402
from hypermodel.linear_head import INVERSE_L2, LinearProbe  # noqa: E402


def accuracy(features, labels, kernel, bias):
    return round(float(np.mean(np.argmax(features @ kernel + bias, axis=1) == labels)), 4)


def timed_fits(fits, val, val_labels, test, test_labels):
    """([(C, seconds, validation accuracy)], (C, test accuracy) of validation's pick) of an
    iterator of (C, kernel, bias), each fit timed."""
    rows, best, started = [], None, time.perf_counter()
    for c, kernel, bias in fits:
        now = time.perf_counter()
        rows.append((c, round(now - started, 2), accuracy(val, val_labels, kernel, bias)))
        if best is None or rows[-1][2] > best[0]:
            best = (rows[-1][2], c, accuracy(test, test_labels, kernel, bias))
        started = time.perf_counter()
    return rows, best[1:]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--work", default="/tmp/linear_head_floor", help="where image stores are decoded")
    args = parser.parse_args()
    for name in args.datasets.split(","):
        train, train_labels, val, val_labels, test, test_labels, num_classes = features(name, Path(args.work))
        probe = LinearProbe(num_classes)
        scored = (val, val_labels, test, test_labels)
        cold, cold_pick = timed_fits(((c, *probe.fit(train, train_labels, c)) for c in INVERSE_L2), *scored)
        warm, warm_pick = timed_fits(probe.fit_path(train, train_labels, INVERSE_L2), *scored)
        cold_s, warm_s = sum(r[1] for r in cold), sum(r[1] for r in warm)
        print(json.dumps({"dataset": name, "train_images": len(train_labels), "features": train.shape[1],
                          "cold": cold, "path": warm, "cold_s": round(cold_s, 2), "path_s": round(warm_s, 2),
                          "speedup": round(cold_s / warm_s, 2), "cold_pick_C_test": cold_pick,
                          "path_pick_C_test": warm_pick}), flush=True)
    print(json.dumps({"cpu": cpu_description()}))


if __name__ == "__main__":
    main()
