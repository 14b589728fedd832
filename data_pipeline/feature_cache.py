"""Frozen-prefix feature cache: compute the frozen part of a backbone once, not every epoch.

A trial's model is `frozen_prefix → trainable_top` (hypermodel/model.py). With
BatchNorm frozen, the prefix's output for an image never changes, so it is computed
once per key — (backbone, weights, resolution, cut layer, dtype, data) — and stored in
RAM (up to the budget) and on disk (atomically, verified on load), in the prefix's own
output dtype: a cached top then trains on exactly the values the end-to-end model
computes, so the cache changes a trial's time, not its result. (Rounded to float16, the
activations of a 3-block top changed its validation accuracy by up to 1.3 pp.)
`hypermodel.training` trains `trainable_top` on it; Hyperband rounds, later trials,
resumes and the retrain's phase 1 reuse it. This module only computes and stores
activations: it never compiles or fits a model.
"""

import collections
import hashlib
import json
from contextlib import nullcontext
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from common import atomic
from data_pipeline.pipeline import BATCHES_AHEAD, MAP_THREADS, batch_order, make_dataset, without_autotune

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
        self._memory = collections.OrderedDict()  # key hash → array, LRU order
        self._last_pass = (None, None)  # (cuts, traced pass): the next split reuses it
        self.hits = self.builds = 0

    @staticmethod
    def nbytes(prefix, count):
        return count * int(np.prod(prefix.output.shape[1:])) * np.dtype(prefix.output.dtype).itemsize

    def features(self, prefix, images, source, resolution, preprocess_input, data_key, batch_size=128,
                 companions=list, fingerprints=None, run_pass=None):
        """The prefix's output for `images`, computed at most once per key.

        Args:
            prefix: The frozen prefix model.
            images: uint8 N×28×28 images.
            source: Names the network the prefix was cut from (e.g. the backbone).
            resolution, preprocess_input: How images are prepared for the prefix.
            data_key: Identifies `images` (dataset checksum + split).
            batch_size: Images per predict step, whatever the training batch (below 128
                the per-step overhead dominates small prefixes).
            companions: Returns other prefixes on `prefix`'s input graph (the cuts later
                trials may ask for); called only when this key has to be built: those
                not cached yet are built in the same pass while their features fit in
                half the budget (one trace, the layers they share computed once).
            fingerprints: A dict to share the weights' fingerprints (by variable) with
                other calls made while the weights cannot change, such as one trial's
                train and validation features; else shared within this call only.
            run_pass: A traced function from a batch of preprocessed images to {cut
                layer name: activations} for `prefix` and every companion (one the
                caller traced anyway); None: the cache traces one over the prefixes.
        """
        fingerprints = {} if fingerprints is None else fingerprints
        key = self.key(prefix, source, resolution, data_key, fingerprints)
        digest = _digest(key)
        if digest in self._memory:
            self._memory.move_to_end(digest)
            self.hits += 1
            return self._memory[digest]
        array, built = self._load(digest, key, len(images)), False
        if array is None:
            # Local workers sharing the directory: one builds a key, the others wait and read it.
            with atomic.exclusive(self._path(digest).with_suffix(".lock")) if self.directory else nullcontext():
                array = self._load(digest, key, len(images))
                if array is None:
                    others = [(c, self.key(c, source, resolution, data_key, fingerprints)) for c in companions()]
                    group = [(prefix, key)] + self._missing((prefix, key), others, len(images))
                    cuts = [member_key["cut"] for _, member_key in group]
                    arrays = _predict(run_pass or self._pass_function(group), cuts, images, resolution,
                                      preprocess_input, batch_size)
                    for (_, member_key), member_array in zip(group, arrays):
                        self._save(_digest(member_key), member_key, member_array)
                        self.log(f"  feature cache: built {member_key['cut']} of {source}@{resolution} "
                                 f"for {data_key.rsplit('/', 1)[-1]} ({member_array.nbytes / 2**20:.0f} MB)")
                    # The companions first: the trial's own key, remembered below, is evicted last.
                    for (_, member_key), member_array in zip(group[1:], arrays[1:]):
                        self._remember(_digest(member_key), member_array)
                    array, built = arrays[0], True
        if built:
            self.builds += 1
        else:
            self.hits += 1
        self._remember(digest, array)
        return array

    def _missing(self, own, candidates, count):
        """The (prefix, key) candidates worth building with `own` (one too): not it, not
        cached, and together with it within half the budget."""
        chosen, total = [], self.nbytes(own[0], count)
        for prefix, key in candidates:
            digest, size = _digest(key), self.nbytes(prefix, count)
            cached = digest in self._memory or (self.directory and self._path(digest).exists())
            if key == own[1] or cached or total + size > self.budget_bytes / 2:
                continue
            chosen.append((prefix, key))
            total += size
        return chosen

    def _pass_function(self, group):
        """A traced function from images to {cut layer name: activations} for every prefix
        of `group` ((prefix, key) pairs); the same function again when the next split asks
        for the same cuts. A plain `tf.function` traces in half the time Keras' predict
        step takes."""
        cuts = [{k: v for k, v in key.items() if k != "data"} for _, key in group]
        if self._last_pass[0] != cuts:
            prefixes = [prefix for prefix, _ in group]
            model = keras.Model(prefixes[0].input, [prefix.output for prefix in prefixes])
            names = [key["cut"] for key in cuts]
            run_pass = tf.function(lambda images: dict(zip(names, tf.nest.flatten(model(images, training=False)))),
                                   autograph=False)
            self._last_pass = (cuts, run_pass)
        return self._last_pass[1]

    @staticmethod
    def key(prefix, source, resolution, data_key, fingerprints=None):
        """Everything the cached activations depend on (`fingerprints`: as in `features`)."""
        return {
            "backbone": source,
            "weights": _fingerprint(prefix, {} if fingerprints is None else fingerprints),
            "resolution": resolution,
            "cut": prefix.layers[-1].name,
            "shape": list(prefix.output.shape[1:]),
            "dtype": str(prefix.output.dtype),
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
        with atomic.open_for_replace(self._path(digest)) as f:  # no in-memory copy of the array
            np.save(f, array, allow_pickle=False)
        atomic.write_json(self._path(digest).with_suffix(".json"), {"key": key, "sha256": _sha(array)})


def feature_batches(features, labels, batch_size, shuffle_seed=None, stream_from=None):
    """Batches of cached features (as float32), in exactly the order
    `make_dataset` batches the images with the same arguments (`batch_order`). The
    features are one tensor and each batch a `tf.gather` in the graph: a head's step
    takes milliseconds, so no Python runs per batch."""
    features = tf.constant(features)
    labels = tf.constant(np.asarray(labels, dtype=np.int32))

    @tf.autograph.experimental.do_not_convert
    def gather(indices):
        return tf.cast(tf.gather(features, indices), tf.float32), tf.gather(labels, indices)

    order = batch_order(len(labels), batch_size, shuffle_seed, stream_from)
    return without_autotune(order.map(gather, num_parallel_calls=MAP_THREADS).prefetch(BATCHES_AHEAD))


def _predict(function, cuts, images, resolution, preprocess_input, batch_size):
    """Arrays of `function`'s activations at `cuts` (layer names) for `images`, in their
    own dtypes."""
    outputs = [[] for _ in cuts]
    for batch in make_dataset(images, None, resolution, preprocess_input, batch_size):
        count = batch.shape[0]
        if count < batch_size:
            # Padded to a full batch: a smaller one would trace the function again.
            batch = tf.concat([batch, tf.zeros((batch_size - count, *batch.shape[1:]), batch.dtype)], 0)
        activations = function(batch)
        for output, cut in zip(outputs, cuts):
            output.append(activations[cut][:count].numpy())
    return [np.concatenate(output) for output in outputs]


def _digest(key):
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


def _sha(array):
    return hashlib.sha256(np.ascontiguousarray(array)).hexdigest()  # hashes the buffer: no copy


def _fingerprint(model, samples):
    """A cheap identity of a model's weights: a hash of a sample of every variable.

    Args:
        samples: {id(variable): its sample}, filled here; reading a variable is most of
            the cost, and the prefixes of one backbone share theirs.
    """
    h = hashlib.sha256()
    for w in model.weights:
        if id(w) not in samples:
            value = np.asarray(w.numpy()).ravel()
            samples[id(w)] = value[:: max(1, value.size // 64)].tobytes()
        h.update(samples[id(w)])
    return h.hexdigest()[:16]
