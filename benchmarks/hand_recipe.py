"""The fixed hand recipe the search has to beat (issue 8), on the same data and scoring.

    python benchmarks/hand_recipe.py --epochs 12          # the recipe as measured: 96 px, 12 epochs
    python benchmarks/hand_recipe.py --wall-time 3600     # as many epochs as fit in an hour

For the same-wall-clock comparison with the default job, --wall-time is that job's wall
time: the recipe times its real training steps first and plans as many epochs as fit
(so its cosine schedule ends where the run ends). All planned epochs run even if the
machine slows down later, so the baseline is never cut short.

MobileNetV2 α 0.5 (ImageNet), 96 px, the whole backbone fine-tuned but its stem (BatchNorm
frozen, inference mode), Adam with cosine decay from 1e-3, horizontal flips, dropout 0.2,
trained on the full training split minus the same 10 % validation split the tool uses,
scored once on the official test split. No search. Last line JSON.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from data_pipeline import load_dataset  # noqa: E402
from hypermodel.space import TrialConfig  # noqa: E402
from hypermodel.model import build_transfer_model  # noqa: E402
from hypermodel.training import epochs_that_fit, train  # noqa: E402
from tuning.retrain import evaluate_test  # noqa: E402
from tuning.jobs import search_data  # noqa: E402
from tuning.settings import Settings  # noqa: E402

RECIPE = TrialConfig(
    backbone="mobilenet_v2_0.5", resolution=96, unfrozen_blocks=99, pooling="avg", dense_units=256,
    dropout=0.2, learning_rate=1e-3, lr_schedule="cosine", warmup_epochs=0, optimizer="adam",
    augmentation="flip",
)

EVALUATION_RESERVE_S = 60  # the test evaluation after training


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--wall-time", type=float, help="seconds for the whole run; overrides --epochs")
    parser.add_argument("--resolution", type=int, default=RECIPE.resolution)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    started = time.time()
    dataset = load_dataset()
    data = search_data(dataset, Settings(profile="hand", run_dir="-"))
    config = TrialConfig(**{**RECIPE.to_dict(), "resolution": args.resolution})
    model = build_transfer_model(config, dataset.num_classes)
    epochs = args.epochs
    if args.wall_time:
        finish_by = started + args.wall_time - EVALUATION_RESERVE_S
        plan = epochs_that_fit(finish_by, model, config, data, args.batch_size, seed=0)
        epochs = plan.epochs
        print(f"{plan.reasoning()} in --wall-time {args.wall_time:.0f} s", flush=True)
    history, _ = train(model, config, data, batch_size=args.batch_size, seed=0, epochs=epochs, verbose=2)
    metrics = evaluate_test(model, config, dataset)
    print(json.dumps({
        "recipe": "mobilenet_v2_0.5 full fine-tune, flips, cosine 1e-3",
        "resolution": args.resolution, "epochs": len(history.epoch),
        "val_accuracy": round(float(history.history["val_accuracy"][-1]), 4),
        "test_accuracy": round(metrics["test_accuracy"], 4),
        "wall_s": round(time.time() - started, 1),
        "wall_time_given_s": args.wall_time,
    }))


if __name__ == "__main__":
    main()
