"""The keras-io "Transfer learning & fine-tuning" guide's recipe on a train/test class-folder tree (issue 38).

    python benchmarks/hand_recipe_folder.py --data TREE                  # the guide's 20 + 10 epochs
    python benchmarks/hand_recipe_folder.py --data TREE --wall-time 1800 # as many epochs as fit

The guide's end-to-end example with its fixed settings, MobileNetV2 α 0.5 (the vendored
ImageNet weights) in place of Xception: images letterboxed to RESOLUTION px, random
horizontal flips and rotations of ±10 % of a turn, the backbone frozen and called with
training=False (so BatchNorm stays in inference mode in both phases), global average
pooling, dropout 0.2, a new softmax layer; phase 1 trains the head with Adam at 1e-3,
phase 2 unfreezes the whole backbone at 1e-5. Batch 64, all of train, no validation
and no early stopping. No search.

With --wall-time, phase 1 runs until a third of it has passed and phase 2 until the
end, less EVALUATION_RESERVE_S, each stopping before an epoch that would not fit
(measured from its last epoch; at least one epoch each). The last line printed is JSON,
with the test predictions (class indices in sorted class-name order) for the caller to score.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

from benchmarks.suite import WEIGHTS, letterbox, list_split  # noqa: E402

RESOLUTION = 160
BATCH = 64
GUIDE_EPOCHS = (20, 10)
RATES = (1e-3, 1e-5)
EVALUATION_RESERVE_S = 60


def stop_before(deadline):
    """A Keras callback that stops training before an epoch that would end past `deadline` (time.time())."""
    import keras

    class StopBefore(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.time()

        def on_epoch_end(self, epoch, logs=None):
            if time.time() + (time.time() - self.started) > deadline:
                self.model.stop_training = True

    return StopBefore()


def build_model(classes):
    import keras

    base = keras.applications.MobileNetV2(input_shape=(RESOLUTION, RESOLUTION, 3), alpha=0.5,
                                          include_top=False, weights=str(WEIGHTS))
    base.trainable = False
    augment = keras.Sequential([keras.layers.RandomFlip("horizontal"), keras.layers.RandomRotation(0.1)])
    inputs = keras.Input((RESOLUTION, RESOLUTION, 3))
    x = augment(inputs)
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(x)  # MobileNetV2's preprocess_input
    x = base(x, training=False)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dropout(0.2)(x)
    outputs = keras.layers.Dense(classes, activation="softmax")(x)
    return keras.Model(inputs, outputs), base


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, type=Path, help="a tree with train/<class>/ and test/<class>/")
    parser.add_argument("--wall-time", type=float, help="seconds for the whole run; overrides the guide's epochs")
    args = parser.parse_args()
    started = time.time()
    import keras

    keras.utils.set_random_seed(0)
    train_paths, train_labels, classes = list_split(args.data, "train")
    test_paths, _, _ = list_split(args.data, "test")
    train_x = np.stack([letterbox(p, RESOLUTION) for p in train_paths])
    test_x = np.stack([letterbox(p, RESOLUTION) for p in test_paths])
    model, base = build_model(len(classes))
    epochs_run = []
    for phase, (epochs, rate) in enumerate(zip(GUIDE_EPOCHS, RATES)):
        callbacks = []
        if args.wall_time:
            share = 1 / 3 if phase == 0 else 1.0
            deadline = started + share * (args.wall_time - EVALUATION_RESERVE_S)
            callbacks, epochs = [stop_before(deadline)], 10_000
        if phase == 1:
            base.trainable = True
        model.compile(optimizer=keras.optimizers.Adam(rate), loss="sparse_categorical_crossentropy",
                      metrics=["accuracy"])
        history = model.fit(train_x, train_labels, batch_size=BATCH, epochs=epochs, callbacks=callbacks,
                            shuffle=True, verbose=2)
        epochs_run.append(len(history.epoch))
    predicted = model.predict(test_x, batch_size=BATCH, verbose=0).argmax(axis=1)
    print(json.dumps({
        "recipe": "keras-io transfer-learning guide: MobileNetV2 a0.5, frozen head 1e-3 then all 1e-5, "
                  "flip+rotation, dropout 0.2, BatchNorm inference",
        "resolution": RESOLUTION, "phase_epochs": epochs_run,
        "train_accuracy": round(float(history.history["accuracy"][-1]), 4),
        "hand_wall_s": round(time.time() - started, 1),
        "test_predictions": [int(p) for p in predicted],
    }))


if __name__ == "__main__":
    main()
