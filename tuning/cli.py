"""Command-line parsing and dispatch for search.py. Known user errors → one line, exit 2."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's C++ start-up chatter out

import argparse
import dataclasses
import re
import sys
from pathlib import Path

from data_pipeline.errors import UsageError, UserError

COMMANDS = ("data", "search", "retrain", "export", "report", "predict", "tensorboard")


def main(argv):
    args = build_parser().parse_args(argv)
    try:
        return dispatch(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        return 130


def build_parser():
    run = argparse.ArgumentParser(add_help=False)
    run.add_argument("--run-dir", help="run directory (default for a new run: results/<timestamp>)")
    run.add_argument("--data", help="IDX folder, CSV folder or .npz file (default: vendored Fashion-MNIST)")
    run.add_argument("-v", "--verbose", action="count", default=0, help="Keras progress output")

    search = argparse.ArgumentParser(add_help=False)
    search.add_argument("--profile", choices=["smoke", "cpu", "gpu"], help="default: gpu if a GPU is visible, else cpu")
    search.add_argument("--overwrite", action="store_true", help="start afresh in an existing --run-dir")
    search.add_argument("--seed", type=int, default=None)
    search.add_argument("--weights", choices=["imagenet", "none"], default=None)
    search.add_argument("--backbones", type=_names, help="comma-separated registry names")
    search.add_argument("--resolutions", type=_ints, help="comma-separated input sizes, 32..299")
    search.add_argument("--unfrozen-blocks", type=_ints, help="comma-separated choices, 0 = head only")
    search.add_argument("--learning-rate", type=_floats, help="MIN,MAX of the log-uniform learning-rate range")
    search.add_argument("--tuner", choices=["hyperband", "random", "bayesian"])
    search.add_argument("--max-epochs", type=int)
    search.add_argument("--factor", type=int)
    search.add_argument("--hyperband-iterations", type=int)
    search.add_argument("--max-trials", type=int, help="trials for random/bayesian")
    search.add_argument("--time-budget", type=_duration, help="search budget: 90s, 45m, 2h; 0 = none")
    search.add_argument("--batch-size", type=int)
    search.add_argument("--train-subset", type=int, help="training images used (0 = all)")
    search.add_argument("--val-subset", type=int, help="validation images used (0 = all)")
    search.add_argument("--retrain-subset", type=int, help="training images of the final retrain (0 = all)")
    search.add_argument("--validation-fraction", type=float)
    search.add_argument("--feature-cache", action=argparse.BooleanOptionalAction, default=None)
    search.add_argument("--cache-budget", type=int, help="feature cache budget in MB")
    search.add_argument("--epochs", type=int, help="retrain: epochs of each phase (default: from the search)")
    search.add_argument("--job-time-budget", type=_duration,
                        help="whole job: the retrain's last phase gets as many epochs as fit in it; 0 = none")
    search.add_argument("--distributed", choices=["chief", "worker"],
                        help="KerasTuner distributed mode: the chief serves the oracle, workers run trials")
    search.add_argument("--oracle", help="HOST:PORT of the chief's oracle (default 127.0.0.1:8000)")
    search.add_argument("--worker-id", help="this worker's name (its `worker` column in the leaderboard)")
    search.add_argument("--worker-timeout", type=_duration,
                        help="chief: fail a trial whose worker has not reported for this long (default 30m)")
    search.add_argument("--strategy", choices=["none", "mirrored", "auto"],
                        help="tf.distribute strategy each trial trains under (default none)")

    parser = argparse.ArgumentParser(
        prog="search.py", parents=[run, search],
        description="Transfer-learning hyperparameter search. No command: search → retrain → export → report.",
    )
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("data", parents=[run], help="load, validate and summarise a dataset")
    sub.add_parser("search", parents=[run, search], help="run or resume the hyperparameter search")
    sub.add_parser("retrain", parents=[run, search], help="two-phase retrain of the best configuration")
    sub.add_parser("export", parents=[run], help="export the retrained model as a SavedModel")
    sub.add_parser("report", parents=[run], help="write report.md and plots")
    predict = sub.add_parser("predict", help="classify images with an exported model")
    predict.add_argument("--model", required=True, help="an export/ directory (SavedModel)")
    predict.add_argument("--output", help="also write the predictions to this CSV")
    predict.add_argument("inputs", nargs="+", help="PNG/JPEG files, or IDX/CSV/NPY files of images")
    board = sub.add_parser("tensorboard", parents=[run], help="serve the run's TensorBoard on 127.0.0.1")
    board.add_argument("--port", type=int, default=6006)
    board.add_argument("--host", default="127.0.0.1")
    return parser


def _names(text):
    return tuple(n.strip() for n in text.split(",") if n.strip())


def _ints(text):
    try:
        return tuple(int(n) for n in text.split(",") if n.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _floats(text):
    try:
        values = tuple(float(n) for n in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 2 or not 0 < values[0] < values[1]:
        raise argparse.ArgumentTypeError(f"expected MIN,MAX with 0 < MIN < MAX, got {text!r}")
    return values


def _duration(text):
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"expected a duration like 90s, 45m or 2h, got {text!r}")
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[match.group(2)]


def quiet_import_tensorflow():
    """Imports TensorFlow with its native start-up logging (printed to fd 2 before any
    log level applies: CUDA probing, CPU features) sent to /dev/null."""
    if "tensorflow" in sys.modules:
        return
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        import tensorflow  # noqa: F401
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def dispatch(args):
    from tuning import jobs

    if args.command == "data":
        return jobs.show_data(args.data)
    if args.command == "predict":
        return jobs.predict(args.model, args.inputs, args.output, before_model=quiet_import_tensorflow)
    quiet_import_tensorflow()
    if args.command == "tensorboard":
        return jobs.tensorboard(_existing_run_dir(args), args.host, args.port)
    if args.command in ("export", "report"):
        return getattr(jobs, args.command)(_existing_run_dir(args))
    if args.command == "retrain":
        return jobs.retrain(_existing_run_dir(args), epochs=args.epochs, verbose=args.verbose)
    settings = resolve_settings(args)
    if args.command == "search":
        return jobs.search(settings, overwrite=args.overwrite)
    return jobs.whole_job(settings, overwrite=args.overwrite)


def _existing_run_dir(args):
    if args.run_dir:
        return Path(args.run_dir)
    runs = sorted(p.parent for p in Path("results").glob("*/config.json"))
    if not runs:
        raise UsageError("no run found in results/: pass --run-dir or run `python search.py search` first")
    return runs[-1]


def resolve_settings(args):
    """Profile defaults, overridden by every flag the user gave."""
    from hypermodel.backbones import REGISTRY, usable_backbones
    from tuning.profiles import PROFILES, default_profile_name
    from tuning.run import RunSettings, default_run_dir

    profile = PROFILES[args.profile or default_profile_name()]
    choices = profile.choices
    if args.backbones:
        unknown = [b for b in args.backbones if b not in REGISTRY]
        if unknown:
            raise UsageError(f"unknown backbone(s) {unknown}; known: {', '.join(REGISTRY)}")
        choices = dataclasses.replace(choices, backbones=args.backbones)
    if args.resolutions:
        bad = [r for r in args.resolutions if not 32 <= r <= 299]
        if bad:
            raise UsageError(f"--resolutions {bad} outside 32..299")
        choices = dataclasses.replace(choices, resolutions=args.resolutions)
    if args.learning_rate:
        choices = dataclasses.replace(choices, learning_rate=args.learning_rate)
    if args.unfrozen_blocks:
        choices = dataclasses.replace(choices, unfrozen_blocks=args.unfrozen_blocks)
    overrides = {
        "seed": args.seed, "weights": args.weights, "tuner": args.tuner, "max_epochs": args.max_epochs,
        "factor": args.factor, "hyperband_iterations": args.hyperband_iterations,
        "max_trials": args.max_trials, "batch_size": args.batch_size,
        "validation_fraction": args.validation_fraction, "feature_cache": args.feature_cache,
        "cache_budget_mb": args.cache_budget, "epochs": args.epochs, "distributed": args.distributed,
        "oracle": args.oracle, "worker_id": args.worker_id, "worker_timeout_s": args.worker_timeout,
        "strategy": args.strategy,
    }
    settings = RunSettings(
        profile=profile.name,
        run_dir=args.run_dir or default_run_dir(),
        data=args.data,
        choices=choices,
        tuner=profile.tuner,
        max_epochs=profile.max_epochs,
        factor=profile.factor,
        hyperband_iterations=profile.hyperband_iterations,
        max_trials=profile.max_trials,
        time_budget_s=profile.time_budget_s,
        train_subset=profile.train_subset,
        val_subset=profile.val_subset,
        batch_size=profile.batch_size,
        retrain_epochs=profile.retrain_epochs,
        retrain_subset=profile.retrain_subset,
        retrain_augmentation=profile.retrain_augmentation,
        phase2_lr_factor=profile.phase2_lr_factor,
        job_time_budget_s=profile.job_time_budget_s,
        early_stopping_patience=profile.early_stopping_patience,
        mixed_precision=profile.mixed_precision,
        verbose=args.verbose,
    )
    settings = dataclasses.replace(settings, **{k: v for k, v in overrides.items() if v is not None})
    if args.time_budget is not None:
        settings.time_budget_s = args.time_budget or None
    if args.job_time_budget is not None:
        settings.job_time_budget_s = args.job_time_budget or None
    if args.train_subset is not None:
        settings.train_subset = args.train_subset or None
    if args.val_subset is not None:
        settings.val_subset = args.val_subset or None
    if args.retrain_subset is not None:
        settings.retrain_subset = args.retrain_subset or None
    if settings.weights == "imagenet":
        usable = usable_backbones(settings.choices.backbones, explicit=bool(args.backbones))
        settings.choices = dataclasses.replace(settings.choices, backbones=usable)
    return settings
