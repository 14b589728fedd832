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
        take = max(1, int(round(fraction * len(members))))
        validation.append(rng.permutation(members)[:take])
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


def _stratified_subset(labels, indices, size, seed):
    if size is None or size >= len(indices):
        return indices
    fraction = size / len(indices)
    _, keep = split_train_validation(labels[indices], fraction, seed)
    return indices[keep]
