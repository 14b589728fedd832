"""The defaults decided from the data in front of the tool, each with its reason.

A profile says what a machine affords (its compute, its time, its candidate sizes); the
data says what is worth doing with it. Each decision here reads a few facts of the
dataset (`DataFacts`), sets one setting, and says why in one line; the CLI prints
the lines once and `config.json` keeps them under `decisions`. A setting the user gave
on the command line is never decided: an explicit flag always wins.
"""

import dataclasses
import math

import numpy as np

from data_pipeline.folders import ImageFiles
from data_pipeline.splits import IMBALANCE_RATIO, imbalance, validation_fraction_for, validation_size
from hypermodel.space import SearchChoices, resolutions_for, unfrozen_blocks_for

# A job on a small dataset ends in minutes: a fixed share (start-up, export, report)
# plus a share per training image, capped by the profile's budget.
JOB_FIXED_S = 240
JOB_S_PER_IMAGE = 0.066
SEARCH_SHARE_OF_JOB = 0.4
# The weights' moving average spans about this many passes of the retrain's phase 2.
EMA_PASSES = 1.2
# Hyperband bracket sweeps on a dataset smaller than the profile's search slice.
SMALL_DATA_BRACKET_SWEEPS = 3
# An exported artifact may differ from the Keras model on this many test images before
# its accuracy drop is judged: below that, the drop is rounding, not damage.
EXPORT_DROP_IMAGES = 2
# Where validation takes more than this share, the final model is refitted with it.
REFIT_ABOVE_VALIDATION_SHARE = 0.12
SEARCH_CHOICES = {f.name for f in dataclasses.fields(SearchChoices)}


@dataclasses.dataclass(frozen=True)
class DataFacts:
    """What the decisions read of a dataset.

    Attributes:
        train_images: Images in the training split (validation not yet carved out).
        class_counts: Training images per class.
        image_side: The images' median longer side, in px.
        has_validation: The data came with its own validation split.
        test_images: Images in the test split.
    """

    train_images: int
    class_counts: tuple
    image_side: float
    has_validation: bool
    test_images: int

    @classmethod
    def of(cls, source):
        """The facts of a loaded source: `ImageFiles` (not decoded yet) or an array `Dataset`."""
        if isinstance(source, ImageFiles):
            train = [f for f in source.files if f.split == "train"]
            labels = np.array([f.label for f in train])
            side = float(np.median([max(f.width, f.height) for f in train]))
            has_validation = any(f.split == "val" for f in source.files)
            test_images = sum(f.split == "test" for f in source.files)
            num_classes = source.num_classes
        else:
            labels = np.asarray(source.y_train)
            side = float(max(source.x_train.shape[1:3]))
            has_validation = source.x_val is not None
            test_images = len(source.y_test)
            num_classes = source.num_classes
        counts = tuple(int(c) for c in np.bincount(labels, minlength=num_classes))
        return cls(int(len(labels)), counts, side, has_validation, int(test_images))


@dataclasses.dataclass(frozen=True)
class Decision:
    """One setting decided from the data, and why."""

    setting: str
    value: object
    reason: str

    def line(self):
        value = ", ".join(map(str, self.value)) if isinstance(self.value, tuple) else self.value
        return f"decided from the data: {self.setting} = {value} ({self.reason})"

    def to_dict(self):
        return dataclasses.asdict(self)


def decide(settings, facts, explicit=()):
    """`settings` with the data-driven defaults decided, and the decisions taken.

    Args:
        settings: The resolved `Settings` (defaults, profile, flags).
        facts: The dataset's `DataFacts`.
        explicit: Names of the settings given on the command line (left as given).

    Returns:
        (settings, [Decision]).
    """
    decisions = []

    def take(setting, value, reason):
        nonlocal settings
        if setting in explicit:
            return
        if setting in SEARCH_CHOICES:
            settings = dataclasses.replace(settings, choices=dataclasses.replace(settings.choices, **{setting: value}))
        else:
            settings = dataclasses.replace(settings, **{setting: value})
        decisions.append(Decision(setting, value, reason))

    if not facts.has_validation:
        take("validation_fraction", *validation_fraction_for(facts.class_counts))
    validation = 0 if facts.has_validation else validation_size(facts.class_counts, settings.validation_fraction)
    if settings.refit_with_validation is None:
        share = validation / facts.train_images
        take("refit_with_validation", share > REFIT_ABOVE_VALIDATION_SHARE,
             f"validation holds {share:.0%} of the training images"
             + (": the final model learns from them too" if share > REFIT_ABOVE_VALIDATION_SHARE else ""))
    training = facts.train_images - validation
    final = min(training, settings.retrain_subset or training)
    searched = min(training, settings.train_subset or training)

    take("resolutions", *resolutions_for(facts.image_side, final, settings.resolution_ladder, settings.pixel_budget))
    take("unfrozen_blocks", *unfrozen_blocks_for(final))
    if settings.round_images:
        fraction = settings.round_images / searched
        take("epoch_fraction", round(fraction, 4),
             f"a round of the search trains on {settings.round_images:,} images: "
             + (f"{fraction:.2g} of a pass over {searched:,}" if fraction < 1 else
                f"{fraction:.1f} passes over {searched:,}"))
    if (settings.tuner == "hyperband" and settings.time_budget_s and settings.train_subset
            and searched < settings.train_subset and settings.hyperband_iterations < SMALL_DATA_BRACKET_SWEEPS):
        take("hyperband_iterations", SMALL_DATA_BRACKET_SWEEPS,
             f"the search slice is all {searched:,} training images, under the profile's {settings.train_subset:,}: "
             "trials are cheap, so brackets repeat until the time budget ends them")
    if settings.job_time_budget_s:
        budget = min(settings.job_time_budget_s, JOB_FIXED_S + JOB_S_PER_IMAGE * facts.train_images)
        if budget < settings.job_time_budget_s:
            take("job_time_budget_s", round(budget),
                 f"{facts.train_images:,} training images: at most {budget / 60:.1f} min "
                 f"(the profile's {settings.job_time_budget_s / 60:.0f} min is an upper bound)")
            if settings.time_budget_s:
                search = min(settings.time_budget_s, SEARCH_SHARE_OF_JOB * budget)
                take("time_budget_s", round(search), f"{SEARCH_SHARE_OF_JOB:.0%} of the job's {budget / 60:.1f} min")
    ratio = imbalance(facts.class_counts)
    imbalanced = ratio >= IMBALANCE_RATIO
    why = f"the largest class has {ratio:.1f}× the training images of the smallest" + (
        "" if imbalanced else f", under {IMBALANCE_RATIO}×")
    if settings.class_weight == "auto":
        take("class_weight", "balanced" if imbalanced else "none", why)
    if settings.objective == "auto":
        take("objective", "balanced_accuracy" if imbalanced else "accuracy", why)
    least_drop = 100 * EXPORT_DROP_IMAGES / facts.test_images
    if least_drop > settings.max_accuracy_drop:
        take("max_accuracy_drop", round(least_drop, 2),
             f"{facts.test_images} test images: {EXPORT_DROP_IMAGES} images are {least_drop:.2f} pp, "
             f"so a {settings.max_accuracy_drop} pp limit would reject an artifact for one or two images")
    if settings.ema_momentum:
        steps = math.ceil(final / settings.batch_size)
        momentum = min(settings.ema_momentum, round(1 - 1 / (EMA_PASSES * steps), 4))
        if momentum < settings.ema_momentum:
            take("ema_momentum", momentum,
                 f"the weights' average spans ~{EMA_PASSES} passes: {steps} steps a pass over {final:,} images")
    return settings, decisions
