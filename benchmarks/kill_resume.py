"""Kill -9 the whole smoke job at random moments, rerun it, and count what each kill lost.

    python benchmarks/kill_resume.py [--kills 5] [--seed 0] [--at 0.6 0.8]

First an uninterrupted run measures the job's wall time T. Then, for each kill, a fresh
job is SIGKILLed (whole process group) at a random moment in its own slice of
(0.05 T, 0.95 T), so the kills spread over the search, the retrain, the export and the
report, and the same command is rerun. For
each kill it prints the stage that was interrupted, how many trials had finished
(kept), how many were in flight (lost and redone; the goal is at most 1), and whether
the rerun finished with a consistent leaderboard. The last line is JSON.
"""

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent


def job(run_dir):
    return subprocess.Popen(
        [sys.executable, "search.py", "--profile", "smoke", "--run-dir", str(run_dir)], cwd=ROOT,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
    )


def trial_states(run_dir):
    states = {}
    for path in Path(run_dir, "tuner").glob("trial_*/trial.json"):
        try:
            trial = json.loads(path.read_text())
            states[trial["trial_id"]] = trial["status"]
        except (OSError, ValueError):
            states[path.parent.name[len("trial_"):]] = "UNREADABLE"
    return states


def stage(run_dir):
    run_dir = Path(run_dir)
    if (run_dir / "report.md").exists():
        return "done"
    if (run_dir / "export").exists():
        return "report"
    if (run_dir / "metrics.json").exists():
        return "export"
    timings = run_dir / "timings.json"
    if any((run_dir / "tensorboard" / "retrain").glob("*")) or (timings.exists() and "search" in timings.read_text()):
        return "retrain"
    return "search"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--at", type=float, nargs="+", help="kill at these fractions of T instead")
    args = parser.parse_args()
    if args.at:
        args.kills = len(args.at)
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        started = time.time()
        assert job(Path(tmp) / "reference").wait() == 0
        total = time.time() - started
        print(f"uninterrupted job: {total:.0f} s", flush=True)
        results = []
        for i in range(args.kills):
            run_dir = Path(tmp) / f"kill{i}"
            at = (args.at[i] if args.at else 0.05 + 0.9 * (i + rng.random()) / args.kills) * total
            process = job(run_dir)
            time.sleep(at)
            interrupted = stage(run_dir)
            states = trial_states(run_dir)
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            kept = sorted(t for t, s in states.items() if s == "COMPLETED")
            in_flight = sorted(t for t, s in states.items() if s != "COMPLETED")
            rerun = job(run_dir).wait()
            board = pd.read_csv(run_dir / "leaderboard.csv", dtype={"trial_id": str})
            metrics = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").exists() else {}
            result = {
                "kill_at_s": round(at, 1), "stage": interrupted, "trials_kept": len(kept),
                "trials_lost": len(in_flight), "rerun_exit": rerun,
                "leaderboard_consistent": bool(board["trial_id"].is_unique and set(kept) <= set(board["trial_id"])
                                               and set(board["status"]) == {"COMPLETED"}),
                "export_parity": bool(metrics.get("export", {}).get("passed")),
            }
            results.append(result)
            print(json.dumps(result), flush=True)
    print(json.dumps({
        "kills": len(results), "max_trials_lost": max(r["trials_lost"] for r in results),
        "all_reruns_finished": all(r["rerun_exit"] == 0 and r["export_parity"] for r in results),
        "all_consistent": all(r["leaderboard_consistent"] for r in results),
        "stages": [r["stage"] for r in results],
    }))


if __name__ == "__main__":
    main()
