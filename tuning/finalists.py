"""The search's finalists scored again on the retrain's whole validation split.

The search ranks trials on a validation slice (`val_subset`: the cpu profile's 2 000
images), where trials within a point of each other are ties in all but the slice's noise.
Where the retrain validates on more images, each finalist's saved best-epoch weights are
scored on all of them, and the best there is the one retrained: one inference pass per
finalist. On Fashion-MNIST's default job the slice's pick ranked fourth of six on the
whole split (benchmarks/RESULTS.md §5, run 12).
"""

import json
import math
from pathlib import Path

import pandas as pd

from common import atomic
from common.shims import CHECKPOINT_FILE
from data_pipeline.pipeline import make_dataset
from hypermodel.backbones import get_backbone
from hypermodel.linear_head import validation_score
from hypermodel.model import build_transfer_model
from hypermodel.space import config_from_values
from tuning import leaderboard
from tuning.run_dir import read_config
from tuning.tuner import PROJECT_NAME

LEAST_FINALISTS = 2
MOST_FINALISTS = 6
# A finalist scored within this many standard errors of the slice's best.
NOISE_STANDARD_ERRORS = 2


def finalists(board, slice_images):
    """The completed trials whose search score is within the slice's noise of the best
    (`NOISE_STANDARD_ERRORS` binomial standard errors), best first: the runner-up at
    least, `MOST_FINALISTS` at most."""
    done = leaderboard.top(board.dropna(subset=["score"]), len(board))
    if done.empty:
        return done
    best = float(done["score"].iloc[0])
    noise = NOISE_STANDARD_ERRORS * math.sqrt(max(best * (1 - best), 1 / slice_images) / slice_images)
    within = int((done["score"] >= best - noise).sum())
    return done.head(min(MOST_FINALISTS, max(LEAST_FINALISTS, within)))


def rescore_finalists(run_dir, best, data, objective, batch_size, log=print):
    """The trial to retrain: the search's best, or the finalist that scores best on the
    whole validation split where the search validated on a slice of it.

    Args:
        run_dir: The run directory (leaderboard.csv, config.json, the trials' checkpoints).
        best: best_hparams.json's record.
        data: The retrain's `TrainingData` (its validation split is the whole one).
        objective: What the scores measure (accuracy, balanced_accuracy, macro_f1).

    Returns:
        (the record to retrain, as best_hparams.json's; {"validation_images",
        "search_validation_images", "finalists": [...], "chosen"} or None where nothing
        was scored again).
    """
    run_dir = Path(run_dir)
    searched = read_config(run_dir).get("search_images", {}).get("validation")
    board_path = run_dir / "leaderboard.csv"
    if not searched or searched >= len(data.y_val) or not board_path.is_file():
        return best, None
    candidates = finalists(pd.read_csv(board_path, dtype={"trial_id": str}), searched)
    candidates = candidates[candidates["trial_id"].map(lambda t: checkpoint_path(run_dir, t).is_file()).astype(bool)]
    if len(candidates) < LEAST_FINALISTS or best["trial_id"] not in set(candidates["trial_id"]):
        return best, None
    scored = [
        {"trial_id": row.trial_id, "search_score": float(row.score),
         "whole_validation_score": checkpoint_score(run_dir, row.trial_id, data, objective, batch_size)}
        for row in candidates.itertuples()
    ]
    chosen = max(scored, key=lambda s: s["whole_validation_score"])  # the first on ties: the search's order
    record = {"validation_images": int(len(data.y_val)), "search_validation_images": int(searched),
              "objective": objective, "finalists": scored, "chosen": chosen["trial_id"]}
    replaced = chosen["trial_id"] != best["trial_id"]
    log(f"  finalists scored again on the whole validation split ({len(data.y_val):,} images; the search "
        f"validated on {searched:,}): " + ", ".join(
            f"trial {s['trial_id']} {s['search_score']:.4f} → {s['whole_validation_score']:.4f}" for s in scored)
        + (f"; trial {chosen['trial_id']} is retrained" if replaced else "; the search's best stays"))
    if not replaced:
        return best, record
    return leaderboard.trial_record(candidates[candidates["trial_id"] == chosen["trial_id"]].iloc[0]), record


def checkpoint_model(run_dir, trial_id, num_classes):
    """(config, model) of a trial, with its saved best-epoch weights."""
    path = checkpoint_path(run_dir, trial_id)
    config = config_from_values(json.loads((path.parent / "trial.json").read_text())["hyperparameters"]["values"])
    model = build_transfer_model(config, num_classes, weights="none")
    model.set_weights(atomic.read_arrays(path))
    return config, model


def checkpoint_score(run_dir, trial_id, data, objective, batch_size):
    """`objective` on `data`'s validation split of a trial's saved best-epoch weights."""
    config, model = checkpoint_model(run_dir, trial_id, data.num_classes)
    images = make_dataset(data.x_val, None, config.resolution, get_backbone(config.backbone).preprocess_input,
                          batch_size)
    return validation_score(objective, data.y_val, model.predict(images, verbose=0).argmax(axis=1))


def checkpoint_path(run_dir, trial_id):
    """Where the search saved a trial's best-epoch weights (common/shims.py)."""
    return Path(run_dir) / PROJECT_NAME / f"trial_{trial_id}" / CHECKPOINT_FILE
