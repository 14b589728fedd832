"""Feed data through tf.data without ever materialising resized copies.

The stored uint8 images — 28×28 arrays in RAM, or file images decoded once into the
image store (data_pipeline/store.py) — are what is kept. Each batch is gathered from
them by index, cast, augmented at the stored size (cheap), turned to RGB, resized to
the backbone's input resolution and preprocessed, so peak memory depends on the batch
size, not on the resolution or the dataset size.
"""

import numpy as np
import tensorflow as tf

from common.cpus import usable_cpus
from common.errors import UsageError

# Each map of a pipeline runs on this many threads and keeps this many batches ready.
MAP_THREADS = usable_cpus()
BATCHES_AHEAD = 2

# Flips are searchable: they help photos and clothes, and hurt digits and text.
AUGMENTATIONS = ("none", "flip", "flip_shift", "flip_shift_erase", "shift", "shift_erase")


def prepare_images(images, resolution, preprocess_input):
    """uint8 [batch, h, w] or [batch, h, w, 1 or 3] → preprocessed float32 [batch, res, res, 3].

    The one image transform shared by training, evaluation and the exported model.
    """
    x = tf.cast(images, tf.float32)
    if x.shape.rank == 3:
        x = x[..., tf.newaxis]
    if x.shape[-1] == 1:
        x = tf.image.grayscale_to_rgb(x)
    x = tf.image.resize(x, (resolution, resolution), method="bilinear")
    return preprocess_input(x)


def flip_images(images):
    """Horizontal flip of an NHWC batch."""
    return tf.reverse(images, axis=[2])


def augment_images(images, augmentation):
    """Training-only augmentation at the stored size, before the (expensive) resize.

    Args:
        images: float32 [batch, h, w, channels].
        augmentation: One of `AUGMENTATIONS`.
    """
    if augmentation not in AUGMENTATIONS:
        raise UsageError(f"augmentation {augmentation!r} is not one of {AUGMENTATIONS}")
    if augmentation == "none":
        return images
    batch = tf.shape(images)[0]
    if augmentation.startswith("flip"):
        images = tf.where(tf.random.uniform([batch, 1, 1, 1]) < 0.5, flip_images(images), images)
    if "shift" not in augmentation:
        return images
    # Shift up to 1/14 of the side (2 px at 28) in each direction, black fill.
    most = max(1, round(images.shape[1] / 14))
    shifts = tf.random.uniform([batch, 2], -most, most + 1, dtype=tf.int32)
    shifts = tf.cast(shifts, tf.float32)
    ones, zeros = tf.ones([batch, 1]), tf.zeros([batch, 1])
    transforms = tf.concat(
        [ones, zeros, -shifts[:, :1], zeros, ones, -shifts[:, 1:], zeros, zeros], axis=1
    )
    images = tf.raw_ops.ImageProjectiveTransformV3(
        images=images, transforms=transforms, output_shape=tf.shape(images)[1:3],
        interpolation="NEAREST", fill_mode="CONSTANT", fill_value=0.0,
    )
    if augmentation.endswith("erase"):
        images = _random_erase(images)
    return images


def _random_erase(images, probability=0.5):
    """Random erasing (Zhong et al. 2017): blank a random box of 2–25 % of the image."""
    batch = tf.shape(images)[0]
    side = tf.shape(images)[1]
    area = tf.random.uniform([batch], 0.02, 0.25)
    aspect = tf.exp(tf.random.uniform([batch], np.log(0.3), np.log(3.3)))
    sidef = tf.cast(side, tf.float32)
    h = tf.clip_by_value(tf.sqrt(area * aspect) * sidef, 1.0, sidef)
    w = tf.clip_by_value(tf.sqrt(area / aspect) * sidef, 1.0, sidef)
    y0 = tf.random.uniform([batch]) * (sidef - h)
    x0 = tf.random.uniform([batch]) * (sidef - w)
    grid = tf.cast(tf.range(side), tf.float32)
    rows = (grid[None, :] >= y0[:, None]) & (grid[None, :] < (y0 + h)[:, None])
    cols = (grid[None, :] >= x0[:, None]) & (grid[None, :] < (x0 + w)[:, None])
    box = rows[:, :, None] & cols[:, None, :]
    box &= (tf.random.uniform([batch]) < probability)[:, None, None]
    return tf.where(box[..., None], 0.0, images)


