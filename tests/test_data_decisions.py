"""The defaults decided from the data, each on real data: scikit-learn's 8×8 handwritten
digits (written as a folder of PNGs), Fashion-MNIST (28×28 arrays, a slice made
imbalanced) and matplotlib's sample photographs."""

import dataclasses
import json
import math

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from cli import run_cli
from data_pipeline import load_dataset
from data_pipeline.images import decode_square
from data_pipeline.splits import training_data
from hypermodel.space import BACKBONE_STRIDE
from image_folders import sample_photos
from tuning.data_decisions import DataFacts, decide
from tuning.profiles import PROFILES
from tuning.retrain import PhaseLengths
from tuning.settings import resolve


def write_digits(root):
    """scikit-learn's 1 797 scanned 8×8 digits as root/<digit>/<n>.png (grayscale)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i, (image, label) in enumerate(zip(digits.images, digits.target)):
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.round(image * 255 / 16).astype(np.uint8)).save(folder / f"{i:04d}.png")
    return root


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return load_dataset(write_digits(tmp_path_factory.mktemp("digits") / "digits"))


@pytest.fixture(scope="module")
def digits_decoded(digits, tmp_path_factory):
    """The digits' `Dataset`, decoded into an image store as a run would."""
    from tuning.jobs import decided as with_decisions, materialize

    settings, _ = with_decisions(resolve("cpu", PROFILES["cpu"], {}), digits, log=lambda _: None)
    return materialize(digits, settings, tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def fashion():
    return load_dataset(None)


def decided(source, profile="cpu", **given):
    settings = resolve(profile, PROFILES[profile], given)
    return decide(settings, DataFacts.of(source), explicit=set(given))


def by_setting(decisions):
    return {d.setting: d for d in decisions}


def test_tiny_images_are_searched_where_the_backbone_sees_at_least_3x3(digits, fashion):
    for source in (digits, fashion):
        settings, decisions = decided(source)
        assert all(r // BACKBONE_STRIDE >= 3 for r in settings.choices.resolutions), settings.choices.resolutions
        assert "3×3" in by_setting(decisions)["resolutions"].reason
    # 1.2k digits afford larger sizes too (the search decides); Fashion-MNIST's 54 000 images
    # at more than 96 px would not fit the profile's hour.
    assert len(decided(digits)[0].choices.resolutions) == 2
    assert decided(fashion)[0].choices.resolutions == (96,)
    # An explicit flag wins.
    settings, decisions = decided(digits, resolutions=(48,))
    assert settings.choices.resolutions == (48,) and "resolutions" not in by_setting(decisions)


def test_photos_search_up_to_what_their_detail_and_the_budget_allow(tmp_path):
    folder = tmp_path / "photos"
    for kind, photo in zip(("a", "b"), sample_photos()[:2]):
        (folder / kind).mkdir(parents=True)
        for i in range(4):
            Image.open(photo).convert("RGB").save(folder / kind / f"{i}.png")
    source = load_dataset(folder)
    side = np.median([max(f.width, f.height) for f in source.files])
    assert side >= 224
    resolutions = decided(source)[0].choices.resolutions
    assert min(resolutions) == 96 and max(resolutions) > 96, resolutions
    # A handful of test images: one image moves the accuracy by many points, so an export
    # is not rejected for differing on one or two of them.
    assert decided(source)[0].max_accuracy_drop > 1.0
    # A machine that affords nothing larger searches the smallest useful size only.
    poor = dataclasses.replace(resolve("cpu", PROFILES["cpu"], {}), pixel_budget=1)
    assert decide(poor, DataFacts.of(source))[0].choices.resolutions == (96,)


def test_validation_holds_enough_images_per_class_to_rank_trials(digits, digits_decoded, fashion):
    settings, _ = decided(digits)
    data = training_data(digits_decoded, settings.validation_fraction, settings.seed)
    classes = digits.num_classes
    assert len(data.y_val) >= 20 * classes, len(data.y_val)  # a tenth would leave ~14 per class
    assert len(data.y_val) <= 0.3 * len(digits_decoded.y_train)
    assert min(np.bincount(data.y_val)) >= 20
    # A large dataset keeps its tenth: nothing to gain from a larger share.
    assert decided(fashion)[0].validation_fraction == pytest.approx(0.1)


def test_a_search_round_is_images_seen_not_a_share_of_a_pass(digits, digits_decoded, fashion):
    small, _ = decided(digits)
    large, _ = decided(fashion)
    # 1.2k training images: each round trains on several passes; Fashion's 8k slice: a third of one.
    assert small.epoch_fraction > 1 and large.epoch_fraction < 1

    def round_images(settings, source):
        data = training_data(source, settings.validation_fraction, settings.seed, settings.train_subset)
        return settings.epoch_fraction * len(data.y_train)

    assert round_images(small, digits_decoded) == pytest.approx(round_images(large, fashion), rel=0.01)
    # Cheap trials on a small dataset: the smoke search sweeps its brackets again until its budget.
    assert decided(digits, "smoke")[0].hyperband_iterations > decided(fashion, "smoke")[0].hyperband_iterations


def test_fine_tuning_depth_follows_the_training_images(digits, fashion):
    small, large = decided(digits)[0].choices.unfrozen_blocks, decided(fashion)[0].choices.unfrozen_blocks
    assert 0 in small and max(small) < min(large), (small, large)


def test_a_small_dataset_gets_minutes_and_a_large_one_its_profile_hour(digits, fashion):
    small, decisions = decided(digits)
    assert small.job_time_budget_s <= 15 * 60 and small.time_budget_s < small.job_time_budget_s
    assert "upper bound" in by_setting(decisions)["job_time_budget_s"].reason
    large, decisions = decided(fashion)
    assert large.job_time_budget_s == PROFILES["cpu"]["job_time_budget_s"]
    assert "job_time_budget_s" not in by_setting(decisions)
    assert "max_accuracy_drop" not in by_setting(decisions)  # 10 000 test images
    # An explicit budget is the user's.
    assert decided(digits, job_time_budget_s=3600)[0].job_time_budget_s == 3600


def test_imbalanced_classes_are_weighted_and_chosen_by_balanced_accuracy(fashion):
    rng = np.random.default_rng(0)
    keep = np.concatenate([rng.choice(np.flatnonzero(fashion.y_train == c), 600 if c < 5 else 50, replace=False)
                           for c in range(10)])
    skewed = dataclasses.replace(fashion, x_train=fashion.x_train[keep], y_train=fashion.y_train[keep])
    settings, decisions = decided(skewed)
    assert (settings.class_weight, settings.objective) == ("balanced", "balanced_accuracy")
    assert "12.0×" in by_setting(decisions)["class_weight"].reason
    settings, _ = decided(fashion)
    assert (settings.class_weight, settings.objective) == ("none", "accuracy")
    settings, _ = decided(skewed, class_weight="none", objective="macro_f1")
    assert (settings.class_weight, settings.objective) == ("none", "macro_f1")


def test_a_small_dataset_refits_with_its_validation_images(digits, digits_decoded, fashion):
    from data_pipeline.splits import with_validation_merged

    settings, _ = decided(digits)
    assert settings.refit_with_validation and not decided(fashion)[0].refit_with_validation
    assert not decided(digits, refit_with_validation=False)[0].refit_with_validation
    data = training_data(digits_decoded, settings.validation_fraction, settings.seed)
    merged = with_validation_merged(data)
    assert len(merged.y_train) == len(data.y_train) + len(data.y_val) == len(digits_decoded.y_train)
    pixels = np.asarray(merged.x_train).reshape(len(merged.y_train), -1)
    expected = np.concatenate([np.asarray(data.x_train), np.asarray(data.x_val)]).reshape(len(pixels), -1)
    assert (pixels == expected).all() and merged.key != data.key


def test_phase_lengths_count_images_not_passes():
    settings = resolve("cpu", PROFILES["cpu"], {})
    best = {"epochs": 9}
    deadline = 1e12
    small = PhaseLengths.of(best, dataclasses.replace(settings, epoch_fraction=10.0), 300, deadline)
    # 300 images: a phase runs thousands of images, not 1 pass of 5 steps; phase 2 ends
    # by what the winner needed, not by the hour.
    assert small.phase1 * 300 >= 10_000 and small.phase2_cap is not None and small.patience > 2
    large = PhaseLengths.of(best, settings, 54_000, deadline)
    assert (large.phase1, large.phase2, large.phase2_cap, large.patience) == (1, None, None, 2)
    assert PhaseLengths.of(best, dataclasses.replace(settings, epochs=3), 300, deadline).phase1 == 3


def test_letterbox_bars_take_the_colour_of_the_images_border(tmp_path):
    # A cut-out (transparent background, composited on white) in a wide image.
    image = Image.new("RGBA", (120, 40), (0, 0, 0, 0))
    image.paste((200, 30, 30, 255), (50, 5, 70, 35))
    image.save(tmp_path / "cutout.png")
    square = decode_square(tf.io.read_file(str(tmp_path / "cutout.png")), 60).numpy()
    assert square.shape == (60, 60, 3)
    assert (square[:5] >= 250).all() and (square[-5:] >= 250).all()  # the bars: white, as the background
    # A photo's bars take its border's mean tone, not black.
    photo = sample_photos()[0]
    rgb = np.asarray(Image.open(photo).convert("RGB"), dtype=np.float64)
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]]).mean(axis=0)
    square = decode_square(tf.io.read_file(str(photo)), 64).numpy()
    wide = rgb.shape[1] >= rgb.shape[0]
    bar = square[0, 32] if wide else square[32, 0]
    assert np.abs(bar - border).max() <= 12, (bar, border)


