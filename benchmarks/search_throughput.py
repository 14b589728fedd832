"""Trials per search minute: this commit's cpu-profile search against another commit's, same machine.

    python benchmarks/search_throughput.py --baseline 1060ba7            # 2 × 6 min searches
    python benchmarks/search_throughput.py --baseline 1060ba7 --budget 3m
    python benchmarks/search_throughput.py --baseline 1060ba7 --seeds 2 --keep results/throughput

Each side runs from its own `git worktree` (committed code only: `--current` defaults to
HEAD), one after the other so they never share the CPU:
    python search.py search --profile cpu --time-budget BUDGET --seed S --run-dir <tmp>
(S = 0, 1, ... for `--seeds`; one seed's best accuracy is one draw of configurations)
and is read back from its run dir: trials ended, trials per minute of search wall time,
the best validation accuracy and, where the commit records it (`trials/*.json`
"breakdown"), the median per-trial seconds by where they went. A trial's overhead is
its cost less its training and validation steps. The last line is JSON:
{"baseline": {...}, "current": {...}, "trials_per_min_ratio", "best_val_accuracy_delta", "cpu"}; with
several seeds each side holds "per_seed" and the means, and the ratio and delta are of the means.
"""

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.machine import cpu_description  # noqa: E402

BUCKETS = ("build", "weights", "footprint", "features", "trace", "train", "validate", "checkpoint", "tensorboard",
           "between_steps", "other")


def worktree(revision, folder):
    subprocess.run(["git", "worktree", "add", "--detach", "--force", str(folder), revision], cwd=ROOT, check=True,
                   capture_output=True)
    return folder


def search(checkout, run_dir, budget, seed):
    command = [sys.executable, "search.py", "search", "--profile", "cpu", "--time-budget", budget, "--seed", str(seed),
               "--run-dir", str(run_dir)]
    started = time.time()
    subprocess.run(command, cwd=checkout, check=True, capture_output=True, text=True)
    return time.time() - started


def summarise(run_dir, wall_s):
    board = pd.read_csv(run_dir / "leaderboard.csv", dtype={"trial_id": str})
    search_s = json.loads((run_dir / "timings.json").read_text())["search"]
    records = [json.loads(p.read_text()) for p in sorted((run_dir / "trials").glob("*.json"))]
    summary = {
        "trials": int(len(board)),
        "completed": int((board["status"] == "COMPLETED").sum()),
        "search_s": search_s,
        "wall_s": round(wall_s, 1),
        "trials_per_min": round(len(board) / (search_s / 60), 3),
        "best_val_accuracy": float(board["val_accuracy"].max()),
        "median_trial_s": statistics.median(r["seconds"] for r in records),
        "epochs": int(board["epochs"].sum()),
    }
    broken_down = [r["breakdown"] for r in records if r.get("breakdown")]
    if broken_down:
        summary["median_trial_overhead_s"] = round(statistics.median(
            r["seconds"] - r["breakdown"].get("train", 0) - r["breakdown"].get("validate", 0)
            for r in records if r.get("breakdown")), 2)
        summary["overhead_breakdown"] = {
            key: round(statistics.median(b.get(key, 0.0) for b in broken_down), 2) for key in BUCKETS}
        summary["total_seconds_by_stage"] = {
            key: round(sum(b.get(key, 0.0) for b in broken_down), 1) for key in BUCKETS}
    return summary


def means(runs):
    """Several seeds' summaries as their means, each kept under "per_seed"."""
    mean = {key: round(statistics.mean(r[key] for r in runs), 4)
            for key in ("trials", "search_s", "trials_per_min", "best_val_accuracy", "median_trial_s")}
    return {**mean, "per_seed": runs}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, help="the commit to compare against")
    parser.add_argument("--current", default="HEAD")
    parser.add_argument("--budget", default="6m", help="each search's --time-budget")
    parser.add_argument("--seeds", type=int, default=1, help="searches per side, seeds 0..N-1")
    parser.add_argument("--keep", help="copy each search's leaderboard.csv and trials/ here")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(prefix="throughput_") as tmp:
        for name, revision in (("baseline", args.baseline), ("current", args.current)):
            checkout = worktree(revision, Path(tmp) / f"src_{name}")
            try:
                runs = []
                for seed in range(args.seeds):
                    run_dir = Path(tmp) / f"run_{name}_seed{seed}"
                    wall = search(checkout, run_dir, args.budget, seed)
                    runs.append({"seed": seed, **summarise(run_dir, wall)})
                    print(json.dumps({name: runs[-1]}), flush=True)
                    if args.keep:
                        kept = Path(args.keep) / f"{name}_seed{seed}"
                        shutil.copytree(run_dir / "trials", kept / "trials", dirs_exist_ok=True)
                        shutil.copy(run_dir / "leaderboard.csv", kept / "leaderboard.csv")
                results[name] = {"revision": revision, **(runs[0] if len(runs) == 1 else means(runs))}
            finally:
                subprocess.run(["git", "worktree", "remove", "--force", str(checkout)], cwd=ROOT, check=False)
    print(json.dumps({
        **results,
        "trials_per_min_ratio": round(results["current"]["trials_per_min"] / results["baseline"]["trials_per_min"], 2),
        "best_val_accuracy_delta": round(results["current"]["best_val_accuracy"]
                                         - results["baseline"]["best_val_accuracy"], 4),
        "budget": args.budget,
        "cpu": cpu_description(),
    }))


if __name__ == "__main__":
    main()
