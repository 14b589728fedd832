"""Every setting of a run, declared once: name, default, help, flag and the commands taking it.

A setting's value comes from its default, then the profile (`tuning/profiles.py`), then
the command line. The resolved `Settings` are recorded in the run's `config.json`.
Adding a setting means adding one `Setting` here (plus the code that uses it); the
parser (`tuning/cli.py`), the profiles' validation and config.json follow from it.
"""

import argparse
import dataclasses
import re

from data_pipeline.splits import IMBALANCE_RATIO
from hypermodel.space import HEADS, OBJECTIVES, RESOLUTION_RANGE, SearchChoices

JOB = "job"  # `python search.py` with no subcommand: search → retrain → export → report
SEARCHING = frozenset({JOB, "search"})
EXPORTING = frozenset({JOB, "export"})
EXPORT_FORMATS = ("savedmodel", "tflite", "tflite-fp16", "tflite-int8")
RETRAINING = frozenset({JOB, "retrain"})


def duration(text):
    """'90s', '45m', '2h' or plain seconds → seconds; 0 → None (no limit)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"expected a duration like 90s, 45m or 2h, got {text!r}")
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[match.group(2)] or None


def count_or_all(text):
    """A positive image count; 0 → None (all images)."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a count ≥ 0 (0 = all), got {text!r}")
    return value or None


def positive_int(text):
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer ≥ 1, got {text!r}")
    return value


def names(text):
    values = tuple(n.strip() for n in text.split(",") if n.strip())
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return values


def heads(text):
    values = names(text)
    unknown = [v for v in values if v not in HEADS]
    if unknown:
        raise argparse.ArgumentTypeError(f"head {unknown[0]!r} is not one of {', '.join(HEADS)}")
    return values


def ints(text):
    try:
        values = tuple(int(n) for n in text.split(",") if n.strip())
    except ValueError:
        values = ()
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    return values


def resolutions(text):
    values = ints(text)
    low, high = RESOLUTION_RANGE
    bad = [r for r in values if not low <= r <= high]
    if bad:
        raise argparse.ArgumentTypeError(f"resolutions {bad} outside {low}..{high}")
    return values