def test_the_smoke_job_on_8px_digits_reaches_its_accuracy_floor(tmp_path):
    """Before the data decided the resolution, the 8 px digits were searched at 32–64 px
    (a 1×1–2×2 final feature map) and the smoke job scored 65.7 %."""
    data = write_digits(tmp_path / "digits")
    run_dir = tmp_path / "run"
    result = run_cli("--profile", "smoke", "--data", data, "--run-dir", run_dir, "--formats", "tflite",
                     "--time-budget", "30s")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "decided from the data: resolutions = 96" in result.stdout
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["test_accuracy"] >= 0.90, metrics["test_accuracy"]
    config = json.loads((run_dir / "config.json").read_text())
    assert {d["setting"] for d in config["decisions"]} >= {"resolutions", "validation_fraction", "epoch_fraction"}
    # The report says what the search really used (the profile asks for 2 000 / 500).
    used = config["search_images"]
    assert used["train"] + used["validation"] == round(0.8 * 1797)
    assert f"the search trained on {used['train']} and validated on {used['validation']} images" in (
        run_dir / "report.md").read_text()
    # The search validated on every validation image: its finalists have nothing new to be
    # scored on.
    assert metrics["finalists"] is None and "finalists scored again" not in result.stdout
    # Validation is a sixth of these images: the final model was refitted with it.
    assert metrics["refit"]["images"] == used["train"] + used["validation"]
    assert metrics["refit"]["epochs"]["phase1"] >= 1
    low, high = metrics["test_accuracy_interval95"]
    assert low < metrics["test_accuracy"] < high and high - low > 0.03  # 359 test images: a few points either way
    assert math.isclose(metrics["test_balanced_accuracy"], metrics["test_accuracy"], abs_tol=0.03)


