"""Run settings and the run directory contract.

`results/<run>/config.json` is the one record of what was run: every resolved
setting, the library versions and the data source with its checksum.
"""

import dataclasses
import datetime
import json
import platform
import shutil
from pathlib import Path

import numpy as np

from data_pipeline.errors import UsageError
from data_pipeline.pipeline import split_train_validation
from hypermodel.space import SearchChoices
from hypermodel.transfer import TrainingData
from data_pipeline import atomic

CONFIG_FILE = "config.json"
# Settings that may differ when a run is resumed (they do not change what is searched).
RESUMABLE_SETTINGS = {
    "time_budget_s", "job_time_budget_s", "retrain_subset", "verbose", "epochs", "distributed", "oracle", "worker_id", "worker_timeout_s", "strategy",
}


@dataclasses.dataclass
class RunSettings:
    """Every resolved setting of a run (profile values overridden by CLI flags)."""

    profile: str
    run_dir: str
    data: str = None
    seed: int = 0
    weights: str = "imagenet"
    choices: SearchChoices = dataclasses.field(default_factory=SearchChoices)
    tuner: str = "hyperband"
    max_epochs: int = 4
    factor: int = 3
    hyperband_iterations: int = 1
    max_trials: int = 10
    time_budget_s: float = None
    train_subset: int = None
    val_subset: int = None
    validation_fraction: float = 0.1
    batch_size: int = 64
    retrain_epochs: tuple = None
    retrain_subset: int = None
    retrain_augmentation: str = None
    phase2_lr_factor: float = 0.1
    job_time_budget_s: float = None
    early_stopping_patience: int = 2
    mixed_precision: bool = False
    feature_cache: bool = True
    cache_budget_mb: int = 4096
    max_consecutive_failures: int = 3
    epochs: int = None
    verbose: int = 0
    distributed: str = None
    oracle: str = "127.0.0.1:8000"
    worker_id: str = None
    worker_timeout_s: float = 1800
    strategy: str = "none"

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values):
        values = dict(values)
        values["choices"] = SearchChoices(**{k: tuple(v) for k, v in values["choices"].items()})
        if values.get("retrain_epochs") is not None:
            values["retrain_epochs"] = tuple(values["retrain_epochs"])
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


def default_run_dir():
    return str(Path("results") / datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))


def library_versions():
    import keras
    import keras_tuner
    import tensorflow as tf

    return {
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "keras_tuner": keras_tuner.__version__,
        "numpy": np.__version__,
    }


def prepare_run_dir(settings, dataset, overwrite=False):
    """Creates or reopens a run directory and writes `config.json`.

    A directory holding a run with different search settings, or files that are not
    a run of this tool, is refused (use --overwrite or another --run-dir).

    Returns:
        The run directory as a `Path`.
    """
    run_dir = Path(settings.run_dir)
    config_path = run_dir / CONFIG_FILE
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"--run-dir {run_dir} is a file, not a directory")
    if overwrite and run_dir.exists():
        if not config_path.is_file() and any(run_dir.iterdir()):
            raise UsageError(f"--run-dir {run_dir} is not a run of this tool: refusing to overwrite it")
        shutil.rmtree(run_dir)
    if run_dir.exists() and any(run_dir.iterdir()):
        previous = read_config(run_dir)
        _check_same_run(previous, settings, dataset, run_dir)
    record = {
        "settings": settings.to_dict(),
        "data": dataset.summary(),
        "versions": library_versions(),
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    atomic.write_json(config_path, record)
    return run_dir


def read_config(run_dir):
    """Reads a run's `config.json`; refuses a directory that is not a run of this tool."""
    run_dir = Path(run_dir)
    config_path = run_dir / CONFIG_FILE
    if not run_dir.is_dir():
        raise UsageError(f"--run-dir {run_dir} does not exist: run `python search.py search` first")
    if not config_path.is_file():
        raise UsageError(f"--run-dir {run_dir} is not a run of this tool (no {CONFIG_FILE})")
    try:
        record = json.loads(config_path.read_text())
        RunSettings.from_dict(record["settings"])
    except (ValueError, KeyError, TypeError) as e:
        raise UsageError(f"{config_path}: not a valid run config ({e})") from None
    return record


def _check_same_run(previous, settings, dataset, run_dir):
    old = previous["settings"]
    new = settings.to_dict()
    changed = sorted(
        k for k in new if k not in RESUMABLE_SETTINGS and k != "run_dir" and _norm(old.get(k)) != _norm(new[k])
    )
    if previous["data"]["checksum"] != dataset.checksum:
        changed.append("data")
    if changed:
        raise UsageError(
            f"--run-dir {run_dir} holds a run with different settings ({', '.join(changed)}): "
            "resume with the same command, or pass --overwrite or another --run-dir"
        )


def _norm(value):
    return json.loads(json.dumps(value, default=list))


def training_data(dataset, settings):
    """The search's data: a stratified, seeded validation split carved from train.

    The test split is deliberately absent: only the final evaluation reads it.
    """
    train_idx, val_idx = split_train_validation(dataset.y_train, settings.validation_fraction, settings.seed)
    train_idx = _stratified_subset(dataset.y_train, train_idx, settings.train_subset, settings.seed)
    val_idx = _stratified_subset(dataset.y_train, val_idx, settings.val_subset, settings.seed + 1)
    return TrainingData(
        x_train=dataset.x_train[train_idx],
        y_train=dataset.y_train[train_idx],
        x_val=dataset.x_train[val_idx],
        y_val=dataset.y_train[val_idx],
        num_classes=dataset.num_classes,
        key=f"{dataset.checksum[:16]}-{settings.validation_fraction}-{settings.seed}"
        f"-{settings.train_subset}-{settings.val_subset}",
    )


def _stratified_subset(labels, indices, size, seed):
    if size is None or size >= len(indices):
        return indices
    fraction = size / len(indices)
    _, keep = split_train_validation(labels[indices], fraction, seed)
    return indices[keep]
