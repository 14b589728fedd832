"""The run directory contract.

`results/<run>/config.json` is the one record of what was run: every resolved
setting, the backbones dropped for want of weights, the library versions and the
data source with its checksum.
"""

import datetime
import json
import platform
import shutil
from pathlib import Path

import numpy as np

from common import atomic
from common.errors import UsageError
from tuning.settings import BY_NAME, Settings

CONFIG_FILE = "config.json"


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


def prepare_run_dir(settings, dataset, dropped_backbones=None, decisions=()):
    """Creates or reopens a run directory and writes `config.json`.

    A directory holding a run with different search settings, or files that are not
    a run of this tool, is refused (use --overwrite or another --run-dir).

    Args:
        settings: The resolved `Settings`.
        dataset: The validated `Dataset`.
        dropped_backbones: {backbone: why} left out of the search for want of weights.
        decisions: The `Decision`s that set some of `settings` from the data.

    Returns:
        The run directory as a `Path`.
    """
    run_dir = check_run_dir(settings)
    config_path = run_dir / CONFIG_FILE
    if settings.overwrite and run_dir.exists():
        shutil.rmtree(run_dir)
    if run_dir.exists() and any(run_dir.iterdir()):
        previous = read_config(run_dir)
        _check_same_run(previous, settings, dataset, run_dir, dropped_backbones or {})
    record = {
        "settings": settings.to_dict(),
        "dropped_backbones": dropped_backbones or {},
        "decisions": [d.to_dict() for d in decisions],
        "data": dataset.summary(),
        "versions": library_versions(),
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    atomic.write_json(config_path, record)
    return run_dir


def check_run_dir(settings):
    """Refuses a --run-dir a search cannot use, before any work (it needs no TensorFlow):
    a file, or a folder of other files, whether to overwrite or to resume.

    Returns:
        The run directory as a `Path`.
    """
    run_dir = Path(settings.run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"--run-dir {run_dir} is a file, not a directory")
    if run_dir.exists() and not (run_dir / CONFIG_FILE).is_file() and any(run_dir.iterdir()):
        if settings.overwrite:
            raise UsageError(f"--run-dir {run_dir} is not a run of this tool: refusing to overwrite it")
        read_config(run_dir)  # says what is missing
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
        Settings.from_dict(record["settings"])
    except (ValueError, KeyError, TypeError) as e:
        raise UsageError(f"{config_path}: not a valid run config ({e})") from None
    return record


def _check_same_run(previous, settings, dataset, run_dir, dropped):
    old = previous["settings"]
    new = settings.to_dict()
    changed = sorted(k for k in new if not BY_NAME[k].resumable and _norm(old.get(k)) != _norm(new[k]))
    if previous["data"]["checksum"] != dataset.checksum:
        changed.append("data")
    was, now = previous.get("dropped_backbones", {}), dropped
    only_backbones = _norm(old["choices"]) == _norm({**new["choices"], "backbones": old["choices"]["backbones"]})
    if changed == ["choices"] and only_backbones and set(was) != set(now):
        raise UsageError(
            f"--run-dir {run_dir} searched {', '.join(old['choices']['backbones'])}, but the weights available now "
            f"allow {', '.join(new['choices']['backbones'])} "
            f"(dropped then: {', '.join(was) or 'none'}; dropped now: {', '.join(now) or 'none'}): "
            "resume where the same weights are available, name --backbones, or pass --overwrite"
        )
    if changed:
        raise UsageError(
            f"--run-dir {run_dir} holds a run with different settings ({', '.join(changed)}): "
            "resume with the same command, or pass --overwrite or another --run-dir"
        )


def _norm(value):
    return json.loads(json.dumps(value, default=list))