def test_balanced_accuracy_and_macro_f1_agree_with_scikit_learn():
    from sklearn.metrics import balanced_accuracy_score, f1_score

    from hypermodel.metrics import BalancedAccuracy, MacroF1

    rng = np.random.default_rng(0)
    truth = np.concatenate([np.zeros(90, int), np.ones(9, int), np.full(1, 3)])  # class 2 never occurs
    probabilities = rng.dirichlet(np.ones(4), size=len(truth)).astype(np.float32)
    probabilities[:60, 0] += 1  # mostly right on the big class
    predicted = probabilities.argmax(1)
    for metric, reference in ((BalancedAccuracy(4), balanced_accuracy_score(truth, predicted)),
                              (MacroF1(4), f1_score(truth, predicted, average="macro", labels=[0, 1, 3]))):
        for start in range(0, len(truth), 32):  # streamed over batches, as an epoch
            metric.update_state(truth[start:start + 32], probabilities[start:start + 32])
        assert float(metric.result()) == pytest.approx(reference, abs=1e-6)
        metric.reset_state()
        assert float(metric.result()) == 0.0


def test_the_test_accuracy_interval_is_wilsons():
    from scipy.stats import binomtest

    from tuning.retrain import wilson_interval

    for correct, total in ((60, 80), (9_400, 10_000), (80, 80), (0, 12)):
        reference = binomtest(correct, total).proportion_ci(method="wilson")
        assert wilson_interval(correct, total) == pytest.approx([reference.low, reference.high], abs=1e-9)