def float_range(text):
    try:
        values = tuple(float(n) for n in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 2 or not 0 < values[0] < values[1]:
        raise argparse.ArgumentTypeError(f"expected MIN,MAX with 0 < MIN < MAX, got {text!r}")
    return values


def fraction(text):
    return _checked_float(text, lambda v: 0.0 < v < 1.0, "a fraction between 0 and 1")


def export_formats(text):
    values = names(text)
    bad = [v for v in values if v not in EXPORT_FORMATS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown formats {bad}: choose from {', '.join(EXPORT_FORMATS)}")
    return tuple(dict.fromkeys(values))


def share(text):
    return _checked_float(text, lambda v: 0.0 < v <= 1.0, "a share above 0 and at most 1")


def smoothing(text):
    return _checked_float(text, lambda v: 0.0 <= v < 1.0, "a share ≥ 0 and below 1")


def momentum_or_off(text):
    """A moving average's momentum in (0, 1); 0 → None (off)."""
    return _checked_float(text, lambda v: 0.0 <= v < 1.0, "a momentum ≥ 0 and below 1 (0 = off)") or None


def positive_float(text):
    return _checked_float(text, lambda v: v > 0, "a number > 0")


def non_negative_float(text):
    return _checked_float(text, lambda v: v >= 0, "a number ≥ 0")


def _checked_float(text, allowed, expected):
    try:
        value = float(text)
    except ValueError:
        value = float("nan")  # refused below, with the same message
    if not allowed(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def _int(text):
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


@dataclasses.dataclass(frozen=True)
class Setting:
    """One setting.

    Attributes:
        name: Its attribute in `Settings` and key in config.json; for a search-space
            setting (`in_choices`), the `SearchChoices` field it sets.
        default: Its value unless a profile or a flag says otherwise.
        help: What it means, for `--help`.
        flag: Its command-line option, or None for a profile-only setting.
        parse: Turns the flag's text into the value (an argparse `type`); "count" and
            "switch" make a counting flag and a --x/--no-x pair.
        choices: Allowed values of the flag.
        commands: The commands whose flag it is (JOB = no subcommand).
        resumable: May differ when a run is resumed (it does not change what is searched).
        in_choices: It is a field of the search space (`Settings.choices`).
        example: A valid value for the flag, for tests that walk every option.
    """

    name: str
    default: object
    help: str
    flag: str = None
    parse: object = None
    choices: tuple = None
    commands: frozenset = SEARCHING
    resumable: bool = False
    in_choices: bool = False
    example: str = None


SETTINGS = (
    # Where: run directory and data.
    Setting("run_dir", None, "run directory (default for a new run: results/<timestamp>)", "--run-dir",
            commands=SEARCHING | {"retrain", "export", "report", "tensorboard"}, resumable=True,
            example="results/r1"),
    Setting("data", None, "IDX folder, CSV folder or .npz file (default: vendored Fashion-MNIST)", "--data",
            commands=SEARCHING | {"data"}, example="data/fashion-mnist"),
    Setting("verbose", 0, "Keras progress bars (repeat for more)", "-v", parse="count",
            commands=SEARCHING | {"retrain"}, resumable=True),
    Setting("profile", None, "smoke, cpu or gpu (default: gpu if a GPU is visible, else cpu)", "--profile",
            choices=("smoke", "cpu", "gpu"), commands=SEARCHING | {"data"}, example="smoke"),
    Setting("skip_bad_images", False, "image folders: leave unreadable images out (listed in the run dir) "
            "instead of refusing the dataset", "--skip-bad-images", parse="store_true",
            commands=SEARCHING | {"data"}),
    Setting("image_budget_mb", 1024, "image folders: RAM for decoded images; beyond it they are read "
            "from the run dir's image store per batch", "--image-budget", positive_int, resumable=True,
            commands=SEARCHING | {"retrain"}, example="256"),
    Setting("overwrite", False, "start afresh in an existing --run-dir (deletes it)", "--overwrite",
            parse="store_true", resumable=True),
    Setting("offline", False, "never download weights: use weights/ and the Keras cache only", "--offline",
            parse="store_true", resumable=True),
    Setting("seed", 0, "seeds splits, initialisation, shuffling and the tuner", "--seed", int, example="3"),
    Setting("weights", "imagenet", "backbone initialisation", "--weights", choices=("imagenet", "none"),
            example="none"),
    # What is searched (fields of hypermodel.space.SearchChoices).
    Setting("backbones", SearchChoices.backbones, "comma-separated registry names", "--backbones", names,
            in_choices=True, example="mobilenet_v2_0.35,mobilenet_v2_0.5"),
    Setting("resolutions", SearchChoices.resolutions,
            f"comma-separated input sizes, {RESOLUTION_RANGE[0]}..{RESOLUTION_RANGE[1]}", "--resolutions",
            resolutions, in_choices=True, example="48,64"),
    Setting("unfrozen_blocks", SearchChoices.unfrozen_blocks, "comma-separated choices, 0 = head only",
            "--unfrozen-blocks", ints, in_choices=True, example="0,2"),
    Setting("heads", SearchChoices.heads, "comma-separated heads: linear (the pooled features' logistic "
            "regression, fitted exactly before fine-tuning), mlp (a hidden dense layer)", "--heads", heads,
            in_choices=True, example="linear"),
    Setting("learning_rate", SearchChoices.learning_rate, "MIN,MAX of the log-uniform learning-rate range",
            "--learning-rate", float_range, in_choices=True, example="1e-4,1e-3"),
    Setting("choices", SearchChoices(), "the whole search space (profiles set it; flags above override fields)"),
    Setting("resolution_ladder", (96, 128), "candidate input sizes: those the images' detail and the "
            "pixel budget allow are searched (unless --resolutions; hypermodel.space.resolutions_for)"),
    Setting("pixel_budget", 5.0e8, "pixels (images × side²) one pass of the retrain may cost on this "
            "profile's machine: caps the resolutions of large datasets"),
    Setting("storage_size", None, "image files: side of the decoded store (None = from the resolutions "
            "and the images' sizes)"),
    # How the search runs.
    Setting("tuner", "hyperband", "search algorithm", "--tuner", choices=("hyperband", "random", "bayesian"),
            example="random"),
    Setting("max_epochs", 4, "Hyperband's most epochs per trial (random/bayesian: epochs per trial)",
            "--max-epochs", positive_int, example="2"),
    Setting("factor", 3, "Hyperband's reduction factor", "--factor", positive_int, example="2"),
    Setting("workers", 1, "trials trained at once by worker processes on this machine, each on its share "
            "of the cores (KerasTuner's chief/worker mode on 127.0.0.1)", "--workers", positive_int,
            resumable=True, example="2"),
    Setting("round_images", None, "images a search round (Hyperband's unit) trains on, whatever the "
            "dataset's size: sets epoch_fraction from the data (None = epoch_fraction as given)"),
    Setting("epoch_fraction", 1.0, "share of the training slice one search epoch covers (Hyperband's unit): "
            "below 1, a trial's first rounds judge it on part of a pass and later rounds continue the pass",
            "--epoch-fraction", share, example="0.5"),
    Setting("hyperband_iterations", 1, "Hyperband brackets sweeps", "--hyperband-iterations", positive_int,
            example="2"),
    Setting("max_trials", 10, "trials for random/bayesian", "--max-trials", positive_int, example="4"),
    Setting("time_budget_s", None, "search budget: 90s, 45m, 2h; 0 = none", "--time-budget", duration,
            resumable=True, example="5m"),
    Setting("batch_size", 64, "images per batch", "--batch-size", positive_int, example="32"),
    Setting("train_subset", None, "training images the search uses (0 = all)", "--train-subset", count_or_all,
            example="2000"),
    Setting("val_subset", None, "validation images the search uses (0 = all)", "--val-subset", count_or_all,
            example="500"),
    Setting("validation_fraction", 0.1, "share of each class held out for validation", "--validation-fraction",
            fraction, example="0.2"),
    Setting("feature_cache", True, "train frozen-prefix trials on cached activations", "--feature-cache",
            parse="switch", commands=SEARCHING | {"retrain"}, resumable=True),
    Setting("cache_budget_mb", 4096, "feature cache RAM budget in MB", "--cache-budget", positive_int,
            commands=SEARCHING | {"retrain"}, resumable=True, example="512"),
    Setting("class_weight", "auto", "weigh each class's loss by its rarity: balanced, none, or auto "
            f"(balanced where the largest class has {IMBALANCE_RATIO}× the images of the smallest)", "--class-weight",
            choices=("auto", "balanced", "none"), example="balanced"),
    Setting("objective", "auto", "what the search, early stopping and the phases choose by: accuracy, "
            "balanced_accuracy, macro_f1, or auto (balanced_accuracy where --class-weight auto would balance)",
            "--objective", choices=("auto", *OBJECTIVES), example="macro_f1"),
    Setting("refit_with_validation", None, "retrain: refit the final model on the training and validation "
            "images together for the epochs validation chose (default: where validation is a large share of "
            "a small dataset)", "--refit-with-validation", parse="switch", commands=SEARCHING | RETRAINING,
            resumable=True),
    Setting("early_stopping_patience", 2, "epochs without progress before a trial stops"),
    Setting("max_consecutive_failures", 3, "failed trials in a row that stop the search"),
    Setting("mixed_precision", False, "train in float16 with float32 variables"),
    Setting("fallback_backbones", (), "backbones searched instead when none of `backbones` has weights"),
    # The final retrain.
    Setting("epochs", None, "retrain: epochs of each phase (default: from the profile and the search)",
            "--epochs", positive_int, commands=RETRAINING, resumable=True, example="2"),
    Setting("job_time_budget_s", None,
            "whole job's wall time: the retrain's last phase gets as many epochs as fit in it; 0 = none",
            "--job-time-budget", duration, commands=RETRAINING, resumable=True, example="1h"),
    Setting("retrain_subset", None, "training images of the final retrain (0 = all)", "--retrain-subset",
            count_or_all, commands=RETRAINING, resumable=True, example="4000"),
    Setting("retrain_epochs", None, "(phase 1, phase 2) epochs; None = the best trial's epochs", resumable=True),
    Setting("retrain_augmentation", None, "augmentation of the retrain's phase 2 (None = as searched)",
            resumable=True),
    Setting("phase2_lr_factor", 0.1, "phase 2 learning rate = the searched one × this", resumable=True),
    Setting("label_smoothing", 0.0, "retrain's phase 2: share of each label spread over all classes",
            "--label-smoothing", smoothing, commands=RETRAINING, resumable=True, example="0.1"),
    Setting("ema_momentum", None, "retrain's phase 2: validate and keep a per-step moving average of the "
            "weights with this momentum; 0 = off", "--ema-momentum", momentum_or_off, commands=RETRAINING,
            resumable=True, example="0.999"),
    # Deployment: what is exported, and the limits trials and artifacts must meet.
    Setting("formats", EXPORT_FORMATS, f"comma-separated export formats: {', '.join(EXPORT_FORMATS)}",
            "--formats", export_formats, commands=EXPORTING, resumable=True, example="savedmodel,tflite-int8"),
    Setting("max_accuracy_drop", 1.0, "an exported artifact losing more test accuracy (pp) than this "
            "against the Keras model is marked rejected", "--max-accuracy-drop", non_negative_float,
            commands=EXPORTING, resumable=True, example="0.5"),
    Setting("max_latency_ms", None, "single-image latency limit on this CPU: slower trials are rejected "
            "before training, slower artifacts marked rejected", "--max-latency-ms", positive_float,
            commands=SEARCHING | EXPORTING, resumable=True, example="20"),
    Setting("max_model_mb", None, "model size limit (float32 weights for trials, file size for artifacts)",
            "--max-model-mb", positive_float, commands=SEARCHING | EXPORTING, resumable=True, example="8"),
    # Scaling out.
    Setting("distributed", None, "KerasTuner distributed mode: the chief serves the oracle, workers run trials",
            "--distributed", choices=("chief", "worker"), resumable=True, example="chief"),
    Setting("oracle", "127.0.0.1:8000", "HOST:PORT of the chief's oracle", "--oracle", resumable=True,
            example="127.0.0.1:8123"),
    Setting("worker_id", None, "this worker's name (its `worker` column in the leaderboard)", "--worker-id",
            resumable=True, example="w1"),
    Setting("worker_timeout_s", 1800, "chief: a trial whose worker has not reported for this long runs again "
            "on another worker (and fails if that run is lost too)",
            "--worker-timeout", duration, resumable=True, example="10m"),
    Setting("heartbeat_s", 60, "worker: tell the chief this often that its trial is alive (at most a third of "
            "--worker-timeout); 0 = never, and the chief takes any trial longer than --worker-timeout for lost",
            "--heartbeat", duration, resumable=True, example="30s"),
    Setting("strategy", "none", "tf.distribute strategy each trial trains under", "--strategy",
            choices=("none", "mirrored", "auto"), resumable=True, example="mirrored"),
)
BY_NAME = {s.name: s for s in SETTINGS}


def _settings_class():
    fields = [
        (s.name, object, dataclasses.field(default_factory=lambda d=s.default: d))
        for s in SETTINGS if not s.in_choices
    ]
    namespace = {
        "__doc__": "Every resolved setting of a run (see `SETTINGS` for what each means).",
        "to_dict": lambda self: dataclasses.asdict(self),
        "from_dict": classmethod(_from_dict),
    }
    return dataclasses.make_dataclass("Settings", fields, namespace=namespace)


def _from_dict(cls, values):
    """Rebuilds `Settings` from config.json (lists back to tuples; unknown keys dropped)."""
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in cls.__dataclass_fields__}
    if isinstance(values.get("choices"), dict):
        values["choices"] = SearchChoices(**{k: tuple(v) for k, v in values["choices"].items()})
    return cls(**values)


Settings = _settings_class()


def resolve(profile_name, profile, given):
    """Settings from the defaults, then `profile`'s overrides, then the `given` flags.

    Args:
        profile_name: The profile's name (recorded as `profile`).
        profile: {setting name: value} overrides of the profile.
        given: {setting name: value} of the flags on the command line.
    """
    values = {**profile, **{k: v for k, v in given.items() if not BY_NAME[k].in_choices}}
    values["profile"] = profile_name
    choice_overrides = {k: v for k, v in given.items() if BY_NAME[k].in_choices}
    values["choices"] = dataclasses.replace(values.get("choices", SearchChoices()), **choice_overrides)
    return Settings(**values)


def check_profile(name, overrides):
    """Raises ValueError when a profile names a setting that does not exist."""
    unknown = sorted(set(overrides) - set(BY_NAME))
    if unknown:
        raise ValueError(f"profile {name!r} sets unknown settings {unknown}; known: {', '.join(BY_NAME)}")
