"""The `.tflite` conversions two ways, in the same process on the same model: through a
temporary SavedModel (`TFLiteConverter.from_saved_model`, as the export did before) and
frozen from the function directly (`common.shims.tflite_converter`, what it runs now).

    python benchmarks/tflite_conversion.py --resolution 96

The model is the default job's usual winner: MobileNetV2 α 0.5 with ImageNet weights
(vendored), its top 10 blocks and a 512-unit head, its `.tflite` function taking raw
Fashion-MNIST pixels. Each route converts float32, float16 and int8 (calibrated on 300
training images) and is timed twice (the first pass traces). One JSON line: seconds per
route and pass, the ratio of the second passes, each file's size both ways and the
largest difference between the two routes' probabilities on 256 test images; then the CPU.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common.tensorflow_env  # noqa: E402,F401
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from benchmarks.machine import cpu_description  # noqa: E402
from common import native_output  # noqa: E402
from data_pipeline import load_dataset  # noqa: E402
from deploy import export  # noqa: E402
from deploy.runtimes import LiteRtModel  # noqa: E402
from hypermodel.backbones import get_backbone  # noqa: E402
from hypermodel.model import build_transfer_model  # noqa: E402
from hypermodel.space import TrialConfig  # noqa: E402

FORMATS = ("tflite", "tflite-fp16", "tflite-int8")


def through_saved_model(function, model, calibration):
    """The earlier route: the function written out as a SavedModel, then converted."""
    files = {}
    with tempfile.TemporaryDirectory() as source:
        export._write_saved_model(model, function, source)
        for fmt in FORMATS:
            converter = tf.lite.TFLiteConverter.from_saved_model(source)
            if fmt != "tflite":
                converter.optimizations = [tf.lite.Optimize.DEFAULT]
            if fmt == "tflite-fp16":
                converter.target_spec.supported_types = [tf.float16]
            if fmt == "tflite-int8":
                converter.representative_dataset = lambda: ([calibration[i : i + 1]] for i in range(len(calibration)))
                converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            with native_output.silenced():
                files[fmt] = converter.convert()
    return files


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=96)
    args = parser.parse_args()
    dataset = load_dataset()
    config = TrialConfig(backbone="mobilenet_v2_0.5", resolution=args.resolution, unfrozen_blocks=10, pooling="avg",
                         dense_units=512, dropout=0.1, learning_rate=1e-3, lr_schedule="cosine", warmup_epochs=0,
                         optimizer="adam", augmentation="none")
    model = build_transfer_model(config, dataset.num_classes)
    function = export.tflite_function(model, config.resolution, get_backbone(config.backbone).preprocess_input)
    calibration = export.calibration_inputs(dataset)
    routes = {"saved_model": lambda: through_saved_model(function, model, calibration),
              "frozen": lambda: export.converted(function, model, FORMATS, calibration)}
    seconds, files = {}, {}
    for attempt in (1, 2):
        for name, route in routes.items():
            started = time.perf_counter()
            files[name] = route()
            seconds[f"{name}_{attempt}"] = round(time.perf_counter() - started, 2)
    test = np.asarray(dataset.x_test[:256])
    difference = {fmt: float(np.abs(LiteRtModel(model_content=files["saved_model"][fmt])(test)
                                    - LiteRtModel(model_content=files["frozen"][fmt])(test)).max()) for fmt in FORMATS}
    print(json.dumps({"resolution": args.resolution, "seconds": seconds,
                      "ratio": round(seconds["saved_model_2"] / seconds["frozen_2"], 2),
                      "size_kb": {name: {fmt: round(len(b) / 1024, 1) for fmt, b in f.items()}
                                  for name, f in files.items()},
                      "max_abs_probability_difference": difference}))
    print(json.dumps({"cpu": cpu_description()}))


if __name__ == "__main__":
    main()