def test_balanced_class_weights_agree_with_scikit_learn(fashion):
    from sklearn.utils.class_weight import compute_class_weight

    from data_pipeline.splits import class_weights

    labels = np.concatenate([np.flatnonzero(fashion.y_train == c)[: 500 if c % 2 else 40] for c in range(10)])
    labels = fashion.y_train[labels]
    reference = compute_class_weight("balanced", classes=np.arange(10), y=labels)
    assert list(class_weights(labels, 10, "balanced").values()) == pytest.approx(list(reference))
    assert class_weights(labels, 10, "auto") == class_weights(labels, 10, "balanced")  # 12.5:1
    assert class_weights(fashion.y_train[:1000], 10, "auto") is None  # about even


def test_flips_are_kept_for_clothes_and_dropped_for_digits(digits_decoded, fashion):
    """A head trained on un-flipped images: clothes keep their class in a mirror, digits do not."""
    from data_pipeline.splits import training_data as split
    from hypermodel.model import build_transfer_model
    from hypermodel.space import TrialConfig
    from hypermodel.training import train
    from tuning.retrain import check_flips, phase2_augmentation

    config = TrialConfig("mobilenet_v2_0.35", 96, 0, "avg", 64, 0.0, 3e-3, "constant", 0, "adam", "none")
    verdicts = {}
    for name, source in (("digits", digits_decoded), ("fashion", fashion)):
        data = split(source, 0.2, 0, train_subset=800, val_subset=300)
        model = build_transfer_model(config, data.num_classes, "imagenet", 0)
        train(model, config, data, batch_size=64, seed=0, epochs=6)
        verdicts[name] = check_flips(model, config, data, 64)
    assert verdicts["fashion"]["invariant"], verdicts
    assert not verdicts["digits"]["invariant"], verdicts
    assert phase2_augmentation("flip_shift_erase", verdicts["digits"], log=lambda _: None) == "shift_erase"
    assert phase2_augmentation("flip_shift_erase", verdicts["fashion"], log=lambda _: None) == "flip_shift_erase"


def test_epoch_lines_come_at_a_readable_rate():
    import keras

    from hypermodel.callbacks import EpochProgress

    lines = []
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, activation="softmax")])
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    x, y = np.random.default_rng(0).normal(size=(32, 4)), np.arange(32) % 2
    model.fit(x, y, validation_data=(x, y), epochs=60, verbose=0,
              callbacks=[EpochProgress("phase2", lines.append, every_s=3600)])
    assert len(lines) == 2, lines  # the first epoch, and the last one run
    assert lines[0].startswith("  phase2 epoch 1/60") and lines[1].startswith("  phase2 epoch 60/60")



def test_small_data_searches_the_linear_head_and_large_data_the_hidden_layer(digits, fashion):
    assert decided(digits)[0].choices.heads == ("linear", "mlp")
    assert decided(fashion)[0].choices.heads == ("mlp",)
    settings, decisions = decided(digits, heads=("mlp",))
    assert settings.choices.heads == ("mlp",) and "heads" not in by_setting(decisions)


