"""The search space, top to bottom. This is the one file to read to know what is searched.

Every trial is one `TrialConfig`. Which values each hyperparameter may take comes from
`SearchChoices`, which the profile (`tuning/profiles.py`) and the CLI fill in; a choice
list with one value becomes a fixed hyperparameter.
"""

import dataclasses


RESOLUTION_RANGE = (32, 299)  # input sides, in px, the space may search
LR_SCHEDULES = ("constant", "cosine", "exponential", "step")
OPTIMIZERS = ("adam", "adamw")
# The classification head: "linear" is the frozen features' logistic regression (the
# retrain fits it exactly before fine-tuning: hypermodel/linear_head.py), "mlp" adds a
# hidden dense layer.
HEADS = ("linear", "mlp")
# What trials, early stopping and the retrain's phases are chosen by (hypermodel/metrics.py).
OBJECTIVES = ("accuracy", "balanced_accuracy", "macro_f1")

# Every registry backbone downsamples its input 32×. Pretrained filters expect objects at
# the scale of ImageNet's: below a 3×3 final feature map an object's parts no longer sit
# apart (MobileNetV2 at 32 px ends 1×1 and tops out near 70 % on Fashion-MNIST).
BACKBONE_STRIDE = 32
MIN_FEATURE_MAP = 3
SMALLEST_USEFUL_RESOLUTION = BACKBONE_STRIDE * MIN_FEATURE_MAP  # 96 px
# How deep to fine-tune, by the training images the final model learns from: few images
# overfit many free weights, many images repay them.
UNFROZEN_BLOCKS_BY_IMAGES = ((1_500, (0, 2, 5)), (15_000, (2, 5, 10)), (None, (10, 17)))
# Below this many training images the linear head is a candidate: a hidden layer's weights
# are many to fit from few images, and a regularised linear map of pretrained features is
# the strong baseline there. Above it, the hidden layer has the data it needs.
LINEAR_HEAD_BELOW_IMAGES = 15_000


@dataclasses.dataclass(frozen=True)
class SearchChoices:
    """The values each hyperparameter may take.

    Attributes:
        backbones: Registry names (hypermodel/backbones.py).
        resolutions: Input sides in px; the biggest cost lever on a CPU.
        unfrozen_blocks: How many top backbone blocks train (0 = head only). Clipped
            to the backbone's block count minus its stem.
        poolings: Head pooling: "avg" (global average) or "flatten" (the seed's head).
        heads: Subset of HEADS.
        dense_units: (min, max) width of the mlp head's hidden layer, log scale, powers of 2.
        dropout: (min, max) dropout before and after the dense layer, step 0.1.
        learning_rate: (min, max) initial learning rate, log-uniform.
        lr_schedules: Subset of LR_SCHEDULES.
        warmup_epochs: Linear warmup lengths to choose from.
        optimizers: Subset of OPTIMIZERS.
        augmentations: Subset of data_pipeline.pipeline.AUGMENTATIONS. Trials that
            augment run end to end: the feature cache only serves "none".
    """

    backbones: tuple = ("mobilenet_v2_0.35", "mobilenet_v2_0.5")
    resolutions: tuple = (64, 96)
    unfrozen_blocks: tuple = (0, 2, 6)
    poolings: tuple = ("avg",)
    heads: tuple = ("mlp",)
    dense_units: tuple = (64, 1024)
    dropout: tuple = (0.0, 0.5)
    learning_rate: tuple = (1e-4, 3e-3)
    lr_schedules: tuple = LR_SCHEDULES
    warmup_epochs: tuple = (0, 1)
    optimizers: tuple = OPTIMIZERS
    augmentations: tuple = ("none",)


@dataclasses.dataclass(frozen=True)
class TrialConfig:
    """One point of the search space: everything needed to build and train a model."""

    backbone: str
    resolution: int
    unfrozen_blocks: int
    pooling: str
    dense_units: int
    dropout: float
    learning_rate: float
    lr_schedule: str
    warmup_epochs: int
    optimizer: str
    augmentation: str
    head: str = "mlp"  # configurations saved before the linear head had an mlp one

    def to_dict(self):
        return dataclasses.asdict(self)


