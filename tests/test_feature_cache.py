"""The frozen-prefix feature cache: exact cuts, reuse, invalidation, fall-back."""

import numpy as np
import pytest

from data_pipeline import load_dataset
from data_pipeline.feature_cache import FeatureCache
from data_pipeline.splits import TrainingData
from hypermodel.backbones import REGISTRY, get_backbone
from hypermodel.model import (PREFIX_NAME, TOP_NAME, InferencePass, build_transfer_model, prefixes_for,
                              split_backbone)
from hypermodel.space import TrialConfig
from hypermodel.training import train


def prefix_features(cache, model, cfg, images, data_key):
    """The cached prefix activations of `model` (built from `cfg`) for `images`."""
    return cache.features(
        model.get_layer(PREFIX_NAME), images, source=cfg.backbone, resolution=cfg.resolution,
        preprocess_input=get_backbone(cfg.backbone).preprocess_input, data_key=data_key,
    )


@pytest.mark.parametrize("name", sorted(set(REGISTRY) - {"mobilenet_v2_0.35", "mobilenet_v2_1.0"}))
def test_every_block_boundary_is_an_exact_cut(name):
    backbone = REGISTRY[name]
    base = backbone.build(32, weights="none")
    ends = backbone.block_ends(base)
    assert len(ends) >= 5 and ends[-1] == base.layers[-1].name
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    x = np.asarray(backbone.preprocess_input(x))
    expected = base(x, training=False).numpy()
    # Every boundary of the smaller backbones; every third of DenseNet's 60+ (and the ends).
    cuts = range(1, len(ends))
    if len(ends) > 30:
        cuts = sorted({1, 2, len(ends) - 1, *range(1, len(ends), 3)})
    for unfrozen in cuts:
        prefix, suffix = split_backbone(base, ends, unfrozen)
        got = suffix(prefix(x, training=False), training=False).numpy()
        np.testing.assert_allclose(got, expected, atol=1e-4, err_msg=f"cut at {ends[-(unfrozen + 1)]}")


def config(backbone="mobilenet_v2_0.35", resolution=32, unfrozen_blocks=0, augmentation="none"):
    return TrialConfig(backbone, resolution, unfrozen_blocks, "avg", 64, 0.0, 1e-3, "constant", 0, "adam", augmentation)


@pytest.fixture(scope="module")
def data():
    dataset = load_dataset()
    return TrainingData(dataset.x_train[:256], dataset.y_train[:256], dataset.x_train[256:384],
                        dataset.y_train[256:384], dataset.num_classes, key="slice")


def test_cached_top_computes_the_end_to_end_function(data):
    from data_pipeline.pipeline import make_dataset

    cfg = config(unfrozen_blocks=2)
    model = build_transfer_model(cfg, 10)
    features = prefix_features(FeatureCache(None), model, cfg, data.x_val, "slice/val")
    assert features.dtype == np.float32  # the prefix's own dtype: nothing rounded
    cached = model.get_layer(TOP_NAME).predict(features, verbose=0)
    images = make_dataset(data.x_val, None, 32, get_backbone(cfg.backbone).preprocess_input, 64)
    end_to_end = model.predict(images, verbose=0)
    np.testing.assert_allclose(cached, end_to_end, atol=1e-5)
    np.testing.assert_array_equal(cached.argmax(1), end_to_end.argmax(1))


def test_a_cached_trial_trains_the_same_model_as_an_end_to_end_one(data):
    """Same seed, same batches, same dropout draws: the cache changes the time, not the
    weights or the score (3 unfrozen blocks, where float16 storage changed the score)."""
    cfg = TrialConfig("mobilenet_v2_0.5", 48, 3, "avg", 64, 0.2, 1e-3, "cosine", 0, "adam", "none")
    trained = []
    # End to end; cached, features from the cache's own pass; cached, from the model's
    # inference pass (a search with head-only trials: its cuts reach the backbone's output).
    for cache, shared in ((None, False), (FeatureCache(None), False), (FeatureCache(None), True)):
        model = build_transfer_model(cfg, 10, seed=3)
        inference = InferencePass(model, get_backbone(cfg.backbone), (3, 0)) if shared else None
        history, mode = train(model, cfg, data, batch_size=64, seed=3, epochs=2, feature_cache=cache,
                              cache_cuts=(3, 0), inference=inference)
        assert mode == ("cached" if cache else "end-to-end")
        trained.append((model.get_layer(TOP_NAME).get_weights(), history.history))
    (end_to_end, e2e_history), *cached_runs = trained
    for cached, cached_history in cached_runs:
        assert len(end_to_end) == len(cached) > 8  # the blocks' kernels and the head's
        for e2e_weight, cached_weight in zip(end_to_end, cached):
            np.testing.assert_allclose(cached_weight, e2e_weight, atol=1e-4, rtol=1e-3)
        np.testing.assert_allclose(cached_history["loss"], e2e_history["loss"], rtol=1e-5)
        assert cached_history["val_accuracy"] == e2e_history["val_accuracy"]