@pytest.fixture(scope="module")
def digits_slice(digits_decoded):
    return training_data(digits_decoded, 0.3, 0, train_subset=600, val_subset=300)


LINEAR = dict(backbone="mobilenet_v2_0.35", resolution=96, pooling="avg", dense_units=64, dropout=0.0,
              learning_rate=1e-3, lr_schedule="constant", warmup_epochs=0, optimizer="adam", augmentation="none",
              head="linear")


def test_the_linear_head_is_the_logistic_regression_of_the_pooled_features(digits_slice):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import FunctionTransformer

    from data_pipeline.pipeline import make_dataset
    from hypermodel.backbones import get_backbone
    from hypermodel.linear_head import fit_linear_head, pooled_features
    from hypermodel.model import build_transfer_model
    from hypermodel.space import TrialConfig

    data, config = digits_slice, TrialConfig(unfrozen_blocks=0, **LINEAR)
    model = build_transfer_model(config, data.num_classes, "imagenet", 0)
    record = fit_linear_head(model, config, data, 64, None, "accuracy", log=lambda _: None)
    assert record["best_val_accuracy"] >= 0.85, record  # 8 px digits at 96 px, frozen ImageNet features
    assert record["inverse_l2"] in [row["C"] for row in record["grid"]] and len(record["grid"]) == 4
    # The Keras model predicts as scikit-learn's logistic regression at the chosen C, of the
    # features each divided by its spread, but by no less than the median feature's spread.
    features = pooled_features(model, config, data.x_train, 64)
    mean, spread = features.mean(axis=0), features.std(axis=0)
    scale = FunctionTransformer(lambda f: (f - mean) / np.maximum(spread, np.median(spread)))
    reference = make_pipeline(scale, LogisticRegression(C=record["inverse_l2"], max_iter=2000))
    reference.fit(features, data.y_train)
    val_features = pooled_features(model, config, data.x_val, 64)
    expected = reference.predict(val_features)
    ds = make_dataset(data.x_val, None, 96, get_backbone(config.backbone).preprocess_input, 64)
    predicted = model.predict(ds, verbose=0).argmax(1)
    assert np.mean(predicted == expected) >= 0.98
    # Its weights survive the int8 export: rounded per class to 255 levels of the largest
    # (how the converter stores a Dense layer), they give the same class almost everywhere.
    kernel, bias = model.get_layer("trainable_top").layers[-1].get_weights()
    step = np.abs(kernel).max(axis=0) / 127
    rounded = np.round(kernel / step) * step
    agreement = np.mean(np.argmax(val_features @ rounded + bias, axis=1) == np.argmax(val_features @ kernel + bias, axis=1))
    assert agreement >= 0.98, agreement
    assert np.mean(predicted == data.y_val) == pytest.approx(record["best_val_accuracy"], abs=0.02)


def test_fine_tuning_that_does_not_beat_the_linear_head_is_undone(digits_slice, tmp_path):
    from hypermodel.model import TOP_NAME, build_transfer_model, unfrozen_blocks_of
    from hypermodel.space import TrialConfig
    from tuning.retrain import Phases

    data, config = digits_slice, TrialConfig(unfrozen_blocks=2, **LINEAR)
    # A rate too small to change a prediction: phase 2 cannot beat phase 1 on validation.
    settings = dataclasses.replace(resolve("smoke", PROFILES["smoke"], {}), phase2_lr_factor=1e-7)
    model = build_transfer_model(config, data.num_classes, "imagenet", 0)
    blocks = unfrozen_blocks_of(model.get_layer(TOP_NAME))
    first = [w.copy() for w in blocks.get_weights()]
    phases = Phases(tmp_path, settings, config, {"trial_id": "0"}, None, None, 100, log=lambda _: None)
    histories = phases.run(model, data, PhaseLengths(1, 2, None, None, 1))
    assert histories["phase1"]["mode"].startswith("exact") and histories["phase2"]["epochs"] >= 1
    assert histories["phase2"]["kept"] is False
    assert all(np.array_equal(a, b) for a, b in zip(first, blocks.get_weights()))


