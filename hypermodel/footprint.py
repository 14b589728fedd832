"""A trial's deployment footprint, measured on the built model before it trains.

`--max-latency-ms` and `--max-model-mb` reject a trial whose model is too slow or too
big for where it will run: the search then spends no training time on it. Latency is
one image through the whole model (batch 1, its traced `InferencePass`) on this CPU;
size is the float32 weights. Neither depends on what is fine-tuned or how. Latency is
measured once per backbone, resolution and pooling: the dense head's share (under
0.4 ms at 1 024 units) is inside the measurement's own spread (1.9-3.5 ms for one
MobileNetV2 α 0.35 at 64 px), and measuring costs a second. Size is each model's own.
"""

import dataclasses
import time

import keras_tuner as kt
import numpy as np
import tensorflow as tf

from hypermodel.backbones import get_backbone
from hypermodel.model import InferencePass

LATENCY_CALLS = 30
LATENCY_WARMUP = 5
REJECTED = "REJECTED"  # first word of a rejected trial's message


@dataclasses.dataclass(frozen=True)
class Footprint:
    latency_ms: float
    model_mb: float


@dataclasses.dataclass(frozen=True)
class Limits:
    """Deployment limits; None = no limit."""

    max_latency_ms: float = None
    max_model_mb: float = None

    def violations(self, footprint):
        """Why `footprint` breaks these limits (empty: it does not)."""
        problems = []
        if self.max_latency_ms is not None and footprint.latency_ms > self.max_latency_ms:
            problems.append(f"latency {footprint.latency_ms:.2f} ms > --max-latency-ms {self.max_latency_ms:g}")
        if self.max_model_mb is not None and footprint.model_mb > self.max_model_mb:
            problems.append(f"size {footprint.model_mb:.2f} MB > --max-model-mb {self.max_model_mb:g}")
        return problems


class TrialRejected(kt.errors.FailedTrialError):
    """The trial's model breaks a deployment limit; it was not trained.

    Attributes:
        footprint: What was measured.
    """

    def __init__(self, problems, footprint):
        super().__init__(f"{REJECTED}: {'; '.join(problems)}")
        self.footprint = footprint


def is_rejection(message):
    """Whether a trial's message (KerasTuner stores the traceback) is a `TrialRejected`."""
    lines = [line for line in str(message or "").strip().splitlines() if line.strip()]
    return bool(lines) and f"{REJECTED}: " in lines[-1]


def architecture_key(config):
    """What the footprint depends on."""
    return (config.backbone, config.resolution, config.pooling, config.head,
            config.dense_units if config.head == "mlp" else None)


def latency_key(config):
    """What the latency is measured for (the head's share is noise)."""
    return (config.backbone, config.resolution, config.pooling)


def model_mb(model):
    """The float32 size of `model`'s weights."""
    return model.count_params() * 4 / 2**20


def measure_latency_ms(predict, resolution, calls=LATENCY_CALLS, warmup=LATENCY_WARMUP):
    """The median milliseconds of one image through `predict` (a traced function of
    [batch, resolution, resolution, 3] floats, such as `InferencePass.predictions`)."""
    image = tf.constant(np.random.default_rng(0).uniform(-1, 1, (1, resolution, resolution, 3)), tf.float32)
    for _ in range(warmup):
        predict(image)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        predict(image).numpy()
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1000)


class FootprintChecker:
    """Measures each trial's footprint (latency once per `latency_key`) and rejects
    trials that break the limits.

    Args:
        limits: The `Limits`.
    """

    def __init__(self, limits):
        self.limits = limits
        self.latencies_ms = {}  # by `latency_key`
        self.measured = {}  # by `architecture_key`

    def check(self, model, config, inference=None):
        """The trial's `Footprint`; raises `TrialRejected` when it breaks a limit.

        Args:
            inference: `model`'s `InferencePass`, to time (else one is traced here).
        """
        key = latency_key(config)
        if key not in self.latencies_ms:
            inference = inference or InferencePass(model, get_backbone(config.backbone))
            self.latencies_ms[key] = measure_latency_ms(inference.predictions, config.resolution)
        footprint = Footprint(self.latencies_ms[key], model_mb(model))
        self.measured[architecture_key(config)] = footprint
        problems = self.limits.violations(footprint)
        if problems:
            raise TrialRejected(problems, footprint)
        return footprint

    def known_rejection(self, config):
        """A `TrialRejected` for an architecture already measured over a limit, else None
        (lets the tuner skip building such a model at all)."""
        footprint = self.measured.get(architecture_key(config))
        problems = self.limits.violations(footprint) if footprint else []
        return TrialRejected(problems, footprint) if problems else None
