"""The search's top trials re-scored on the retrain's whole validation split (a diagnostic).

    python benchmarks/finalists.py RUN_DIR [--top 6]

The search ranks trials on a validation slice (`--val-subset`: the cpu profile's 2 000
images); the retrain validates on the whole split (Fashion-MNIST: 6 000). This loads
each finalist's saved best-epoch weights and scores them on both, and, only to show
what the choice costs, on the test split. One JSON line per finalist, best first by the
search's own score, then the CPU.
"""

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import common.tensorflow_env  # noqa: E402,F401  (before TensorFlow)

from benchmarks.machine import cpu_description  # noqa: E402


def accuracy(model, images, labels, config, batch=500):
    import numpy as np

    from data_pipeline.pipeline import prepare_images
    from hypermodel.backbones import get_backbone

    preprocess = get_backbone(config.backbone).preprocess_input
    predicted = np.concatenate([
        np.asarray(model(prepare_images(images[i : i + batch], config.resolution, preprocess), training=False))
        for i in range(0, len(labels), batch)
    ]).argmax(axis=1)
    return round(float(np.mean(predicted == labels)), 4)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--top", type=int, default=6)
    args = parser.parse_args(argv)

    import pandas as pd

    from data_pipeline import load_dataset
    from data_pipeline.splits import training_data
    from tuning.finalists import checkpoint_model
    from tuning.jobs import search_data
    from tuning.run_dir import read_config
    from tuning.settings import Settings

    settings = Settings.from_dict(read_config(args.run_dir)["settings"])
    dataset = load_dataset(settings.data) if settings.data else load_dataset()
    searched = search_data(dataset, settings)
    whole = training_data(dataset, settings.validation_fraction, settings.seed, settings.retrain_subset)
    board = pd.read_csv(args.run_dir / "leaderboard.csv", dtype={"trial_id": str})
    board = board[board["status"] == "COMPLETED"].sort_values("val_accuracy", ascending=False).head(args.top)
    for row in board.itertuples():
        config, model = checkpoint_model(args.run_dir, row.trial_id, dataset.num_classes)
        print(json.dumps({
            "trial": row.trial_id, "backbone": config.backbone, "resolution": config.resolution,
            "unfrozen_blocks": config.unfrozen_blocks, "epochs": int(row.epochs),
            "search_val_accuracy": round(float(row.val_accuracy), 4),
            "search_val_accuracy_again": accuracy(model, searched.x_val, searched.y_val, config),
            "search_val_images": len(searched.y_val),
            "whole_val_accuracy": accuracy(model, whole.x_val, whole.y_val, config),
            "whole_val_images": len(whole.y_val),
            "test_accuracy": accuracy(model, dataset.x_test, dataset.y_test, config),
        }), flush=True)
    print(json.dumps({"cpu": cpu_description()}))


if __name__ == "__main__":
    main()