def test_a_capped_phase_2_is_timed_as_it_runs_and_keeps_time_for_the_refit(digits_slice, tmp_path):
    import time

    from hypermodel.model import build_transfer_model
    from hypermodel.space import TrialConfig
    from tuning.retrain import Phases, finish_reserve_s

    data, config = digits_slice, TrialConfig(unfrozen_blocks=2, **LINEAR)
    settings = dataclasses.replace(resolve("cpu", PROFILES["cpu"], {}), refit_with_validation=True,
                                   retrain_augmentation=None, label_smoothing=0.0, ema_momentum=None)
    lines = []
    deadline = time.time() + finish_reserve_s(100) + 600
    phases = Phases(tmp_path, settings, config, {"trial_id": "0"}, None, deadline, 100, log=lines.append)
    model = build_transfer_model(config, data.num_classes, "imagenet", 0)
    histories = phases.run(model, data, PhaseLengths(1, None, 3, "a test's cap", 2))
    plan = histories["phase2"]["plan"]
    assert plan["epochs"] == 3 and 1 <= histories["phase2"]["epochs"] <= 3
    assert "timed as they run" in plan["reasoning"] and "steps ×" not in "\n".join(lines)
    # Half of what is left, less the exact fit's repeat, goes to phase 2: the refit repeats it on 1.5× the images.
    assert plan["seconds_left"] < 600 / 2, plan


def test_fine_tuning_from_an_exact_head_keeps_its_features_and_validates_the_augmentation(digits_slice, tmp_path):
    from data_pipeline.pipeline import make_dataset
    from hypermodel.backbones import get_backbone
    from hypermodel.model import build_transfer_model
    from hypermodel.space import TrialConfig
    from tuning.retrain import Phases

    # The searched rate of a linear head trained from a random start, halved as the
    # profile's phase 2 does: fine-tuning from the exact head must not wreck its features.
    data, config = digits_slice, TrialConfig(unfrozen_blocks=5, **{**LINEAR, "learning_rate": 3e-3})
    settings = dataclasses.replace(resolve("smoke", PROFILES["smoke"], {}), phase2_lr_factor=0.5,
                                   retrain_augmentation="flip_shift_erase", label_smoothing=0.0, ema_momentum=None)
    phases = Phases(tmp_path, settings, config, {"trial_id": "0"}, None, None, 100, log=lambda _: None)
    model = build_transfer_model(config, data.num_classes, "imagenet", 0)
    histories = phases.run(model, data, PhaseLengths(1, 2, 2, "a test's cap", 2))
    exact = histories["phase1"]["best_val_accuracy"]
    phase2 = histories["phase2"]
    # Both augmentations were tried from the exact head (a flip changes a digit: none kept).
    assert [t["augmentation"] for t in phase2["tried"]] == ["none", "shift_erase"], phase2["tried"]
    # At the searched rate the features are wrecked within an epoch (validation near chance).
    for tried in phase2["tried"]:
        assert max(tried["history"]["val_accuracy"]) >= exact - 0.1, (phase2["tried"], exact)
    # The model keeps the better try (or phase 1), as its own predictions on validation say.
    ds = make_dataset(data.x_val, None, 96, get_backbone(config.backbone).preprocess_input, 64)
    accuracy = np.mean(model.predict(ds, verbose=0).argmax(1) == data.y_val)
    best = max(t["best_val_score"] for t in phase2["tried"])
    assert phase2["best_val_score"] == best
    expected = best if phase2["kept"] else exact
    assert accuracy == pytest.approx(expected, abs=1.5 / len(data.y_val))


