"""Frozen-prefix feature cache: compute the frozen part of a backbone once, not every epoch.

A trial's model is `frozen_prefix → trainable_top` (hypermodel/transfer.py). With
BatchNorm frozen, the prefix's output for an image never changes, so it is computed
once per key — (backbone, weights, resolution, cut layer, data) — stored as float16
in RAM (up to the budget) and on disk (atomically, verified on load), and the trial
trains `trainable_top` on it: the same function as the end-to-end model, whose
weights it shares. Hyperband rounds, later trials, resumes and the retrain's phase 1
reuse it.

Augmentation: a cached trial sees no random augmentation (the cache holds one
un-augmented view). Trials whose `augmentation` is not "none" train end to end, and so
do trials under a multi-device `tf.distribute` strategy.
"""

import collections
import hashlib
import io
import json
import math
from pathlib import Path

import numpy as np
import tensorflow as tf

from data_pipeline.pipeline import make_dataset

BYTES_PER_VALUE = 2  # float16 storage


class FeatureCache:
    """Keyed store of frozen-prefix activations.

    Args:
        directory: Where features spill to disk (None = RAM only).
        budget_mb: Most RAM the cache holds; a trial whose features exceed it trains
            end to end instead.
        log: Where to report builds, reuse and fall-backs.
    """

    def __init__(self, directory=None, budget_mb=4096, log=print):
        self.directory = Path(directory) if directory else None
        self.budget_bytes = budget_mb * 2**20
        self.log = log
        self._memory = collections.OrderedDict()  # key hash → float16 array, LRU order
        self.hits = self.builds = 0
        self.last_mode = None

    def fit_top(self, model, config, data, batch_size, seed, epochs, initial_epoch, callbacks, verbose,
                learning_rate=None):
        """Trains `model`'s top on cached features; None (reason in `last_mode`) if it can't."""
        from hypermodel.transfer import PREFIX_NAME, TOP_NAME, AtomicCheckpoint, compile_for_training

        prefix, top = model.get_layer(PREFIX_NAME), model.get_layer(TOP_NAME)
        if config.augmentation != "none":
            self.last_mode = "end-to-end: augmentation"
            return None
        if model.distribute_strategy.num_replicas_in_sync > 1:
            # Multi-device trials are for accelerators, where end to end is affordable;
            # the cached top's all-reduce is not supported here.
            self.last_mode = "end-to-end: multi-device strategy"
            return None
        needed = self.nbytes(prefix, len(data.x_train) + len(data.x_val))
        if needed > self.budget_bytes:
            self.last_mode = f"end-to-end: cache {needed / 2**20:.0f} MB > budget {self.budget_bytes / 2**20:.0f} MB"
            return None
        train = self.features(prefix, config, data.x_train, data.key + "/train", batch_size)
        val = self.features(prefix, config, data.x_val, data.key + "/val", batch_size)
        compile_for_training(top, config, math.ceil(len(train) / batch_size), epochs - initial_epoch, learning_rate)
        callbacks = [cb.bind(model) if isinstance(cb, AtomicCheckpoint) else cb for cb in callbacks]
        self.last_mode = "cached"
        return top.fit(
            feature_batches(train, data.y_train, batch_size, seed),
            validation_data=feature_batches(val, data.y_val, batch_size),
            epochs=epochs, initial_epoch=initial_epoch, callbacks=callbacks, verbose=verbose,
            shuffle=False,  # feature_batches already shuffles, in the image pipeline's order
        )

    @staticmethod
    def nbytes(prefix, count):
        return count * int(np.prod(prefix.output.shape[1:])) * BYTES_PER_VALUE

    def features(self, prefix, config, images, data_key, batch_size=128):
        """The prefix's float16 output for `images`, computed at most once per key."""
        from hypermodel.backbones import get_backbone

        key = self.key(prefix, config, data_key)
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
        if digest in self._memory:
            self._memory.move_to_end(digest)
            self.hits += 1
            return self._memory[digest]
        array = self._load(digest, key, len(images))
        if array is None:
            backbone = get_backbone(config.backbone)
            ds = make_dataset(images, None, config.resolution, backbone.preprocess_input, batch_size)
            forward = tf.function(lambda x: tf.cast(prefix(x, training=False), tf.float16), reduce_retracing=True)
            array = np.concatenate([forward(batch).numpy() for batch in ds])
            self.builds += 1
            self._save(digest, key, array)
            self.log(f"  feature cache: built {key['cut']} of {config.backbone}@{config.resolution} "
                     f"for {data_key.rsplit('/', 1)[-1]} ({array.nbytes / 2**20:.0f} MB)")
        else:
            self.hits += 1
        self._remember(digest, array)
        return array

    @staticmethod
    def key(prefix, config, data_key):
        """Everything the cached activations depend on."""
        return {
            "backbone": config.backbone,
            "weights": _fingerprint(prefix),
            "resolution": config.resolution,
            "cut": prefix.layers[-1].name,
            "shape": list(prefix.output.shape[1:]),
            "data": data_key,
        }

    def _remember(self, digest, array):
        self._memory[digest] = array
        while sum(a.nbytes for a in self._memory.values()) > self.budget_bytes and len(self._memory) > 1:
            self._memory.popitem(last=False)

    def _path(self, digest):
        return self.directory / f"{digest}.npy"

    def _load(self, digest, key, count):
        if self.directory is None or not self._path(digest).exists():
            return None
        path = self._path(digest)
        try:
            meta = json.loads(path.with_suffix(".json").read_text())
            array = np.load(path, allow_pickle=False)
            if meta["key"] != key or array.shape != (count, *key["shape"]) or meta["sha256"] != _sha(array):
                raise ValueError("content does not match its key")
            return array
        except (OSError, ValueError, KeyError, EOFError) as e:
            self.log(f"  feature cache: {path.name} unusable ({e}); rebuilding")
            return None

    def _save(self, digest, key, array):
        if self.directory is None:
            return
        from data_pipeline import atomic

        buffer = io.BytesIO()
        np.save(buffer, array, allow_pickle=False)
        atomic.write_bytes(self._path(digest), buffer.getvalue())
        atomic.write_json(self._path(digest).with_suffix(".json"), {"key": key, "sha256": _sha(array)})


def feature_batches(features, labels, batch_size, shuffle_seed=None):
    """Batches of cached features in exactly the order `make_dataset` batches the images.

    tf.data's shuffle order depends only on the element count and the seeds, so
    shuffling indices with the same seed reproduces the end-to-end pipeline's batches.
    Features are gathered from the NumPy array per batch (no giant graph constant).
    """
    ds = tf.data.Dataset.range(len(features))
    if shuffle_seed is not None:
        ds = ds.shuffle(len(features), seed=shuffle_seed, reshuffle_each_iteration=True)

    def gather(indices):
        return features[indices].astype(np.float32), labels[indices].astype(np.int32)

    def load(indices):
        x, y = tf.numpy_function(gather, [indices], (tf.float32, tf.int32))
        x.set_shape([None, *features.shape[1:]])
        y.set_shape([None])
        return x, y

    return ds.batch(batch_size).map(load, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def _sha(array):
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def _fingerprint(model):
    """A cheap identity of a model's weights: a hash of a sample of every variable."""
    h = hashlib.sha256()
    for w in model.weights:
        value = np.asarray(w.numpy()).ravel()
        h.update(value[:: max(1, value.size // 64)].tobytes())
    return h.hexdigest()[:16]
