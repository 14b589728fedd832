"""The default job (or a named profile) from a clean run dir, scored independently.

    python benchmarks/end_to_end.py                       # the default job: python search.py
    python benchmarks/end_to_end.py --profile smoke
    python benchmarks/end_to_end.py --profile cpu -- --time-budget 20m   # extra flags after --

Runs `python search.py [--profile P] --run-dir <fresh dir>` as a user would, then loads
the exported SavedModel itself and scores it on the official test split (not trusting
metrics.json). The last line is JSON: {"profile", "cpu_model", "cpu_flags", "wall_s",
"test_accuracy", "search_s", "retrain_s", "export_s", "trials", "epochs_phase2",
"phase2_epoch_s_planned", "exports": {format: {"test_accuracy", "drop_pp", "size_kb"}}}.
"""

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.machine import cpu_description  # noqa: E402


def score_export(export_dir):
    import numpy as np
    import tensorflow as tf

    from data_pipeline import load_dataset

    dataset = load_dataset()
    serve = tf.saved_model.load(str(export_dir)).signatures["serving_default"]
    predicted = np.concatenate([
        serve(images=tf.constant(dataset.x_test[i : i + 500]))["class_id"].numpy()
        for i in range(0, len(dataset.x_test), 500)
    ])
    return float(np.mean(predicted == dataset.y_test))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", help="default: none given, i.e. what `python search.py` picks")
    parser.add_argument("--run-dir", help="default: results/e2e-<profile>-<timestamp>")
    parser.add_argument("extra", nargs="*", help="more search.py flags (after --)")
    args = parser.parse_args()
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = Path(args.run_dir or ROOT / "results" / f"e2e-{args.profile or 'default'}-{stamp}")
    command = [sys.executable, "search.py", "--run-dir", str(run_dir), *args.extra]
    if args.profile:
        command[2:2] = ["--profile", args.profile]
    print("$", " ".join(command), flush=True)
    started = time.time()
    subprocess.run(command, cwd=ROOT, check=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    wall = time.time() - started
    config = json.loads((run_dir / "config.json").read_text())
    timings = json.loads((run_dir / "timings.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    trials = sum(1 for _ in open(run_dir / "leaderboard.csv")) - 1
    cpu = cpu_description()
    print(json.dumps({
        "profile": config["settings"]["profile"],
        "cpu_model": cpu["model"],
        "cpu_flags": cpu["flags"],
        "wall_s": round(wall, 1),
        "test_accuracy": round(score_export(run_dir / "export"), 4),
        "search_s": timings.get("search"),
        "retrain_s": timings.get("retrain"),
        "export_s": timings.get("export"),
        "trials": trials,
        "epochs_phase2": metrics.get("phase2", {}).get("epochs"),
        "phase2_epoch_s_planned": metrics.get("phase2", {}).get("plan", {}).get("epoch_s"),
        "exports": {fmt: {k: r[k] for k in ("test_accuracy", "drop_pp", "size_kb")}
                    for fmt, r in metrics.get("exports", {}).items()},
        "run_dir": str(run_dir),
    }))


if __name__ == "__main__":
    main()
