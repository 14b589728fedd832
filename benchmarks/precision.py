"""float32 vs mixed bfloat16 on this CPU: the retrain's training and inference steps.

    python benchmarks/precision.py              # MobileNetV2 α 0.5 at 96 px, 10 and 17 blocks unfrozen
    python benchmarks/precision.py --steps 60

Issue 15 lists bfloat16 "where the CPU has it (AVX512_BF16, AMX)" as a lever for cheaper
epochs. This times the default job's phase-2 model, batch 64 on random 96 px inputs (the
step's cost does not depend on the pixels), under each Keras dtype policy in the same
process (the policy is set before each model is built), after warm-up steps that absorb
tracing. The last line is JSON: {"<policy>_unfrozen_<n>": {"train_step_ms",
"predict_step_ms"}, "bf16_train_speedup_unfrozen_<n>", "bf16_predict_speedup_unfrozen_<n>",
"cpu"}; a speedup below 1 means bfloat16 is slower.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from benchmarks.machine import cpu_description  # noqa: E402
from hypermodel.model import build_transfer_model, set_unfrozen_blocks_trainable  # noqa: E402
from hypermodel.space import TrialConfig  # noqa: E402

POLICIES = ("float32", "mixed_bfloat16")
BATCH = 64
WARMUP_STEPS = 5


def step_times(policy, unfrozen, steps):
    """(training step ms, inference step ms) of the phase-2 model under `policy`."""
    keras.mixed_precision.set_global_policy(policy)
    try:
        config = TrialConfig("mobilenet_v2_0.5", 96, unfrozen, "avg", 256, 0.2, 1e-3, "constant", 0, "adam", "none")
        model = build_transfer_model(config, 10)
        set_unfrozen_blocks_trainable(model, True)
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy")
        rng = np.random.default_rng(0)
        images = rng.uniform(-1, 1, (BATCH * steps, 96, 96, 3)).astype("float32")
        labels = rng.integers(0, 10, BATCH * steps)
        batches = tf.data.Dataset.from_tensor_slices((images, labels)).batch(BATCH).cache()
        model.fit(batches.take(WARMUP_STEPS), verbose=0)
        model.predict(batches.take(WARMUP_STEPS).map(lambda x, y: x), verbose=0)
        started = time.perf_counter()
        model.fit(batches, verbose=0)
        train_ms = (time.perf_counter() - started) / steps * 1000
        started = time.perf_counter()
        model.predict(batches.map(lambda x, y: x), verbose=0)
        predict_ms = (time.perf_counter() - started) / steps * 1000
        return round(train_ms, 1), round(predict_ms, 1)
    finally:
        keras.mixed_precision.set_global_policy("float32")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per measurement")
    args = parser.parse_args()
    results = {}
    for unfrozen in (10, 17):
        for policy in POLICIES:
            train_ms, predict_ms = step_times(policy, unfrozen, args.steps)
            results[f"{policy}_unfrozen_{unfrozen}"] = {"train_step_ms": train_ms, "predict_step_ms": predict_ms}
            print(f"{policy:<15} unfrozen={unfrozen}: train step {train_ms} ms, predict step {predict_ms} ms",
                  flush=True)
        fp32, bf16 = (results[f"{p}_unfrozen_{unfrozen}"] for p in POLICIES)
        results[f"bf16_train_speedup_unfrozen_{unfrozen}"] = round(fp32["train_step_ms"] / bf16["train_step_ms"], 2)
        results[f"bf16_predict_speedup_unfrozen_{unfrozen}"] = round(
            fp32["predict_step_ms"] / bf16["predict_step_ms"], 2)
    print(json.dumps({**results, "cpu": cpu_description()}))


if __name__ == "__main__":
    main()
