"""Benchmark: does process memory grow from trial to trial during a search?

Runs a real search (`tuning.tuner.run_search`: random search, `--trials` trials of one
epoch each) on a few hundred vendored Fashion-MNIST images at 32 px with the
vendored MobileNetV2-0.35 ImageNet weights, into a temporary run directory, and
records the process RSS as each trial's line is printed. The growth is measured from
the end of the warm-up trials (trial 3 by default: TensorFlow, Keras and the tuner
have then allocated what they keep) to the end of the last trial. Goal: <= 200 MB
over 30 trials.

    python benchmarks/trial_memory.py [--feature-cache off|on|both] [--trials 30]

With `both`, each mode runs in its own subprocess (so neither sees the other's
memory) and the harder case — the larger growth — is reported last. The last line
printed is JSON: {"trials": N, "rss_growth_mb": ...}.

Finding (see benchmarks/RESULTS.md): before the fix now in tuning/tuner.py the RSS grew
by 20-45 MB per trial. Each trace of a Keras train step calls `tf.distribute` `all_reduce` on the
gradients (keras/src/backend/tensorflow/optimizer.py `_all_reduce_sum_gradients`),
which in graph mode wraps them in `tf.custom_gradient`; TensorFlow registers that
gradient as "CustomGradient-<uid>" in its global gradient registry
(`tensorflow.python.framework.ops._gradient_registry`) and never removes it, and
its closure pins the whole traced FuncGraph of the step (thousands of ops) for the
life of the process (tensorflow/tensorflow#80895). `keras.backend.clear_session()`
and `gc.collect()`, which KerasTuner already calls before every build, do not
reach it. `TransferTuner` therefore drops, at the end of each trial, the registry
entries created during that trial (`common.shims.forget_custom_gradients`).
"""

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import psutil  # noqa: E402

GOAL_GROWTH_MB = 200


def rss_mb():
    return psutil.Process().memory_info().rss / 2**20


def run_one(args, feature_cache):
    """One search in this process; returns the result dict (also printed as JSON)."""
    from data_pipeline import load_dataset
    from data_pipeline.feature_cache import FeatureCache
    from hypermodel.space import SearchChoices
    from tuning.jobs import search_data
    from tuning.run_dir import prepare_run_dir
    from tuning.settings import Settings
    from tuning.tuner import run_search

    samples = []  # (trial number, rss MB, seconds since start)
    started = time.time()

    def log(message):
        if message.startswith("trial "):
            samples.append((len(samples) + 1, rss_mb(), time.time() - started))
            n, rss, t = samples[-1]
            print(f"[{n:>2}] rss {rss:7.1f} MB  t {t:6.1f} s | {message}", flush=True)
        elif args.verbose_log:
            print(message, flush=True)

    with tempfile.TemporaryDirectory(prefix="trial_memory_") as tmp:
        settings = Settings(
            profile="benchmark",
            run_dir=str(Path(tmp) / "run"),
            tuner="random",
            max_trials=args.trials,
            max_epochs=1,
            train_subset=args.train_subset,
            val_subset=args.val_subset,
            choices=SearchChoices(backbones=(args.backbone,), resolutions=(args.resolution,)),
            weights="imagenet",
            feature_cache=feature_cache,
            max_consecutive_failures=args.trials,
        )
        dataset = load_dataset()
        data = search_data(dataset, settings)
        run_dir = prepare_run_dir(settings, dataset)
        cache = None
        if feature_cache:
            cache = FeatureCache(run_dir / "feature_cache", budget_mb=settings.cache_budget_mb, log=log)
        before = rss_mb()
        print(f"feature cache {'on' if feature_cache else 'off'}: "
              f"{args.trials} random-search trials, "
              f"{args.backbone} @ {args.resolution} px, {len(data.x_train)} train / {len(data.x_val)} val "
              f"images, 1 epoch each; rss before the search {before:.1f} MB", flush=True)
        result = run_search(settings, data, run_dir, feature_cache=cache, log=log)
        gc.collect()
        after = rss_mb()

    if len(samples) <= args.warmup_trials:
        raise SystemExit(f"only {len(samples)} trials ran; need more than the {args.warmup_trials} warm-up trials")
    warm = samples[args.warmup_trials - 1][1]
    last = samples[-1][1]
    growth = last - warm
    per_trial = growth / (len(samples) - args.warmup_trials)
    print(f"trials {len(samples)} ({result['completed']} completed); rss after trial {args.warmup_trials} "
          f"{warm:.1f} MB, after trial {len(samples)} {last:.1f} MB, after the search + gc {after:.1f} MB; "
          f"growth {growth:.1f} MB ({per_trial:.2f} MB/trial; goal <= {GOAL_GROWTH_MB} MB: "
          f"{'met' if growth <= GOAL_GROWTH_MB else 'NOT met'})", flush=True)
    return {"trials": len(samples), "rss_growth_mb": round(growth, 1),
            "feature_cache": "on" if feature_cache else "off"}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--feature-cache", choices=("off", "on", "both"), default="both")
    parser.add_argument("--train-subset", type=int, default=300)
    parser.add_argument("--val-subset", type=int, default=100)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--backbone", default="mobilenet_v2_0.35")
    parser.add_argument("--warmup-trials", type=int, default=3)
    parser.add_argument("--verbose-log", action="store_true", help="also print the tuner's other log lines")
    args = parser.parse_args(argv)

    if args.feature_cache != "both":
        result = run_one(args, args.feature_cache == "on")
        print(json.dumps({"trials": result["trials"], "rss_growth_mb": result["rss_growth_mb"]}), flush=True)
        return 0

    # Each mode in a fresh process: a shared one would carry the first's memory into the second.
    results = []
    base = [
        sys.executable, str(Path(__file__).resolve()), "--trials", str(args.trials),
        "--train-subset", str(args.train_subset), "--val-subset", str(args.val_subset),
        "--resolution", str(args.resolution), "--backbone", args.backbone,
        "--warmup-trials", str(args.warmup_trials),
    ] + (["--verbose-log"] if args.verbose_log else [])
    for mode in ("off", "on"):
        command = base + ["--feature-cache", mode]
        lines = []
        with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as proc:
            for line in proc.stdout:  # streamed, so a long run can be watched
                sys.stdout.write(line)
                sys.stdout.flush()
                lines.append(line)
        if proc.returncode != 0:
            raise SystemExit(f"feature cache {mode}: exit {proc.returncode}")
        last = json.loads(lines[-1])
        results.append((last["rss_growth_mb"], mode, last))
    for growth, mode, last in results:
        print(f"feature cache {mode}: {last['trials']} trials, rss growth {growth:.1f} MB")
    growth, mode, last = max(results, key=lambda r: r[0])
    print(f"harder case: feature cache {mode}")
    print(json.dumps({"trials": last["trials"], "rss_growth_mb": last["rss_growth_mb"]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
