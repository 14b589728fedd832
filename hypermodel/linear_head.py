"""A linear head fitted exactly: the multinomial logistic regression of the frozen
backbone's pooled features, its L2 strength chosen on validation (a linear probe).

Training a linear head with a few epochs of Adam from a random start approximates the
solution of this convex problem; L-BFGS finds the solution itself, in seconds on a few
thousand images. The retrain's phase 1 fits a linear head this way, so that fine-tuning
starts from the best head the frozen features allow (linear probing, then fine-tuning),
and a dataset too small to fine-tune keeps at least the probe.
"""

import time

import keras
import numpy as np

from data_pipeline.pipeline import make_dataset
from hypermodel.backbones import get_backbone
from hypermodel.model import PREFIX_NAME, TOP_NAME

# scikit-learn's C (inverse L2 strength) on standardised features, strongest first: on
# ties validation keeps the stronger regularisation.
INVERSE_L2 = (0.01, 0.1, 1.0, 10.0)
MAX_ITERATIONS = 2000
# Standardisation divides by each feature's spread, floored at this share of the median
# spread, so that no feature is magnified beyond a typical one. The int8 export rounds
# each class's weights to 255 levels of its largest: a feature nearly constant over the
# training images (a channel ReLU6 keeps near 0) would otherwise get a weight many times
# the others', and most weights would round to zero (at a tenth of the median, an 8 px
# digits head's int8 file lost 22 pp). Float accuracy moves by under a point either way
# on four datasets (benchmarks/linear_head_floor.py).
SPREAD_FLOOR = 1.0


def pooled_features(model, config, images, batch_size):
    """The linear head's inputs for `images`: `model`'s pooled backbone features (float32 N×D)."""
    top = model.get_layer(TOP_NAME)
    pool = next(layer for layer in top.layers
                if isinstance(layer, (keras.layers.GlobalAveragePooling2D, keras.layers.Flatten)))
    inputs = keras.Input(model.input.shape[1:])
    features = keras.Model(top.input, pool.output)(model.get_layer(PREFIX_NAME)(inputs, training=False))
    extractor = keras.Model(inputs, features)
    ds = make_dataset(images, None, config.resolution, get_backbone(config.backbone).preprocess_input, batch_size)
    return extractor.predict(ds, verbose=0).astype(np.float32)


def validation_score(objective, truth, predicted):
    """`objective` (hypermodel.space.OBJECTIVES) of `predicted` against `truth`."""
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

    if objective == "balanced_accuracy":
        return float(balanced_accuracy_score(truth, predicted))
    if objective == "macro_f1":
        return float(f1_score(truth, predicted, average="macro"))
    return float(accuracy_score(truth, predicted))


class LinearProbe:
    """The logistic regression of standardised features (`SPREAD_FLOOR`), as a softmax layer's weights.

    Args:
        num_classes: K, the model's outputs (classes absent from the training labels
            get a bias that never wins).
        class_weight: Keras' {class: weight}, or None.
    """

    def __init__(self, num_classes, class_weight=None):
        self.num_classes, self.class_weight = num_classes, class_weight

    def fit(self, features, labels, inverse_l2):
        """Fits at C = `inverse_l2`; returns (kernel D×K, bias K) for `softmax(f @ kernel + bias)`."""
        (_, kernel, bias), = self.fit_path(features, labels, [inverse_l2])
        return kernel, bias

    def fit_path(self, features, labels, inverse_l2s):
        """Fits at each C of `inverse_l2s` in turn, each fit starting from the one before
        (a regularisation path: from strong to weak L2, L-BFGS needs a fraction of the
        iterations a cold start does). Yields (C, kernel, bias)."""
        from sklearn.linear_model import LogisticRegression

        mean, spread = features.mean(axis=0), features.std(axis=0)
        spread = np.maximum(spread, SPREAD_FLOOR * np.median(spread) + 1e-12)
        standardised = (features - mean) / spread
        regression = LogisticRegression(max_iter=MAX_ITERATIONS, class_weight=self.class_weight, warm_start=True)
        for inverse_l2 in inverse_l2s:
            regression.set_params(C=inverse_l2).fit(standardised, labels)
            yield (inverse_l2, *self._as_layer_weights(regression, features.shape[1], mean, spread))

    def _as_layer_weights(self, regression, dimensions, mean, spread):
        coef, intercept = regression.coef_, regression.intercept_
        if len(regression.classes_) == 2:  # one logit difference: split it over the two classes
            coef, intercept = np.concatenate([-coef, coef]) / 2, np.array([-intercept[0], intercept[0]]) / 2
        # The standardisation folded into the layer: (f - μ)/σ · w = f · (w/σ) - μ/σ · w.
        kernel = np.zeros((dimensions, self.num_classes), np.float32)
        bias = np.full(self.num_classes, -1e4, np.float32)
        scaled = coef / spread
        kernel[:, regression.classes_] = scaled.T
        bias[regression.classes_] = intercept - scaled @ mean
        return kernel, bias


