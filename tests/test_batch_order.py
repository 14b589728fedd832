"""The feature cache trains on batches in exactly the order the image pipeline would.

`feature_batches` (cached activations) claims to yield the same batches, in the same
order, epoch after epoch, as `make_dataset` (raw images) with the same seed: that is what
makes a cached trial the same training run as an end-to-end one. Labels here are the
images' indices, so each label batch names exactly which images it holds.
"""

import keras
import numpy as np
import pytest
from keras.applications.mobilenet_v2 import preprocess_input

from data_pipeline import load_dataset
from data_pipeline.feature_cache import feature_batches
from data_pipeline.pipeline import make_dataset

COUNT, BATCH, EPOCHS = 300, 32, 2  # 300 = 9 full batches of 32 and a last one of 12


def epochs_of_labels(dataset, epochs=EPOCHS):
    """Iterates the same dataset object `epochs` times, as Keras's fit does."""
    return [[y.numpy() for _, y in dataset] for _ in range(epochs)]


@pytest.fixture(scope="module")
def images():
    return load_dataset().x_train[:COUNT]


@pytest.mark.parametrize("seed", [0, 7])
def test_feature_batches_follow_the_image_pipelines_order_over_two_epochs(images, seed):
    ids = np.arange(COUNT)
    features = images.astype(np.float16)[..., np.newaxis] / 255  # stands in for prefix activations
    # Each trial seeds the global RNGs before it trains (as build_transfer_model does).
    keras.utils.set_random_seed(seed)
    cached = epochs_of_labels(feature_batches(features, ids, BATCH, seed))
    keras.utils.set_random_seed(seed)
    end_to_end = epochs_of_labels(make_dataset(images, ids, 32, preprocess_input, BATCH, shuffle_seed=seed))
    for epoch in range(EPOCHS):
        assert [len(b) for b in cached[epoch]] == [32] * 9 + [12]
        assert len(cached[epoch]) == len(end_to_end[epoch])
        for a, b in zip(cached[epoch], end_to_end[epoch]):
            np.testing.assert_array_equal(a, b)
        assert sorted(np.concatenate(cached[epoch])) == list(ids)  # every image once per epoch
    # The check is not vacuous: the order is shuffled, and differently in each epoch.
    first, second = (np.concatenate(e) for e in cached)
    assert not np.array_equal(first, ids) and not np.array_equal(first, second)


def test_feature_batches_carry_each_images_own_features(images):
    ids = np.arange(COUNT)
    features = images.astype(np.float16)[..., np.newaxis] / 255
    for x, y in feature_batches(features, ids, BATCH, 3):
        np.testing.assert_array_equal(x.numpy(), features[y.numpy()].astype(np.float32))


def test_unshuffled_batches_keep_the_input_order(images):
    ids = np.arange(COUNT)
    features = images.astype(np.float16)[..., np.newaxis]
    cached = np.concatenate(epochs_of_labels(feature_batches(features, ids, BATCH), epochs=1)[0])
    end_to_end = np.concatenate(epochs_of_labels(make_dataset(images, ids, 32, preprocess_input, BATCH), epochs=1)[0])
    np.testing.assert_array_equal(cached, ids)
    np.testing.assert_array_equal(end_to_end, ids)


def test_a_stream_of_passes_read_in_rounds_continues_where_the_last_round_stopped(images):
    """Search epochs shorter than a pass (`--epoch-fraction`): a Hyperband round that
    continues a trial starts its stream at the batch the earlier rounds reached."""
    ids = np.arange(COUNT)
    features = images.astype(np.float16)[..., np.newaxis] / 255
    steps = 4  # batches per search epoch: 10 batches make a pass
    whole = [y.numpy() for _, y in feature_batches(features, ids, BATCH, 5, stream_from=0).take(5 * steps)]
    first_round = [y.numpy() for _, y in feature_batches(features, ids, BATCH, 5, stream_from=0).take(steps)]
    later_round = [y.numpy() for _, y in feature_batches(features, ids, BATCH, 5, stream_from=steps).take(4 * steps)]
    for a, b in zip(first_round + later_round, whole, strict=True):
        np.testing.assert_array_equal(a, b)
    # Each pass of the stream holds every image once, in a new order, and the first
    # round's images are not seen again before the pass ends.
    passes = [np.concatenate(whole[i:i + 10]) for i in (0, 10)]
    assert all(sorted(p) == list(ids) for p in passes) and not np.array_equal(passes[0], passes[1])
    assert not set(np.concatenate(first_round)) & set(np.concatenate(whole[steps:10]))
    # The image pipeline streams the same batches.
    images_stream = make_dataset(images, ids, 32, preprocess_input, BATCH, shuffle_seed=5, stream_from=steps)
    for a, (_, b) in zip(later_round, images_stream.take(4 * steps), strict=True):
        np.testing.assert_array_equal(a, b.numpy())