def make_dataset(
    images,
    labels,
    resolution,
    preprocess_input,
    batch_size=64,
    shuffle_seed=None,
    augmentation="none",
    stream_from=None,
):
    """The tf.data pipeline: gather stored images → augment → RGB → resize → preprocess.

    Args:
        images: uint8 N×H×W[×C] numpy array, or `StoredImages` (data_pipeline/store.py).
        labels: int vector, or None for unlabeled data.
        resolution: Side of the square model input.
        preprocess_input: The backbone's `preprocess_input`.
        batch_size: Images per batch.
        shuffle_seed: None for a fixed order (evaluation); an int to reshuffle each
            epoch in a seeded order (training).
        augmentation: One of `AUGMENTATIONS`; applied only when training.
        stream_from: None for one pass; else an endless stream of passes starting at
            this batch (see `batch_order`).

    Returns:
        A `tf.data.Dataset` of (images, labels) or images batches.
    """
    if augmentation not in AUGMENTATIONS:
        raise UsageError(f"augmentation {augmentation!r} is not one of {AUGMENTATIONS}")

    # Static Python only (no branch on a tensor): autograph would spend a quarter second converting it.
    @tf.autograph.experimental.do_not_convert
    def transform(x, *y):
        x = tf.cast(x, tf.float32)
        if x.shape.rank == 3:
            x = x[..., tf.newaxis]
        if shuffle_seed is not None:
            x = augment_images(x, augmentation)
        x = prepare_images(x, resolution, preprocess_input)
        return (x, *y) if y else x

    ds = indexed_batches(images, labels, batch_size, shuffle_seed, stream_from)
    return without_autotune(ds.map(transform, num_parallel_calls=MAP_THREADS).prefetch(BATCHES_AHEAD))


def without_autotune(ds):
    """`ds` with tf.data's autotuning off (its maps and prefetches set to fixed sizes).

    Deleting an autotuned iterator can wait seconds for one of its threads: search
    trials' `fit` returned 0-19 s after their training ended, and at once without
    autotuning (benchmarks/RESULTS.md §9). Fixed sizes feed a 96 px MobileNetV2 as fast.
    """
    options = tf.data.Options()
    options.autotune.enabled = False
    return ds.with_options(options)


def batch_order(count, batch_size, shuffle_seed=None, stream_from=None):
    """Batches of element indices 0..count-1: the one order every pipeline here follows.

    tf.data's shuffle order depends only on the element count and the seeds, so any
    two arrays of the same length batched in this order with the same seed line up: the
    feature cache relies on this to feed the same batches as the image pipeline.

    Args:
        shuffle_seed: None for a fixed order; an int to reshuffle each pass in a seeded order.
        stream_from: None for one pass; else an endless stream of passes (each reshuffled)
            that starts at this batch. A search epoch shorter than a pass reads such a
            stream, and a Hyperband round that continues a trial picks it up where the
            trial's earlier rounds stopped, so no image is seen twice before the pass ends.
    """
    ds = tf.data.Dataset.range(count)
    if shuffle_seed is not None:
        ds = ds.shuffle(count, seed=shuffle_seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)
    if stream_from is not None:
        ds = ds.repeat().skip(stream_from)  # skips index batches: nothing is gathered
    return ds


def indexed_batches(images, labels, batch_size, shuffle_seed=None, stream_from=None):
    """Batches gathered by index from `images` (and `labels`) in `batch_order`.

    Args:
        images: A numpy array (or anything whose `gather(indices)` / `[indices]` does that).
        labels: int vector, or None.
    """
    ds = batch_order(len(images), batch_size, shuffle_seed, stream_from)
    take = getattr(images, "gather", None) or images.__getitem__

    def gather(indices):
        x = np.asarray(take(indices), dtype=np.uint8)
        return (x,) if labels is None else (x, labels[indices].astype(np.int32))

    @tf.autograph.experimental.do_not_convert
    def load(indices):
        out = tf.numpy_function(gather, [indices], (tf.uint8,) if labels is None else (tf.uint8, tf.int32))
        out[0].set_shape([None, *images.shape[1:]])
        if labels is None:
            return out[0]
        out[1].set_shape([None])
        return out[0], out[1]

    return ds.map(load, num_parallel_calls=MAP_THREADS)
