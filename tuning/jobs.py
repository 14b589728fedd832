"""What each subcommand does, top to bottom. `tuning/cli.py` parses; this runs."""

import dataclasses
import json
import time
import warnings
from pathlib import Path

import numpy as np

from common import atomic
from common.errors import DataError, UsageError, UserError
from data_pipeline import Dataset, load_dataset
from data_pipeline.folders import ImageFiles
from data_pipeline.splits import training_data

TOP_N = 5


class NoCompletedTrial(UserError):
    """The search ended without a single completed trial."""


def log(message):
    print(message, flush=True)


def silence_library_warnings():
    """A normal run prints only the tool's own lines (Keras/TensorFlow Python warnings
    and absl logging are hidden; -v shows Keras progress bars, not library chatter)."""
    warnings.filterwarnings("ignore", module=r"(keras|tensorflow|keras_tuner|absl|h5py)(\.|$)")
    warnings.filterwarnings("ignore", category=UserWarning)
    import absl.logging

    absl.logging.set_verbosity(absl.logging.ERROR)
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")


def show_data(path, skip_bad_images, image_settings):
    """`search.py data`: load, validate and summarise a dataset.

    Args:
        image_settings: Returns the run's settings; called only for image files (to show
            the resolutions a search would use), so arrays never load TensorFlow.
    """
    source = load_dataset(path, skip_bad_images=skip_bad_images)
    summary = source.summary()
    log(f"source:      {summary['source']} ({summary['path']})")
    if isinstance(source, ImageFiles):
        _show_image_files(summary, decided(image_settings(), source)[0])
        return 0
    log(f"train/test:  {summary['train']} / {summary['test']} images (before the validation split)")
    log(f"image shape: {'x'.join(map(str, summary['image_shape']))} grayscale uint8")
    log(f"classes:     {summary['num_classes']}")
    width = max(len(n) for n in summary["class_names"])
    for i, name in enumerate(summary["class_names"]):
        log(f"  {i:>3} {name:<{width}}  train {summary['train_per_class'][i]:>6}  test {summary['test_per_class'][i]:>6}")
    status = {"verified": "verified against the official sha256", "computed": "computed (no reference to verify)"}
    log(f"checksum:    {summary['checksum']} ({status[summary['checksum_status']]})")
    return 0


def _show_image_files(summary, settings):
    splits = summary["per_split"]
    log(f"images:      {summary['images']} ({', '.join(f'{n} {sum(c)}' for n, c in splits.items())})"
        + ("" if "val" in splits else "; validation carved from train"))
    width = max(len(n) for n in summary["class_names"])
    log(f"classes:     {summary['num_classes']}")
    for i, name in enumerate(summary["class_names"]):
        log(f"  {i:>3} {name:<{width}}  " + "  ".join(f"{n} {c[i]:>6}" for n, c in splits.items()))
    log(f"width:       min {summary['width'][0]}, median {summary['width'][1]}, max {summary['width'][2]} px")
    log(f"height:      min {summary['height'][0]}, median {summary['height'][1]}, max {summary['height'][2]} px")
    log(f"modes:       {', '.join(f'{m} {n}' for m, n in summary['modes'].items())}")
    log(f"fed as:      RGB (grayscale repeated, transparency on white), padded to square, stored at "
        f"{settings.storage_size} px; profile {settings.profile} searches "
        f"{', '.join(map(str, settings.choices.resolutions))} px")
    log(f"ignored:     {summary['ignored']} hidden or non-image files")
    if summary["bad"]:
        log(f"skipped:     {len(summary['bad'])} bad images (--skip-bad-images), e.g. {summary['bad'][0][0]}: "
            f"{summary['bad'][0][1]}")
    log(f"checksum:    {summary['checksum']} (content of every image)")


def load_source(settings):
    """The validated dataset: a `Dataset`, or `ImageFiles` checked but not decoded yet.

    Bad input is refused here, before anything is written. It needs no TensorFlow: the
    command line calls it before TensorFlow loads.
    """
    return load_dataset(settings.data, skip_bad_images=settings.skip_bad_images)


def use_precision(settings):
    """Keras' global dtype policy for the run: mixed float16 where the settings ask."""
    if settings.mixed_precision:
        import keras

        keras.mixed_precision.set_global_policy("mixed_float16")


