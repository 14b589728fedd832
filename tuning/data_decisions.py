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
from data_pipeline.splits import IMBALANCE_RATIO, imbalance, is_imbalanced, validation_fraction_for, validation_size
from hypermodel.space import SearchChoices, heads_for, resolutions_for, unfrozen_blocks_for

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

    Each rule in `RULES` reads the settings as decided so far and the facts, and yields
    (setting, value, reason) for what it decides.

    Args:
        settings: The resolved `Settings` (defaults, profile, flags).
        facts: The dataset's `DataFacts`.
        explicit: Names of the settings given on the command line (left as given).

    Returns:
        (settings, [Decision]).
    """
    decisions = []
    for rule in RULES:
        for setting, value, reason in rule(settings, facts):
            if setting in explicit:
                continue
            if setting in SEARCH_CHOICES:
                choices = dataclasses.replace(settings.choices, **{setting: value})
                settings = dataclasses.replace(settings, choices=choices)
            else:
                settings = dataclasses.replace(settings, **{setting: value})
            decisions.append(Decision(setting, value, reason))
    return settings, decisions


@dataclasses.dataclass(frozen=True)
class _Sizes:
    """How many training images each stage learns from, once validation is carved out."""

    validation: int
    final: int  # the retrain's
    searched: int  # the search's

    @classmethod
    def of(cls, settings, facts):
        validation = 0 if facts.has_validation else validation_size(facts.class_counts, settings.validation_fraction)
        training = facts.train_images - validation
        return cls(validation, min(training, settings.retrain_subset or training),
                   min(training, settings.train_subset or training))


def validation_rules(settings, facts):
    if not facts.has_validation:
        yield ("validation_fraction", *validation_fraction_for(facts.class_counts))


def refit_rule(settings, facts):
    if settings.refit_with_validation is None:
        share = _Sizes.of(settings, facts).validation / facts.train_images
        refit = share > REFIT_ABOVE_VALIDATION_SHARE
        yield ("refit_with_validation", refit, f"validation holds {share:.0%} of the training images"
               + (": the final model learns from them too" if refit else ""))


def space_rules(settings, facts):
    final = _Sizes.of(settings, facts).final
    yield ("resolutions", *resolutions_for(facts.image_side, final, settings.resolution_ladder, settings.pixel_budget))
    yield ("unfrozen_blocks", *unfrozen_blocks_for(final))
    yield ("heads", *heads_for(final))


def search_rules(settings, facts):
    searched = _Sizes.of(settings, facts).searched
    if settings.round_images:
        fraction = settings.round_images / searched
        yield ("epoch_fraction", round(fraction, 4),
               f"a round of the search trains on {settings.round_images:,} images: "
               + (f"{fraction:.2g} of a pass over {searched:,}" if fraction < 1 else
                  f"{fraction:.1f} passes over {searched:,}"))
    if (settings.tuner == "hyperband" and settings.time_budget_s and settings.train_subset
            and searched < settings.train_subset and settings.hyperband_iterations < SMALL_DATA_BRACKET_SWEEPS):
        yield ("hyperband_iterations", SMALL_DATA_BRACKET_SWEEPS,
               f"the search slice is all {searched:,} training images, under the profile's "
               f"{settings.train_subset:,}: trials are cheap, so brackets repeat until the time budget ends them")


def time_rules(settings, facts):
    if not settings.job_time_budget_s:
        return
    budget = min(settings.job_time_budget_s, JOB_FIXED_S + JOB_S_PER_IMAGE * facts.train_images)
    if budget < settings.job_time_budget_s:
        yield ("job_time_budget_s", round(budget),
               f"{facts.train_images:,} training images: at most {budget / 60:.1f} min "
               f"(the profile's {settings.job_time_budget_s / 60:.0f} min is an upper bound)")
        if settings.time_budget_s:
            search = min(settings.time_budget_s, SEARCH_SHARE_OF_JOB * budget)
            yield ("time_budget_s", round(search), f"{SEARCH_SHARE_OF_JOB:.0%} of the job's {budget / 60:.1f} min")


def imbalance_rules(settings, facts):
    ratio = imbalance(facts.class_counts)
    imbalanced = is_imbalanced(facts.class_counts)
    why = f"the largest class has {ratio:.1f}× the training images of the smallest" + (
        "" if imbalanced else f", under {IMBALANCE_RATIO}×")
    if settings.class_weight == "auto":
        yield ("class_weight", "balanced" if imbalanced else "none", why)
    if settings.objective == "auto":
        yield ("objective", "balanced_accuracy" if imbalanced else "accuracy", why)


def export_rule(settings, facts):
    least_drop = 100 * EXPORT_DROP_IMAGES / facts.test_images
    if least_drop > settings.max_accuracy_drop:
        yield ("max_accuracy_drop", round(least_drop, 2),
               f"{facts.test_images} test images: {EXPORT_DROP_IMAGES} images are {least_drop:.2f} pp, "
               f"so a {settings.max_accuracy_drop} pp limit would reject an artifact for one or two images")


def averaging_rule(settings, facts):
    if not settings.ema_momentum:
        return
    final = _Sizes.of(settings, facts).final
    steps = math.ceil(final / settings.batch_size)
    momentum = min(settings.ema_momentum, round(1 - 1 / (EMA_PASSES * steps), 4))
    if momentum < settings.ema_momentum:
        yield ("ema_momentum", momentum,
               f"the weights' average spans ~{EMA_PASSES} passes: {steps} steps a pass over {final:,} images")


# In order: later rules read what earlier ones decided (the validation split sizes the rest).
RULES = (validation_rules, refit_rule, space_rules, search_rules, time_rules, imbalance_rules, export_rule,
         averaging_rule)
