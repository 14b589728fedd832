"""leaderboard.csv and best_hparams.json, rebuilt from what is on disk.

The sources are KerasTuner's own `tuner/trial_*/trial.json` (status, hyperparameters,
score; written by the oracle, the chief in distributed mode) and this tool's
`trials/<trial_id>.json` (worker, seconds, epochs, error; written by whichever
process ran the trial). A trial rejected by a deployment limit before training is
FAILED for KerasTuner and `REJECTED` here, with the figure that rejected it.
`seconds` is what a trial cost; `train_s` the part spent fitting. `retried` says why
a trial's first run was lost, for one the chief gave to another worker (from the
oracle's state, `tuner/oracle.json`). Any process can therefore rebuild both files at any time,
and every rewrite is atomic.
"""

import json
from pathlib import Path

import pandas as pd

from common import atomic

COLUMNS = [
    "trial_id", "status", "worker", "backbone", "resolution", "unfrozen_blocks", "pooling",
    "dense_units", "dropout", "learning_rate", "lr_schedule", "score", "val_accuracy", "epochs",
    "train_s", "seconds", "latency_ms", "model_mb", "error",
]
EXTRA_COLUMNS = ["head", "val_balanced_accuracy", "val_macro_f1", "optimizer", "warmup_epochs", "augmentation", "fit_mode",
                 "bracket", "round", "best_epoch", "retried"]
ENDED = ("COMPLETED", "FAILED", "INVALID")
SCORES = ("val_accuracy", "val_balanced_accuracy", "val_macro_f1")


def trial_records(run_dir):
    """One dict per ended trial, ordered by trial id."""
    run_dir = Path(run_dir)
    lost_runs = _read_json(run_dir / "tuner" / "oracle.json").get("lost_runs", {})
    rows = []
    for path in sorted((run_dir / "tuner").glob("trial_*/trial.json")):
        try:
            trial = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # a trial being written by another process; picked up next rewrite
        if trial.get("status") not in ENDED:
            continue
        values = trial["hyperparameters"]["values"]
        record = _read_json(run_dir / "trials" / f"{trial['trial_id']}.json")
        completed = trial["status"] == "COMPLETED"
        row = {k: values.get(k) for k in COLUMNS + EXTRA_COLUMNS if k in values}
        row.update(
            trial_id=trial["trial_id"],
            status="REJECTED" if record.get("rejected") else trial["status"],
            worker=record.get("worker", ""),
            # The run's objective (val_accuracy unless --objective says otherwise).
            score=trial.get("score") if completed else None,
            **{name: record.get("scores", {}).get(name) if completed else None for name in SCORES},
            epochs=record.get("epochs"),
            seconds=record.get("seconds"),
            train_s=record.get("train_seconds"),
            latency_ms=record.get("latency_ms"),
            model_mb=record.get("model_mb"),
            error="" if completed else record.get("rejected") or last_line(trial.get("message") or record.get("error", "")),
            fit_mode=record.get("fit_mode", ""),
            bracket=values.get("tuner/bracket"),
            round=values.get("tuner/round"),
            # Ours counts from the trial's first Hyperband round; KerasTuner's from this round's.
            best_epoch=(record.get("best_epoch") or (trial.get("best_step") or 0) + 1) if completed else None,
            # Why its first run was lost (its worker died or went silent), for a trial run twice.
            retried=lost_runs.get(trial["trial_id"], [""])[0],
        )
        rows.append(row)
    return rows


def write(run_dir):
    """Rewrites leaderboard.csv and best_hparams.json; returns the leaderboard frame."""
    run_dir = Path(run_dir)
    frame = pd.DataFrame(trial_records(run_dir), columns=COLUMNS + EXTRA_COLUMNS)
    atomic.write_text(run_dir / "leaderboard.csv", frame.to_csv(index=False))
    best = best_trial(frame)
    if best is not None:
        atomic.write_json(run_dir / "best_hparams.json", best)
    return frame


def best_trial(frame):
    """The completed trial with the highest score (earliest on ties), as JSON."""
    done = frame[frame["status"] == "COMPLETED"].dropna(subset=["score"])
    if done.empty:
        return None
    return trial_record(done.sort_values(["score", "trial_id"], ascending=[False, True]).iloc[0])


def trial_record(row):
    """A completed trial's leaderboard row as best_hparams.json records a trial."""
    from hypermodel.space import TrialConfig

    names = [f for f in TrialConfig.__dataclass_fields__]
    return {
        "trial_id": str(row["trial_id"]),
        "score": float(row["score"]),
        "val_accuracy": float(row["val_accuracy"]),
        "epochs": int(row["best_epoch"]),
        "hyperparameters": {k: _plain(row[k]) for k in names if pd.notna(row[k])},
    }


def top(frame, n=5):
    done = frame[frame["status"] == "COMPLETED"]
    return done.sort_values(["score", "trial_id"], ascending=[False, True]).head(n)


def _plain(value):
    return value.item() if hasattr(value, "item") else value


def _read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def last_line(message):
    """A failure's last non-blank line (the exception, not its traceback)."""
    lines = [line.strip() for line in str(message).strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""