def decided(settings, source, explicit=(), log=log):
    """`settings` with the defaults that depend on the data decided from `source`.

    Each decision is logged once, with its reason (`tuning/data_decisions.py`); a
    setting in `explicit` stays as the user gave it. Image files also get their storage
    size: the largest searched resolution, or the images' own size (90th percentile of
    the longer side) when that is smaller.

    Returns:
        (settings, [Decision]).
    """
    from hypermodel.space import RESOLUTION_RANGE
    from tuning.data_decisions import DataFacts, decide

    settings, decisions = decide(settings, DataFacts.of(source), explicit)
    for decision in decisions:
        log(decision.line())
    if isinstance(source, ImageFiles) and not settings.storage_size:
        longer = np.percentile([max(f.width, f.height) for f in source.files], 90)
        storage = int(min(max(settings.choices.resolutions), max(RESOLUTION_RANGE[0], np.ceil(longer / 8) * 8)))
        settings = dataclasses.replace(settings, storage_size=storage)
    return settings, decisions


def materialize(source, settings, run_dir):
    """The `Dataset` of `source`: itself for arrays; image files decoded into the run's image store."""
    if not isinstance(source, ImageFiles):
        return source
    from data_pipeline.store import open_or_build

    store = open_or_build([f.path for f in source.files], source.checksum, settings.storage_size,
                          Path(run_dir) / "image_store", settings.image_budget_mb, log=log)
    return Dataset.from_files(source, store)


def write_split_records(files, run_dir):
    """splits.csv (path,label,split of every image used) and skipped_images.csv, for image files."""
    import pandas as pd

    rows = [{"path": f.name, "label": files.class_names[f.label], "split": f.split} for f in files.files]
    atomic.write_text(Path(run_dir) / "splits.csv", pd.DataFrame(rows).to_csv(index=False))
    if files.bad:
        bad = pd.DataFrame([{"path": str(p), "fault": fault} for p, fault in files.bad])
        atomic.write_text(Path(run_dir) / "skipped_images.csv", bad.to_csv(index=False))
        log(f"skipped {len(files.bad)} bad images (--skip-bad-images): listed in {Path(run_dir) / 'skipped_images.csv'}")


def search_data(dataset, settings):
    """The search's train/validation slice of `dataset`."""
    return training_data(dataset, settings.validation_fraction, settings.seed,
                         settings.train_subset, settings.val_subset)


def with_available_backbones(settings, explicit):
    """`settings` searching only backbones whose ImageNet weights can be had.

    Args:
        explicit: The user named --backbones: a missing one is then an error.

    Returns:
        (settings, {dropped backbone: why}); one line says what was dropped.
    """
    from hypermodel.backbones import VENDORED_WEIGHTS, usable_backbones

    if settings.weights != "imagenet":
        return settings, {}
    names = settings.choices.backbones
    usable, dropped = usable_backbones(names, offline=settings.offline)
    if dropped and explicit:
        name, why = next(iter(dropped.items()))
        raise DataError(VENDORED_WEIGHTS, f"--backbones {name}: {why}")
    if dropped:
        log(f"backbones without ImageNet weights here, left out of the search: {', '.join(dropped)} "
            f"({next(iter(dropped.values()))})")
    if not usable and settings.fallback_backbones:
        usable, _ = usable_backbones(settings.fallback_backbones, offline=True)
        log(f"warning: profile {settings.profile}: none of its backbones has weights here; searching "
            f"the shipped {', '.join(usable)} at {', '.join(map(str, settings.choices.resolutions))} px instead")
    if not usable:
        raise DataError(VENDORED_WEIGHTS, f"no ImageNet weights available for any of {', '.join(names)}")
    return dataclasses.replace(settings, choices=dataclasses.replace(settings.choices, backbones=usable)), dropped


