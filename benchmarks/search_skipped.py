"""The default job with its search skipped: a fixed configuration retrained for the whole hour.

    python benchmarks/search_skipped.py                        # the cpu profile's hour, fixed config
    python benchmarks/search_skipped.py --profile smoke        # a quick look
    python benchmarks/search_skipped.py --set resolution=64 --set unfrozen_blocks=17 --set learning_rate=4e-4

Issue 15 goal 3(b): at equal wall time, does the search pay for itself? This runs what
`python search.py` runs, minus the search: the run dir is prepared by a one-trial search
of the fixed configuration (the cheapest way to get a run dir the CLI accepts), the
fixed configuration is written as best_hparams.json, and `search.py retrain` gets the
job's deadline (the profile's `job_time_budget_s` counted from this script's start, so
the minutes the default job spends searching go to phase 2), then `search.py export`.
The export is scored independently on the official test split, as benchmarks/end_to_end.py
does. Last line JSON: {"profile", "config", "cpu_model", "cpu_flags", "wall_s",
"test_accuracy", "setup_s", "retrain_s", "export_s", "epochs_phase2",
"phase2_epoch_s_planned", "run_dir"}.
"""

import argparse
import dataclasses
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.end_to_end import score_export  # noqa: E402
from benchmarks.machine import cpu_description  # noqa: E402
from common import atomic  # noqa: E402
from hypermodel.space import TrialConfig  # noqa: E402
from tuning.profiles import PROFILES  # noqa: E402

# The search's usual winner on every machine so far (benchmarks/RESULTS.md §5), with the
# hand recipe's head and learning rate: what a user would pick without searching.
FIXED = TrialConfig(
    backbone="mobilenet_v2_0.5", resolution=96, unfrozen_blocks=10, pooling="avg", dense_units=256,
    dropout=0.2, learning_rate=1e-3, lr_schedule="cosine", warmup_epochs=0, optimizer="adam",
    augmentation="none",
)


def with_overrides(config, assignments):
    """`config` with each "field=value" of `assignments` applied (typed like the field)."""
    changes, names = {}, [f.name for f in dataclasses.fields(config)]
    for assignment in assignments:
        field, _, value = assignment.partition("=")
        if field not in names or not value:
            raise SystemExit(f"--set {assignment!r}: expected FIELD=VALUE with FIELD one of {', '.join(names)}")
        changes[field] = type(getattr(config, field))(value)
    return dataclasses.replace(config, **changes)


def run(*args):
    command = [sys.executable, "search.py", *map(str, args)]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, cwd=ROOT, check=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="cpu", choices=sorted(PROFILES))
    parser.add_argument("--run-dir", help="default: results/search-skipped-<profile>-<timestamp>")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="change a field of the fixed configuration (repeatable)")
    args = parser.parse_args()
    started = time.time()
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = Path(args.run_dir or ROOT / "results" / f"search-skipped-{args.profile}-{stamp}")
    config = FIXED
    if args.profile == "smoke":  # the smoke profile's only resolution
        config = dataclasses.replace(FIXED, resolution=PROFILES["smoke"]["choices"].resolutions[0], unfrozen_blocks=2)
    config = with_overrides(config, args.set)
    # A space of the fixed configuration alone, one short trial: only to make the run dir.
    run("search", "--profile", args.profile, "--run-dir", run_dir, "--tuner", "random", "--max-trials", 1,
        "--backbones", config.backbone, "--resolutions", config.resolution,
        "--unfrozen-blocks", config.unfrozen_blocks, "--workers", 1, "--train-subset", 512, "--val-subset", 256)
    best_path = run_dir / "best_hparams.json"
    best = json.loads(best_path.read_text())
    best["hyperparameters"] = dataclasses.asdict(config)
    atomic.write_json(best_path, best)
    setup_s = time.time() - started
    job_budget_s = PROFILES[args.profile].get("job_time_budget_s")
    retrain_flags = ["--job-time-budget", f"{max(60, job_budget_s - setup_s):.0f}s"] if job_budget_s else []
    run("retrain", "--run-dir", run_dir, *retrain_flags)
    run("export", "--run-dir", run_dir)
    wall = time.time() - started
    timings = json.loads((run_dir / "timings.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    cpu = cpu_description()
    print(json.dumps({
        "profile": args.profile,
        "config": dataclasses.asdict(config),
        "cpu_model": cpu["model"],
        "cpu_flags": cpu["flags"],
        "wall_s": round(wall, 1),
        "test_accuracy": round(score_export(run_dir / "export"), 4),
        "setup_s": round(setup_s, 1),
        "retrain_s": timings.get("retrain"),
        "export_s": timings.get("export"),
        "epochs_phase2": metrics.get("phase2", {}).get("epochs"),
        "phase2_epoch_s_planned": metrics.get("phase2", {}).get("plan", {}).get("epoch_s"),
        "run_dir": str(run_dir),
    }))


if __name__ == "__main__":
    main()
