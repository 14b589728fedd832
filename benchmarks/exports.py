"""Every export format of a finished run: size, test accuracy through its own runtime, latency.

    python benchmarks/exports.py RUN_DIR     # e.g. the default job's results/<run>

Re-exports RUN_DIR with the committed code (`python search.py export --run-dir RUN_DIR`,
all formats: each artifact scored on the whole test split by its own runtime and timed
at batch 1 in fresh processes), then prints one JSON line per artifact and a last line
with the goals of the issue that added the LiteRT exports:
    tflite-int8: file ≤ 30 % of the SavedModel's variables, drop ≤ 0.5 pp, latency p50
                 at least 1.5× lower than the SavedModel's (batch 1, all threads);
    tflite-fp16: drop ≤ 0.1 pp.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.machine import cpu_description  # noqa: E402

FIELDS = ("format", "size_kb", "test_accuracy", "drop_pp", "latency_ms_p50", "latency_ms_p95",
          "latency_ms_p50_1_thread", "latency_ms_p95_1_thread", "status")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    args = parser.parse_args()
    started = time.time()
    subprocess.run([sys.executable, "search.py", "export", "--run-dir", str(args.run_dir)], cwd=ROOT, check=True)
    export_s = time.time() - started
    exports = json.loads((args.run_dir / "export" / "exports.json").read_text())
    for record in exports.values():
        print(json.dumps({k: record[k] for k in FIELDS}))
    variables_kb = sum(f.stat().st_size for f in (args.run_dir / "export" / "variables").iterdir()) / 1024
    int8, fp16, saved = exports["tflite-int8"], exports["tflite-fp16"], exports["savedmodel"]
    goals = {
        "int8_size_vs_savedmodel_variables": round(int8["size_kb"] / variables_kb, 3),
        "int8_drop_pp": int8["drop_pp"],
        "int8_speedup_p50_vs_savedmodel": round(saved["latency_ms_p50"] / int8["latency_ms_p50"], 2),
        "int8_speedup_p50_vs_savedmodel_1_thread": round(
            saved["latency_ms_p50_1_thread"] / int8["latency_ms_p50_1_thread"], 2),
        "fp16_drop_pp": fp16["drop_pp"],
    }
    goals["met"] = (goals["int8_size_vs_savedmodel_variables"] <= 0.30 and int8["drop_pp"] <= 0.5
                    and goals["int8_speedup_p50_vs_savedmodel"] >= 1.5 and fp16["drop_pp"] <= 0.1)
    print(json.dumps({"run_dir": str(args.run_dir), "export_s": round(export_s, 1),
                      "savedmodel_variables_kb": round(variables_kb, 1), "goals": goals, "cpu": cpu_description()}))


if __name__ == "__main__":
    main()