def search(settings, explicit=(), source=None):
    """`search.py search`: run or resume the search; print the top trials.

    Args:
        explicit: Names of the settings the user gave (given backbones must have weights;
            given resolutions are searched as given).
        source: The dataset already loaded and checked (`load_source`), else loaded here.
    """
    from tuning.run_dir import prepare_run_dir
    from tuning.tuner import configure_distributed, end_distributed, run_search

    source = source or load_source(settings)  # bad data is refused before anything else happens
    use_precision(settings)
    settings, decisions = decided(settings, source, explicit)
    settings, dropped = with_available_backbones(settings, "backbones" in explicit)
    worker, workers = "local", None
    if settings.distributed:
        worker = configure_distributed(settings.distributed, settings.oracle, settings.worker_id)
    elif settings.workers > 1:
        from tuning.local_workers import LocalWorkers, visible_gpus

        workers = LocalWorkers(settings.workers, log=log, gpus=visible_gpus(), explicit="workers" in explicit)
        worker = configure_distributed("chief", workers.oracle)
    run_dir = prepare_run_dir(settings, source, dropped, decisions)
    dataset = materialize(source, settings, run_dir)
    if dataset.files is not None:
        write_split_records(dataset.files, run_dir)
    data = search_data(dataset, settings)
    record_search_images(run_dir, data)
    log(f"run dir: {run_dir}")
    log(f"watch it: python search.py tensorboard --run-dir {run_dir}   "
        f"(or: tensorboard --logdir {run_dir / 'tensorboard'} --host 127.0.0.1)")
    log(f"profile {settings.profile}: {settings.tuner} over {', '.join(settings.choices.backbones)} at "
        f"{', '.join(map(str, settings.choices.resolutions))} px; {len(data.x_train)} train / "
        f"{len(data.x_val)} validation images; budget "
        + (f"{settings.time_budget_s / 60:.1f} min" if settings.time_budget_s else "none"))
    started = time.time()
    if workers is None:
        result = run_search(settings, data, run_dir, feature_cache=feature_cache(settings, run_dir), log=log,
                            worker=worker)
    else:
        workers.start(run_dir)
        try:
            result = run_search(settings, data, run_dir, log=log, worker=worker, until=workers.wait)
        finally:
            workers.stop()
            end_distributed()
    _record_stage(run_dir, "search", time.time() - started)
    if result["stopped_by_budget"]:
        log("time budget reached: search stopped cleanly; rerun the same command to continue it")
    frame = result["leaderboard"]
    rejected = int((frame["status"] == "REJECTED").sum())
    log(f"{result['trials']} trials ({result['completed']} completed"
        + (f", {rejected} rejected by the deployment limits" if rejected else "") + ")"
        + (f". Top {TOP_N}:" if result["completed"] else ""))
    if result["completed"]:
        from tuning.leaderboard import top

        log(top(frame, TOP_N).to_string(index=False, columns=[
            "trial_id", "backbone", "resolution", "unfrozen_blocks", "head",
            "dense_units", "dropout",
            "learning_rate", "lr_schedule", *(["score"] if settings.objective != "accuracy" else []), "val_accuracy",
            "epochs", "train_s", "seconds", "latency_ms"]))
    if result["best"] is None:
        raise NoCompletedTrial(no_trial_message(result["leaderboard"], run_dir))
    return 0


def record_search_images(run_dir, data):
    """Adds the images the search really trains and validates on to config.json."""
    from tuning.run_dir import CONFIG_FILE, read_config

    record = read_config(run_dir)
    record["search_images"] = {"train": int(len(data.y_train)), "validation": int(len(data.y_val))}
    atomic.write_json(Path(run_dir) / CONFIG_FILE, record)


def feature_cache(settings, run_dir):
    """The run's `FeatureCache` (in `run_dir/feature_cache`), or None when it is off."""
    from data_pipeline.feature_cache import FeatureCache

    if not settings.feature_cache:
        return None
    return FeatureCache(Path(run_dir) / "feature_cache", budget_mb=settings.cache_budget_mb, log=log)


def no_trial_message(frame, run_dir):
    """Why the search has nothing to retrain, in one line."""
    rejected = frame[frame["status"] == "REJECTED"]
    if len(rejected) and len(rejected) == len(frame):
        fastest, smallest = rejected["latency_ms"].min(), rejected["model_mb"].min()
        return (f"every trial ({len(frame)}) was rejected by the deployment limits before training: fastest model "
                f"measured {fastest:.2f} ms, smallest {smallest:.2f} MB; raise --max-latency-ms / --max-model-mb "
                "or search smaller backbones or resolutions")
    return (f"the search completed no trial ({len(frame)} ended, all failed, rejected or stopped): their errors are "
            f"in {Path(run_dir) / 'leaderboard.csv'}; try a lower --learning-rate range, a longer --time-budget "
            "or the smoke profile")


def _record_stage(run_dir, stage, seconds, plan=None):
    """Adds a stage's wall time to `timings.json` (read by the report).

    Args:
        plan: How the stage fitted its work to the job's deadline (the retrain's
            `EpochPlan` as a dict), recorded as `<stage>_plan`.
    """
    path = Path(run_dir) / "timings.json"
    timings = json.loads(path.read_text()) if path.exists() else {}
    timings[stage] = round(timings.get(stage, 0) + seconds, 1)
    if plan:
        timings[f"{stage}_plan"] = plan
    atomic.write_json(path, timings)


