"""Splits: the search's train/validation data, carved from the training split.

The test split is deliberately absent here: only the final evaluation reads it.
"""

import dataclasses

import numpy as np

from common.errors import UsageError


@dataclasses.dataclass
class TrainingData:
    """The arrays a search or retrain trains and validates on (never the test split).

    Attributes:
        x_train, y_train, x_val, y_val: uint8 images (arrays or `StoredImages`) and int labels.
        num_classes: K.
        key: Identifies this exact data (checksum + split), for cache keys.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    num_classes: int
    key: str = ""


# Validation must rank trials: a share of the data, but never so few images per class
# that one image moves the score by points. Small sets give up more of their images.
VALIDATION_FRACTION = 0.1
VALIDATION_PER_CLASS = 25
MOST_VALIDATION_FRACTION = 0.3


def validation_fraction_for(class_counts):
    """The share of each class to hold out for validation, and why.

    A tenth, raised until validation holds `VALIDATION_PER_CLASS` images per class on
    average, but never above `MOST_VALIDATION_FRACTION` of the training split.

    Args:
        class_counts: Training images per class.

    Returns:
        (fraction, reason).
    """
    total = sum(class_counts)
    wanted = VALIDATION_PER_CLASS * len(class_counts)
    fraction = min(MOST_VALIDATION_FRACTION, max(VALIDATION_FRACTION, wanted / total))
    size = validation_size(class_counts, fraction)
    why = (f"{size:,} of {total:,} training images" + (
        "" if fraction == VALIDATION_FRACTION else
        f": a tenth would leave {validation_size(class_counts, VALIDATION_FRACTION)} to rank the trials"))
    return round(fraction, 4), why


def validation_size(class_counts, fraction):
    """How many images `split_train_validation` holds out for validation."""
    return sum(_validation_take(n, fraction) for n in class_counts if n)


def _validation_take(members, fraction):
    return max(1, int(round(fraction * members)))


def split_train_validation(labels, fraction=0.1, seed=0):
    """A stratified, seeded split of training indices into train and validation.

    Args:
        labels: int vector of training labels.
        fraction: Share of each class that goes to validation (0 < fraction < 1).
        seed: Seed of the permutation; the same seed gives the same split.

    Returns:
        (train_indices, validation_indices), sorted int64 arrays, disjoint.
    """
    if not 0.0 < fraction < 1.0:
        raise UsageError(f"validation fraction must be in (0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    validation = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        validation.append(rng.permutation(members)[:_validation_take(len(members), fraction)])
    validation = np.sort(np.concatenate(validation))
    train = np.setdiff1d(np.arange(len(labels)), validation)
    return train, validation


def training_data(dataset, validation_fraction=0.1, seed=0, train_subset=None, val_subset=None):
    """The training split and a validation split: the one the data came with, else a
    stratified, seeded one carved from `dataset`'s training split.

    Args:
        dataset: A `Dataset`.
        validation_fraction: Share of each class held out for validation (when carved).
        seed: Seeds the split and the subsets.
        train_subset, val_subset: Keep only this many (stratified) images; None = all.
    """
    if dataset.x_val is None:
        train_idx, val_idx = split_train_validation(dataset.y_train, validation_fraction, seed)
        x_val, y_val = dataset.x_train, dataset.y_train
    else:
        train_idx, val_idx = np.arange(len(dataset.y_train)), np.arange(len(dataset.y_val))
        x_val, y_val = dataset.x_val, dataset.y_val
    train_idx = _stratified_subset(dataset.y_train, train_idx, train_subset, seed)
    val_idx = _stratified_subset(y_val, val_idx, val_subset, seed + 1)
    return TrainingData(
        x_train=dataset.x_train[train_idx],
        y_train=dataset.y_train[train_idx],
        x_val=x_val[val_idx],
        y_val=y_val[val_idx],
        num_classes=dataset.num_classes,
        key=f"{dataset.checksum[:16]}-{validation_fraction}-{seed}-{train_subset}-{val_subset}",
    )


def with_validation_merged(data):
    """`data` whose training images include its validation images (a final refit);
    the validation images stay as its validation split."""
    if hasattr(data.x_train, "rows"):  # `StoredImages` of one store
        x_train = type(data.x_train)(data.x_train.store, np.concatenate([data.x_train.rows, data.x_val.rows]))
    else:
        x_train = np.concatenate([np.asarray(data.x_train), np.asarray(data.x_val)])
    return dataclasses.replace(data, x_train=x_train, y_train=np.concatenate([data.y_train, data.y_val]),
                               key=f"{data.key}-with-validation")


def _stratified_subset(labels, indices, size, seed):
    if size is None or size >= len(indices):
        return indices
    fraction = size / len(indices)
    _, keep = split_train_validation(labels[indices], fraction, seed)
    return indices[keep]


# Classes this many times larger than others dominate an unweighted loss.
IMBALANCE_RATIO = 3


def imbalance(class_counts):
    """The largest class's images over the smallest's (classes with none left out)."""
    counts = [n for n in class_counts if n]
    return max(counts) / min(counts)


def is_imbalanced(class_counts):
    """Whether the classes' sizes differ enough (`IMBALANCE_RATIO`) to weigh every class alike."""
    return imbalance(class_counts) >= IMBALANCE_RATIO


def class_weights(labels, num_classes, mode):
    """Keras' `class_weight` for `mode`: "balanced" makes each class weigh as much in the
    loss as any other (n / (K × n_class)); "none" gives None; "auto" is "balanced" where
    the classes' sizes differ by `IMBALANCE_RATIO` or more."""
    counts = np.bincount(np.asarray(labels), minlength=num_classes)
    if mode == "auto":
        mode = "balanced" if is_imbalanced(counts) else "none"
    if mode == "none":
        return None
    if mode != "balanced":
        raise UsageError(f"class weight mode {mode!r} is not one of auto, balanced, none")
    present = counts > 0
    weights = np.where(present, len(labels) / (present.sum() * np.maximum(counts, 1)), 0.0)
    return {i: float(w) for i, w in enumerate(weights)}


def objective_for(mode, labels, num_classes):
    """What to choose models by: `mode` itself, or for "auto" balanced accuracy where the
    classes' sizes differ by `IMBALANCE_RATIO` or more (else accuracy)."""
    if mode != "auto":
        return mode
    counts = np.bincount(np.asarray(labels), minlength=num_classes)
    return "balanced_accuracy" if is_imbalanced(counts) else "accuracy"