def resolutions_for(image_side, train_images, ladder, pixel_budget, most=2):
    """The input sizes worth searching for these images on this budget.

    The lowest is the smallest giving a 3×3 final feature map, however small the images
    (an 8 px digit is upsampled to the scale ImageNet objects had). Larger sizes of the
    profile's ladder are candidates while one pass over the training images at them
    stays within `pixel_budget`: small images gain from a larger scale too (32 px glyphs
    and 8 px digits scored better at 128–224 px than at 96 px in the suite's probe), and
    large photos keep their detail. Among the candidates, the search decides.

    Args:
        image_side: The images' typical longer side in px (the median), for the reason.
        train_images: Images in the training split.
        ladder: The profile's candidate sizes, ascending.
        pixel_budget: Pixels (images × side²) one pass may cost: the profile's compute.
        most: Sizes to return at most: the smallest and the largest candidates.

    Returns:
        (resolutions, reason): ascending sizes, and why, in words.
    """
    floor = max(SMALLEST_USEFUL_RESOLUTION, min(ladder))
    affordable = (pixel_budget / max(1, train_images)) ** 0.5
    chosen = sorted({floor, *(r for r in ladder if r <= affordable)})
    if len(chosen) > most:
        chosen = [chosen[0], chosen[-1]] if most == 2 else chosen[:most]
    reason = (f"{image_side:.0f} px images: {floor} px gives the backbone a "
              f"{floor // BACKBONE_STRIDE}×{floor // BACKBONE_STRIDE} final feature map")
    if max(ladder) <= floor:
        reason += "; the profile searches no larger size"
    elif affordable >= max(ladder):
        reason += f"; {train_images:,} images afford the profile's largest size"
    else:
        reason += f"; a pass over {train_images:,} images fits the profile's compute up to {affordable:.0f} px"
    return tuple(chosen), reason


def unfrozen_blocks_for(train_images):
    """Depths of fine-tuning worth searching when the final model learns from `train_images`."""
    for limit, depths in UNFROZEN_BLOCKS_BY_IMAGES:
        if limit is None or train_images < limit:
            bound = f"under {limit:,}" if limit else f"{UNFROZEN_BLOCKS_BY_IMAGES[-2][0]:,} or more"
            return depths, f"the final model learns from {train_images:,} training images, {bound}"
    raise AssertionError("the last entry has no limit")


def heads_for(train_images):
    """The heads worth searching when the final model learns from `train_images`, and why."""
    if train_images < LINEAR_HEAD_BELOW_IMAGES:
        return HEADS, (f"{train_images:,} training images, under {LINEAR_HEAD_BELOW_IMAGES:,}: the frozen "
                       "features' logistic regression is a candidate head")
    return ("mlp",), f"{train_images:,} training images: enough for a hidden layer"


def monitored(objective):
    """The Keras log key a choice by `objective` follows (validation's)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective {objective!r} is not one of {', '.join(OBJECTIVES)}")
    return f"val_{objective}"


def _choice(hp, name, values):
    values = list(values)
    if len(values) == 1:
        return hp.Fixed(name, values[0])
    return hp.Choice(name, values)


def declare(hp, choices):
    """Declares the search space on `hp` and returns the trial's `TrialConfig`.

    Args:
        hp: A `keras_tuner.HyperParameters`.
        choices: A `SearchChoices`.
    """
    return TrialConfig(
        # What to transfer from, and at which input size.
        backbone=_choice(hp, "backbone", choices.backbones),
        resolution=_choice(hp, "resolution", choices.resolutions),
        # How much of it to fine-tune. BatchNorm always stays frozen, in inference mode.
        unfrozen_blocks=_choice(hp, "unfrozen_blocks", choices.unfrozen_blocks),
        # The new classification head.
        pooling=_choice(hp, "pooling", choices.poolings),
        head=_choice(hp, "head", choices.heads),
        # The mlp head's hidden layer (declared for every trial; a linear head has none).
        dense_units=hp.Int("dense_units", *choices.dense_units, step=2, sampling="log"),
        dropout=hp.Float("dropout", *choices.dropout, step=0.1),
        # How to train it.
        learning_rate=hp.Float("learning_rate", *choices.learning_rate, sampling="log"),
        lr_schedule=_choice(hp, "lr_schedule", choices.lr_schedules),
        warmup_epochs=_choice(hp, "warmup_epochs", choices.warmup_epochs),
        optimizer=_choice(hp, "optimizer", choices.optimizers),
        augmentation=_choice(hp, "augmentation", choices.augmentations),
    )


def config_from_values(values):
    """Rebuilds a `TrialConfig` from saved hyperparameter values (best_hparams.json)."""
    fields = {f.name for f in dataclasses.fields(TrialConfig)}
    required = {f.name for f in dataclasses.fields(TrialConfig) if f.default is dataclasses.MISSING}
    missing = sorted(required - set(values))
    if missing:
        raise KeyError(f"missing hyperparameters {missing}")
    return TrialConfig(**{k: values[k] for k in fields if k in values})