def _reopen(run_dir, overrides=None, source=None):
    """Settings, dataset and retrain data of an existing run, verified against config.json.

    Args:
        overrides: {setting: value} given to this command (resumable settings only);
            recorded in config.json.
        source: The dataset already loaded and checked by this process (the whole job),
            else it is loaded here.
    """
    from tuning.run_dir import CONFIG_FILE, read_config
    from tuning.settings import Settings

    record = read_config(run_dir)
    settings = Settings.from_dict({**record["settings"], **(overrides or {})})
    source = source or load_source(settings)
    use_precision(settings)
    if source.checksum != record["data"]["checksum"]:
        raise UsageError(f"the data at {settings.data or 'data/fashion-mnist'} changed since {run_dir} was searched")
    if overrides:
        atomic.write_json(Path(run_dir) / CONFIG_FILE, {**record, "settings": settings.to_dict()})
    dataset = materialize(source, settings, run_dir)
    # The final model trains on the whole training split (the search may have used a subset).
    data = training_data(dataset, settings.validation_fraction, settings.seed, settings.retrain_subset)
    return settings, dataset, data


def _check_run(run_dir):
    """Refuses a foreign run dir or a bad best_hparams.json before any work; returns the
    best configuration."""
    from tuning.retrain import read_best
    from tuning.run_dir import read_config

    read_config(run_dir)
    return read_best(run_dir)[1]


def retrained_config(run_dir, searched):
    """The retrained model's configuration: metrics.json's, where the retrain replaced the
    search's best (`searched`) by a finalist or the linear head."""
    from hypermodel.space import config_from_values

    path = Path(run_dir) / "metrics.json"
    hyperparameters = json.loads(path.read_text()).get("hyperparameters") if path.is_file() else None
    return config_from_values(hyperparameters) if hyperparameters else searched


def retrain(run_dir, overrides=None, deadline=None, source=None):
    """`search.py retrain`: two-phase retrain of the best trial, then the test evaluation.

    Args:
        overrides: {setting: value} given on the command line (epochs, job_time_budget_s, ...).
        deadline: `time.time()` the whole job should end by (phase 2 is fitted to it);
            default: `job_time_budget_s` from now.
        source: The dataset already loaded and checked by this process, else loaded here.
    """
    from tuning.retrain import retrain as retrain_best

    _check_run(run_dir)
    settings, dataset, data = _reopen(run_dir, overrides, source)
    started = time.time()
    if deadline is None and settings.job_time_budget_s:
        deadline = started + settings.job_time_budget_s
    cache = feature_cache(settings, run_dir)
    metrics = retrain_best(run_dir, settings, dataset, data, feature_cache=cache, deadline=deadline, log=log)
    _record_stage(run_dir, "retrain", time.time() - started, plan=metrics.get("phase2", {}).get("plan"))
    return 0


def export(run_dir, overrides=None, source=None):
    """`search.py export`: the chosen formats, each scored on the test split.

    Args:
        overrides: {setting: value} given on the command line (formats, limits).
    """
    from deploy.export import export as export_model

    config = retrained_config(run_dir, _check_run(run_dir))
    settings, dataset, _ = _reopen(run_dir, overrides, source)
    started = time.time()
    export_model(run_dir, config, settings, dataset, log=log)
    _record_stage(run_dir, "export", time.time() - started)
    return 0


def report(run_dir):
    """`search.py report`: report.md with leaderboard, curves, confusion matrix."""
    from tuning.report import write_report
    from tuning.run_dir import read_config

    read_config(run_dir)
    write_report(run_dir, log=log)
    return 0


def predict(model_dir, inputs, output=None, before_tensorflow=lambda: None):
    """`search.py predict`: inputs are validated before the model is loaded."""
    from deploy.predict import predict as predict_images

    predict_images(model_dir, inputs, output, log=log, before_tensorflow=before_tensorflow)
    return 0


def tensorboard(run_dir, host, port):
    from tuning.board import serve
    from tuning.run_dir import read_config

    read_config(run_dir)
    serve(run_dir, host, port, log=log)
    return 0


def whole_job(settings, explicit=(), source=None):
    """`search.py`: search → retrain → export → report into one run dir.

    Args:
        source: The dataset already loaded and checked (`load_source`), else loaded here.
    """
    started = time.time()
    source = source or load_source(settings)  # checked once for the whole job (folders: every file)
    search(settings, explicit, source)
    if settings.distributed == "worker":
        return 0  # the chief retrains and exports, once
    from tuning.run_dir import read_config

    run_dir = Path(settings.run_dir)
    budget = read_config(run_dir)["settings"]["job_time_budget_s"]  # as decided from the data
    deadline = started + budget if budget else None
    retrain(run_dir, deadline=deadline, source=source)
    export(run_dir, source=source)
    report(run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    log(f"done in {(time.time() - started) / 60:.1f} min: test accuracy {metrics['test_accuracy']:.4f}; "
        f"model {run_dir / 'export'}; report {run_dir / 'report.md'}; "
        f"TensorBoard: python search.py tensorboard --run-dir {run_dir}")
    return 0
