"""Feed data through tf.data without ever materialising resized copies.

The raw uint8 28×28 images (47 MB for 60k) are what is cached. Each batch is then
cast, augmented at 28×28 (cheap), turned gray→RGB, resized to the backbone's input
resolution and preprocessed, so peak memory depends on the batch size, not on the
resolution or the dataset size.
"""

import numpy as np
import tensorflow as tf

from common.errors import UsageError

AUGMENTATIONS = ("none", "flip", "flip_shift", "flip_shift_erase")


def prepare_images(images, resolution, preprocess_input):
    """uint8 [batch, 28, 28] (or float) → preprocessed float32 [batch, res, res, 3].

    The one image transform shared by training, evaluation and the exported model.
    """
    x = tf.cast(images, tf.float32)
    if x.shape.rank == 3:
        x = x[..., tf.newaxis]
    x = tf.image.grayscale_to_rgb(x)
    x = tf.image.resize(x, (resolution, resolution), method="bilinear")
    return preprocess_input(x)


def augment_images(images, augmentation):
    """Training-only augmentation at 28×28, before the (expensive) resize.

    Args:
        images: float32 [batch, 28, 28, 1].
        augmentation: One of `AUGMENTATIONS`.
    """
    if augmentation == "none":
        return images
    batch = tf.shape(images)[0]
    images = tf.where(
        tf.random.uniform([batch, 1, 1, 1]) < 0.5, tf.reverse(images, axis=[2]), images
    )
    if augmentation == "flip":
        return images
    # Shift up to 2 px in each direction, zero fill (the background is black).
    shifts = tf.random.uniform([batch, 2], -2, 3, dtype=tf.int32)
    shifts = tf.cast(shifts, tf.float32)
    ones, zeros = tf.ones([batch, 1]), tf.zeros([batch, 1])
    transforms = tf.concat(
        [ones, zeros, -shifts[:, :1], zeros, ones, -shifts[:, 1:], zeros, zeros], axis=1
    )
    images = tf.raw_ops.ImageProjectiveTransformV3(
        images=images, transforms=transforms, output_shape=tf.shape(images)[1:3],
        interpolation="NEAREST", fill_mode="CONSTANT", fill_value=0.0,
    )
    if augmentation == "flip_shift_erase":
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
):
    """The tf.data pipeline: cache raw → shuffle → batch → augment → RGB → resize → preprocess.

    Args:
        images: uint8 N×28×28 numpy array.
        labels: int vector, or None for unlabeled data.
        resolution: Side of the square model input.
        preprocess_input: The backbone's `preprocess_input`.
        batch_size: Images per batch.
        shuffle_seed: None for a fixed order (evaluation); an int to reshuffle each
            epoch in a seeded order (training).
        augmentation: One of `AUGMENTATIONS`; applied only when training.

    Returns:
        A `tf.data.Dataset` of (images, labels) or images batches.
    """
    if augmentation not in AUGMENTATIONS:
        raise UsageError(f"augmentation {augmentation!r} is not one of {AUGMENTATIONS}")
    items = images if labels is None else (images, labels)
    ds = tf.data.Dataset.from_tensor_slices(items).cache()
    if shuffle_seed is not None:
        ds = ds.shuffle(len(images), seed=shuffle_seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)

    def transform(x, *y):
        x = tf.cast(x, tf.float32)[..., tf.newaxis]
        if shuffle_seed is not None:
            x = augment_images(x, augmentation)
        x = prepare_images(x, resolution, preprocess_input)
        return (x, *y) if y else x

    return ds.map(transform, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)
