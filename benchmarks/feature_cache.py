"""Feature cache vs end-to-end: the same trial, same seed, same data, timed both ways.

    python benchmarks/feature_cache.py            # all cases, 8 seeds each (~15 min on 2 cores)
    python benchmarks/feature_cache.py --quick    # smaller subsets
    python benchmarks/feature_cache.py --cases smoke_search --smoke-runs 5   # some cases only

Cases:
- head_only: MobileNetV2 α0.5 at 96 px, ImageNet weights, unfrozen_blocks = 0.
- resnet50: ResNet50 at 224 px, random weights, head only, on a small subset.
- partial: MobileNetV2 α0.5 at 96 px, unfrozen_blocks = 3 (the cache holds the cut below).
- smoke_search: a whole `--profile smoke` search with and without the cache (wall time),
  alternating, `--smoke-runs` of each; the medians are compared.

Epoch times are steady-state (the first epoch of each run, which pays tracing and, for
the cache, the one-time feature computation, is reported separately). The last line is
JSON: {"speedup_head_only", "speedup_partial", "speedup_resnet50_224", "accuracy_delta_pp",
"smoke_search_speedup" (the command's median wall time), "smoke_search_stage_speedup" (its
search stage), ...}.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common.tensorflow_env  # noqa: E402,F401  (before TensorFlow: its oneDNN kernels on every x86 CPU)

import keras  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.machine import cpu_description  # noqa: E402
from data_pipeline import load_dataset  # noqa: E402
from data_pipeline.feature_cache import FeatureCache  # noqa: E402
from hypermodel.space import TrialConfig  # noqa: E402
from data_pipeline.splits import TrainingData  # noqa: E402
from hypermodel.model import build_transfer_model  # noqa: E402
from hypermodel.training import train  # noqa: E402
from tuning.jobs import search_data  # noqa: E402
from tuning.settings import Settings  # noqa: E402


class EpochTimer(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.perf_counter()

    def on_train_begin(self, logs=None):
        self.times = []

    def on_epoch_end(self, epoch, logs=None):
        self.times.append(time.perf_counter() - self.start)


def run_trial(cfg, data, epochs, weights, cache, seed):
    timer = EpochTimer()
    model = build_transfer_model(cfg, data.num_classes, weights=weights, seed=seed)
    started = time.perf_counter()
    history, mode = train(model, cfg, data, batch_size=64, seed=seed, epochs=epochs, callbacks=[timer],
                          feature_cache=cache)
    return {
        "mode": mode,
        "total_s": round(time.perf_counter() - started, 2),
        "first_epoch_s": round(timer.times[0], 2),
        "steady_epoch_s": round(sum(timer.times[1:]) / max(1, len(timer.times) - 1), 3),
        "val_accuracy": float(history.history["val_accuracy"][-1]),
    }


def compare(name, cfg, data, epochs, weights, seeds=(0,)):
    """(median steady-epoch speedup, mean validation accuracy delta in pp, deltas per seed,
    the mean's standard error in pp).

    Each seed trains both ways with the same initialisation, batch order and dropout
    draws, and the cache stores the prefix's float32 output, so a pair differs only by
    the kernels' rounding at the two batch sizes (the feature pass runs in 128s). With
    float16 storage, one pair's delta spread −0.47 to +1.30 pp, hence 8 seeds.
    """
    speedups, deltas = [], []
    cache = FeatureCache(None, budget_mb=8192, log=lambda m: None)
    for seed in seeds:
        end_to_end = run_trial(cfg, data, epochs, weights, cache=None, seed=seed)
        cached = run_trial(cfg, data, epochs, weights, cache=cache, seed=seed)
        speedups.append(end_to_end["steady_epoch_s"] / cached["steady_epoch_s"])
        deltas.append(100 * (cached["val_accuracy"] - end_to_end["val_accuracy"]))
        print(f"{name} seed {seed}: end-to-end {end_to_end}\n{name} seed {seed}: cached     {cached}", flush=True)
    speedup, delta = float(np.median(speedups)), float(np.mean(deltas))
    error = float(np.std(deltas, ddof=1) / np.sqrt(len(deltas))) if len(deltas) > 1 else float("nan")
    print(f"{name}: steady epoch speedup {speedup:.1f}x (median of {len(seeds)}), val accuracy delta "
          f"{delta:+.2f} ± {error:.2f} pp (mean ± standard error; per seed "
          f"{', '.join(f'{d:+.2f}' for d in deltas)})", flush=True)
    return speedup, delta, [round(d, 2) for d in deltas], round(error, 2)


def subset(dataset, settings_kwargs):
    settings = Settings(profile="bench", run_dir="-", **settings_kwargs)
    return search_data(dataset, settings)


def smoke_search(cache_flag):
    """(the command's wall seconds, the search stage's seconds from timings.json: the
    same less Python and TensorFlow start-up and loading the data)."""
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        subprocess.run([sys.executable, "search.py", "search", "--profile", "smoke", "--run-dir", f"{tmp}/run",
                        "--time-budget", "0", cache_flag], check=True, capture_output=True,
                       cwd=Path(__file__).resolve().parent.parent)
        wall = time.perf_counter() - started
        return wall, json.loads(Path(f"{tmp}/run/timings.json").read_text())["search"]


CASES = ("head_only", "partial", "resnet50_224", "smoke_search")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", type=int, default=8, help="seeds per comparison (accuracy delta averaged)")
    parser.add_argument("--smoke-runs", type=int, default=3, help="smoke searches of each kind (medians compared)")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    args = parser.parse_args()
    cases = args.cases.split(",")
    if set(cases) - set(CASES):
        parser.error(f"--cases {args.cases!r}: each must be one of {', '.join(CASES)}")
    dataset = load_dataset()
    n_train, n_val = (2000, 1000) if args.quick else (6000, 3000)
    data = subset(dataset, {"train_subset": n_train, "val_subset": n_val})
    mobilenet = dict(backbone="mobilenet_v2_0.5", resolution=96, pooling="avg", dense_units=256, dropout=0.2,
                     learning_rate=1e-3, lr_schedule="cosine", warmup_epochs=0, optimizer="adam",
                     augmentation="none")
    seeds = range(args.seeds)
    results = {}
    if "head_only" in cases:
        (results["speedup_head_only"], results["accuracy_delta_pp"], results["accuracy_delta_pp_per_seed"],
         results["accuracy_delta_pp_stderr"]) = compare(
            "head_only", TrialConfig(unfrozen_blocks=0, **mobilenet), data, epochs=3, weights="imagenet", seeds=seeds)
    if "partial" in cases:
        (results["speedup_partial"], results["accuracy_delta_pp_partial"],
         results["accuracy_delta_pp_partial_per_seed"], results["accuracy_delta_pp_partial_stderr"]) = compare(
            "partial", TrialConfig(unfrozen_blocks=3, **mobilenet), data, epochs=3, weights="imagenet", seeds=seeds)
    if "resnet50_224" in cases:
        small = TrainingData(data.x_train[:300], data.y_train[:300], data.x_val[:100], data.y_val[:100],
                             data.num_classes, key=data.key + "-small")
        resnet = dict(mobilenet, backbone="resnet50", resolution=224)
        results["speedup_resnet50_224"], *_ = compare(
            "resnet50_224", TrialConfig(unfrozen_blocks=0, **resnet), small, epochs=2, weights="none")
    if "smoke_search" in cases:
        results.update(compare_smoke_searches(args.smoke_runs))
    results = {k: round(v, 2) if isinstance(v, float) else v for k, v in results.items()}
    print(json.dumps({**results, "cpu": cpu_description()}))


def compare_smoke_searches(count):
    """`count` smoke searches with and without the cache, alternating (a machine that
    drifts affects both alike); their medians compared."""
    runs = {"--no-feature-cache": [], "--feature-cache": []}
    for _ in range(count):
        for flag, times in runs.items():
            times.append(smoke_search(flag))
    (without, without_stage), (with_cache, with_stage) = (np.median(runs[flag], axis=0) for flag in runs)
    return {
        "smoke_search_s_each": {"without_cache": [round(w, 1) for w, _ in runs["--no-feature-cache"]],
                                "with_cache": [round(w, 1) for w, _ in runs["--feature-cache"]]},
        "smoke_search_s": {"without_cache": round(without, 1), "with_cache": round(with_cache, 1)},
        "smoke_search_speedup": round(without / with_cache, 2),
        "smoke_search_stage_s": {"without_cache": round(without_stage, 1), "with_cache": round(with_stage, 1)},
        "smoke_search_stage_speedup": round(without_stage / with_stage, 2),
    }


if __name__ == "__main__":
    main()