def fit_linear_head(model, config, data, batch_size, class_weight, objective, inverse_l2=INVERSE_L2, log=print,
                    memo=None):
    """Sets `model`'s linear head to the logistic regression of its pooled features.

    With several `inverse_l2` values, each is fitted on the training images and scored on
    validation by `objective`; the best is kept.

    Args:
        model: A model from `build_transfer_model` with `config.head == "linear"`.
        config: Its `TrialConfig`.
        data: `TrainingData`.
        class_weight: Keras' {class: weight}, or None.
        objective: What validation chooses by (hypermodel.space.OBJECTIVES).
        inverse_l2: The C values to try.
        memo: Where extracted features are kept and reused (`remember_merged_features`), for
            models whose backbone is the same fresh pretrained one; None extracts anew.

    Returns:
        The phase's record: its validation scores (as a one-epoch history), the chosen C
        and each C's score.
    """
    started = time.time()
    memo = {} if memo is None or not data.key else memo  # data without a key cannot be told apart
    key = _memo_key(config, data)
    reused = key in memo
    if not reused:
        memo[key] = (pooled_features(model, config, data.x_train, batch_size),
                     pooled_features(model, config, data.x_val, batch_size))
    train_features, val_features = memo[key]
    extracted = "reused" if reused else f"{time.time() - started:.0f} s to extract"
    probe, grid, best = LinearProbe(data.num_classes, class_weight), [], None
    for c, kernel, bias in probe.fit_path(train_features, data.y_train, sorted(inverse_l2)):
        predicted = np.argmax(val_features @ kernel + bias, axis=1)
        score = validation_score(objective, data.y_val, predicted)
        grid.append({"C": c, f"val_{objective}": round(score, 4)})
        if best is None or score > best[0]:
            best = (score, c, kernel, bias)
    score, c, kernel, bias = best
    model.get_layer(TOP_NAME).layers[-1].set_weights([kernel, bias])
    history = {**_fit_quality(train_features @ kernel + bias, data.y_train),
               **_fit_quality(val_features @ kernel + bias, data.y_val, "val_"), f"val_{objective}": [score]}
    log(f"    linear head fitted exactly on {len(data.y_train)} images' pooled features "
        f"({extracted}): C = {c} of {', '.join(map(str, inverse_l2))} by validation {objective}")
    return {
        "history": history,
        "best_val_accuracy": history["val_accuracy"][0],
        "objective": objective,
        "best_val_score": score,
        "best_epoch": 1,
        "epochs": 1,
        "seconds": round(time.time() - started, 1),
        "mode": "exact: logistic regression (L-BFGS)",
        "inverse_l2": c,
        "grid": grid,
    }


def remember_merged_features(memo, config, data, merged):
    """Keeps `merged`'s features (`with_validation_merged(data)`: training images, then
    validation's) in `memo` where `data`'s are, so that a refit extracts none."""
    if memo is not None and _memo_key(config, data) in memo:  # never there for data without a key
        train_features, val_features = memo[_memo_key(config, data)]
        memo[_memo_key(config, merged)] = (np.concatenate([train_features, val_features]), val_features)


def _memo_key(config, data):
    return config.backbone, config.resolution, data.key


def _fit_quality(logits, labels, prefix=""):
    """Keras-style one-epoch logs of a softmax's `logits`: cross-entropy and accuracy."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probabilities = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return {f"{prefix}loss": [float(-np.mean(log_probabilities[np.arange(len(labels)), labels]))],
            f"{prefix}accuracy": [float(np.mean(logits.argmax(axis=1) == labels))]}
