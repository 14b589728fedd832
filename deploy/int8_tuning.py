"""Quantisation-aware fine-tuning of the trainable top, for the full-integer `.tflite`.

Full-integer quantisation perturbs the frozen ImageNet prefix far more than its
rounding suggests: on Fashion-MNIST, rounding only the first depthwise layer's weights
to int8 moves the prefix's output by 25 % RMS (its near-constant channels carry large
BatchNorm gains) and costs 0.7 pp, and the whole int8 model lost 1.2 pp. The prefix is
frozen, so its int8 version is just another fixed feature extractor: the top is
fine-tuned for a couple of epochs on that extractor's own features (a seeded sample of
the training split; validation keeps the result only if it helps), and the int8 file
is converted from this copy. The float artifacts keep the trained model unchanged.
"""

import time

import numpy as np

from hypermodel.training import fine_tune_top
from deploy.runtimes import LiteRtModel

TUNING_IMAGES = 10_000
TUNING_EPOCHS = 2
TUNING_LEARNING_RATE = 1e-5  # a nudge: the top only has to follow a small, fixed shift of its inputs
FEATURE_BATCH = 256


def fit_top_to_int8_prefix(model, prefix_tflite, data, tta, batch_size, seed, budget_mb, log=print):
    """Fine-tunes `model`'s trainable top, in place, on the int8 prefix's features.

    Args:
        model: A copy of the trained model (the float artifacts keep the original).
        prefix_tflite: Bytes of the int8 `.tflite` computing the prefix from raw inputs
            (image and mirror as one batch when `tta`), calibrated like the full model.
        data: The retrain's `TrainingData` (training images in, validation to judge).
        tta: Whether the exported model averages each image with its mirror.
        budget_mb: RAM for the stored features; fewer images are used beyond it, and
            none (no tuning) when it holds less than a batch.

    Returns:
        A record: images, epochs, validation accuracy of the int8 prefix's features
        through the top before and after, whether the tuned top was kept, seconds.
    """
    started = time.time()
    prefix = LiteRtModel(model_content=prefix_tflite)
    views = 2 if tta else 1
    feature_mb = views * 4 * np.prod(prefix(data.x_train[:1]).shape[1:]) / 2**20
    count = int(min(TUNING_IMAGES, len(data.y_train), budget_mb // feature_mb))
    if count < batch_size:
        log(f"  int8: top not tuned: --cache-budget {budget_mb} MB holds the features of {count} images")
        return {"images": count, "epochs": 0, "kept": False, "seconds": round(time.time() - started, 1)}
    picked = np.sort(np.random.default_rng(seed).choice(len(data.y_train), size=count, replace=False))
    train_views = _features(prefix, data.x_train[picked], views)
    val_views = _features(prefix, data.x_val, views)

    before, after, epochs = fine_tune_top(model, train_views, data.y_train[picked], val_views, data.y_val,
                                          TUNING_EPOCHS, TUNING_LEARNING_RATE, batch_size, seed)
    record = {
        "images": count, "epochs": epochs, "val_accuracy_before": before, "val_accuracy_after": after,
        "kept": after > before, "seconds": round(time.time() - started, 1),
    }
    log(f"  int8: top fine-tuned on the int8 prefix's features ({count} images, {epochs} epochs): "
        f"validation {before:.4f} → {after:.4f}" + ("" if record["kept"] else " (not kept)"))
    return record


def _features(prefix, images, views):
    """[view][image] features: the prefix's output for each image (and its mirror)."""
    chunks = [prefix(images[i : i + FEATURE_BATCH]) for i in range(0, len(images), FEATURE_BATCH)]
    return [np.concatenate([np.split(c, views)[v] for c in chunks]) for v in range(views)]