def test_an_exact_linear_head_replaces_a_weaker_searched_head_on_small_data(digits_slice, tmp_path):
    from data_pipeline.pipeline import make_dataset
    from hypermodel.backbones import get_backbone
    from hypermodel.model import build_transfer_model
    from hypermodel.space import TrialConfig
    from tuning.retrain import Phases, challenge_with_linear_head, refit_with_validation

    data = digits_slice
    # A hidden-layer head trained for one epoch: well short of what the frozen features allow.
    config = TrialConfig(unfrozen_blocks=2, **{**LINEAR, "head": "mlp"})
    settings = resolve("smoke", PROFILES["smoke"], {})
    settings = dataclasses.replace(settings, retrain_augmentation=None, label_smoothing=0.0, ema_momentum=None,
                                   choices=dataclasses.replace(settings.choices, heads=("linear", "mlp")))
    lines = []
    phases = Phases(tmp_path, settings, config, {"trial_id": "0"}, None, None, 100, log=lines.append)
    model = build_transfer_model(config, data.num_classes, "imagenet", 0)
    histories = phases.run(model, data, PhaseLengths(1, 1, None, None, 1))
    kept, histories = challenge_with_linear_head(phases, model, data, histories)
    assert histories["linear_head_challenge"]["replaced"], histories["linear_head_challenge"]
    assert phases.config.head == "linear" and kept is not model
    ds = make_dataset(data.x_val, None, 96, get_backbone(config.backbone).preprocess_input, 64)
    accuracy = np.mean(kept.predict(ds, verbose=0).argmax(1) == data.y_val)
    assert accuracy >= 0.85 and accuracy == pytest.approx(histories["phase1"]["best_val_accuracy"], abs=0.02)
    # The refit repeats the exact fit, not the searched head's phase 2.
    refitted, refit = refit_with_validation(phases, kept, data, histories)
    import keras

    assert refit["epochs"] == {"phase1": 1}
    dense = [layer for layer in refitted.get_layer("trainable_top").layers if isinstance(layer, keras.layers.Dense)]
    assert len(dense) == 1  # the linear head: no hidden layer
    # The refit reuses the features the challenge extracted, and fits the head a fresh
    # extraction of the training and validation images would.
    fits = [line for line in lines if "linear head fitted exactly" in line]
    assert len(fits) == 2 and "s to extract" in fits[0] and "(reused)" in fits[1], fits
    from data_pipeline.splits import with_validation_merged
    from hypermodel.linear_head import fit_linear_head

    fresh = build_transfer_model(phases.config, data.num_classes, "imagenet", 0)
    fit_linear_head(fresh, phases.config, with_validation_merged(data), 64, None, "accuracy",
                    (histories["phase1"]["inverse_l2"],), log=lambda _: None)
    agree = np.mean(refitted.predict(ds, verbose=0).argmax(1) == fresh.predict(ds, verbose=0).argmax(1))
    assert agree >= 0.99, agree
    # Where the linear head was no candidate (a large dataset), the winner is not challenged.
    phases.settings = dataclasses.replace(settings, choices=dataclasses.replace(settings.choices, heads=("mlp",)))
    phases.config = config
    assert challenge_with_linear_head(phases, model, data, histories)[0] is model


def test_the_finish_reserve_follows_the_models_timed_inference_speed():
    """Fashion-MNIST's default job (10 000 test images; MobileNetV2 α 0.5 at 96 px, whose
    validation passes timed 0.8 ms an image on an AVX-512 EPYC) took ~200 s after phase 2:
    175 s of exports, the TTA check and the test evaluation (benchmarks/RESULTS.md §5, run
    13). The reserve from the test split's size alone kept 330 s."""
    from tuning.retrain import finish_images, finish_reserve_s

    every_format = ("savedmodel", "tflite", "tflite-fp16", "tflite-int8")
    fashion = finish_images(10_000, 54_000, 6_000, every_format)
    assert 200 <= finish_reserve_s(10_000, 0.0008, fashion) < finish_reserve_s(10_000)
    # A model five times slower keeps more than the size-based estimate: the job's budget
    # stays an upper bound.
    assert finish_reserve_s(10_000, 0.004, fashion) > finish_reserve_s(10_000)
    # Fewer formats to score, less to keep.
    assert finish_reserve_s(10_000, 0.0008, finish_images(10_000, 54_000, 6_000, ("savedmodel",))) < \
        finish_reserve_s(10_000, 0.0008, fashion)
