"""Profiles: honest defaults for the machine at hand. Explicit CLI flags override them.

A profile is a set of overrides of the settings declared in `tuning/settings.py`.

- smoke: a complete search in ≤ 3 minutes on a 2-core CPU (tests, first look).
- cpu:   the default without a GPU: one hour on 2 cores, the offline MobileNetV2
         weights, small inputs, the feature cache serving partial fine-tuning trials.
- gpu:   selected when a GPU is visible: big backbones up to 224 px, mixed precision.
"""

from hypermodel.space import SearchChoices
from tuning.settings import check_profile


PROFILES = {
    "smoke": dict(
        choices=SearchChoices(
            backbones=("mobilenet_v2_0.35", "mobilenet_v2_0.5"),
            dense_units=(64, 256),
            learning_rate=(5e-4, 3e-3),
            lr_schedules=("constant", "cosine"),
            warmup_epochs=(0,),
        ),
        # Small datasets afford larger sizes within the smoke job's compute (its retrain's 4 000 images at 96 px).
        resolution_ladder=(96, 160, 224),
        pixel_budget=4000 * 96**2,
        round_images=2000,
        max_epochs=2,
        factor=2,
        train_subset=2000,
        val_subset=500,
        retrain_epochs=(3, 3),
        retrain_subset=4000,
        time_budget_s=150,
    ),
    "cpu": dict(
        # One hour on 2 CPU cores: a 12-minute search on a stratified 8k/2k slice, then
        # the winner retrained on all 54k images for whatever the hour has left.
        choices=SearchChoices(
            # Only the MobileNetV2s have weights offline; the others join where they download.
            backbones=("mobilenet_v2_0.35", "mobilenet_v2_0.5", "mobilenet_v3_small", "efficientnet_b0"),
            learning_rate=(3e-4, 3e-3),
            # Augmentation only pays off over the long retrain (phase 2 below); in 1–3
            # epoch trials it lowers accuracy, so the search would never pick it.
            augmentations=("none",),
        ),
        # Resolutions and fine-tuning depth are decided from the data (tuning/data_decisions.py):
        # these bound them by what 2 cores afford in an hour (54 000 images at 96 px a pass).
        resolution_ladder=(96, 128, 160, 224),
        pixel_budget=54_000 * 96**2,
        # A trial's first round reads 2 667 images (a third of the 8 000-image slice, or
        # several passes over a small dataset), and the best go on to 9 rounds, so a
        # bracket judges 9 configurations cheaply.
        round_images=2667,
        # Two trials at once, one core each: a trial's tracing and bookkeeping are single-
        # threaded Python, and a 64-96 px top's small tensors leave a second core half idle.
        workers=2,
        max_epochs=9,
        factor=3,
        hyperband_iterations=3,  # more brackets than the budget allows: the budget ends it
        train_subset=8000,
        val_subset=2000,
        time_budget_s=12 * 60,
        retrain_epochs=(1, None),
        retrain_augmentation="flip_shift_erase",
        # Phase 1 is a single epoch, so phase 2 does the real fine-tuning: half the
        # searched rate (the search found it works for fine-tuning from the start).
        phase2_lr_factor=0.5,
        # Phase 2's validation plateaus at ~94 % with training accuracy above it: soften
        # the targets and keep the weights' average over the last ~1 000 steps (1.2 epochs).
        label_smoothing=0.1,
        ema_momentum=0.999,
        job_time_budget_s=58 * 60,
    ),
    "gpu": dict(
        choices=SearchChoices(
            backbones=("resnet50", "efficientnet_b0", "mobilenet_v2_1.0"),
            poolings=("avg", "flatten"),
            augmentations=("none", "shift", "flip_shift", "flip_shift_erase"),
        ),
        # Offline, none of those has weights: search the shipped ones at GPU sizes instead.
        fallback_backbones=("mobilenet_v2_0.5", "mobilenet_v2_0.35"),
        resolution_ladder=(96, 160, 224),
        pixel_budget=54_000 * 224**2,
        max_epochs=12,
        factor=3,
        batch_size=128,
        time_budget_s=15 * 60,
        retrain_epochs=(2, None),
        retrain_augmentation="flip_shift_erase",
        job_time_budget_s=30 * 60,
        mixed_precision=True,
    ),
}


for _name, _overrides in PROFILES.items():
    check_profile(_name, _overrides)


def default_profile_name():
    """'gpu' when TensorFlow sees a GPU, else 'cpu'."""
    import tensorflow as tf

    return "gpu" if tf.config.list_physical_devices("GPU") else "cpu"