def test_features_are_reused_across_trials_and_rebuilt_when_the_key_changes(data, tmp_path):
    cache = FeatureCache(tmp_path)
    for dense_units in (32, 64):  # two trials, same backbone/resolution/cut
        cfg = TrialConfig("mobilenet_v2_0.35", 32, 0, "avg", dense_units, 0.0, 1e-3, "constant", 0, "adam", "none")
        _, mode = train(build_transfer_model(cfg, 10), cfg, data, batch_size=64, seed=0, epochs=1,
                        feature_cache=cache)
        assert mode == "cached"
    assert (cache.builds, cache.hits) == (2, 2)  # train + validation built once, then reused
    for changed in (config(resolution=48), config(backbone="mobilenet_v2_0.5"), config(unfrozen_blocks=3)):
        before = cache.builds
        prefix_features(cache, build_transfer_model(changed, 10), changed, data.x_val, "slice/val")
        assert cache.builds == before + 1, changed
    assert len(list(tmp_path.glob("*.npy"))) == 5
    # A new cache over the same folder (a resumed run) reads them back instead of recomputing.
    resumed = FeatureCache(tmp_path)
    cfg = config()
    prefix_features(resumed, build_transfer_model(cfg, 10), cfg, data.x_val, "slice/val")
    assert (resumed.builds, resumed.hits) == (0, 1)


def test_over_budget_or_augmented_trials_fall_back_to_end_to_end(data):
    tiny = FeatureCache(None, budget_mb=0)
    _, mode = train(build_transfer_model(config(), 10), config(), data, batch_size=64, seed=0, epochs=1,
                    feature_cache=tiny)
    assert mode.startswith("end-to-end: cache") and "budget" in mode
    augmented = config(augmentation="flip_shift")
    _, mode = train(build_transfer_model(augmented, 10), augmented, data, batch_size=64, seed=0, epochs=1,
                    feature_cache=FeatureCache(None))
    assert mode == "end-to-end: augmentation"


def test_one_pass_builds_every_cut_the_search_can_ask_for(data, tmp_path):
    """The first trial of a backbone builds its cut and the search's other cuts together;
    trials with those cuts then read them, equal to what their own prefixes compute."""
    cache = FeatureCache(tmp_path, log=lambda m: None)
    first = config(unfrozen_blocks=0)
    _, mode = train(build_transfer_model(first, 10), first, data, batch_size=64, seed=0, epochs=1,
                    feature_cache=cache, cache_cuts=(0, 2, 5))
    assert mode == "cached" and cache.builds == 2  # train + validation, one pass each
    assert len(list(tmp_path.glob("*.npy"))) == 6  # three cuts × two splits
    for unfrozen in (2, 5):
        cfg = config(unfrozen_blocks=unfrozen)
        model = build_transfer_model(cfg, 10)
        before = cache.builds
        _, mode = train(model, cfg, data, batch_size=64, seed=0, epochs=1, feature_cache=cache, cache_cuts=(0, 2, 5))
        assert mode == "cached" and cache.builds == before, unfrozen  # nothing built again
        # The cached cut is what this trial's own frozen prefix computes.
        reference = FeatureCache(None).features(
            build_transfer_model(cfg, 10).get_layer(PREFIX_NAME), data.x_val, source=cfg.backbone,
            resolution=cfg.resolution, preprocess_input=get_backbone(cfg.backbone).preprocess_input,
            data_key="slice/val")
        np.testing.assert_array_equal(prefix_features(cache, model, cfg, data.x_val, "slice/val"), reference)


def test_a_pass_leaves_out_the_cuts_over_half_the_budget(data, tmp_path):
    own = config(unfrozen_blocks=0)
    model = build_transfer_model(own, 10)
    # At 32 px the stem cut (all 17 blocks unfrozen) is 16×16×8 per image, the top's 1×1×1280:
    # a budget just over the top's features, doubled, has no room for the stem's.
    budget_mb = 2 * FeatureCache.nbytes(model.get_layer(PREFIX_NAME), len(data.x_val)) * 1.1 / 2**20
    cache = FeatureCache(tmp_path, budget_mb=budget_mb, log=lambda m: None)
    cache.features(model.get_layer(PREFIX_NAME), data.x_val, source=own.backbone, resolution=32,
                   preprocess_input=get_backbone(own.backbone).preprocess_input, data_key="slice/val",
                   companions=lambda: prefixes_for(model, get_backbone(own.backbone), (0, 17)))
    # One cut was built and stored: the trial's own (its top's input), not the stem's.
    (stored,) = [np.load(path) for path in tmp_path.glob("*.npy")]
    assert stored.shape == (len(data.x_val), 1, 1, 1280), stored.shape
    assert cache.builds == 1
