"""Where a run's full-integer `.tflite` loses accuracy, and what the int8 top tuning recovers.

    python benchmarks/int8_sensitivity.py RUN_DIR

On RUN_DIR's trained model (flip TTA off, so every figure is one plain pass; the
whole official test split):
- float: the float32 `.tflite`; int8: the full-integer one, as export converted it
  before tuning the top;
- int8 with one part left in float (LiteRT's QuantizationDebugger denylist): the
  frozen prefix, its first depthwise layer alone, the trainable top;
- the Keras model with only the first depthwise layer's weights rounded to int8 (per
  channel, BatchNorm folded, as the converter does): test accuracy, and how far that
  moves the frozen prefix's output (RMS change / the features' standard deviation);
- int8 after `deploy/int8_tuning.py` fine-tuned the top on the int8 prefix's features.
Last line JSON.
"""

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from benchmarks.machine import cpu_description  # noqa: E402
from data_pipeline import load_dataset  # noqa: E402
from data_pipeline.pipeline import prepare_images  # noqa: E402
from data_pipeline.splits import training_data  # noqa: E402
from deploy import export  # noqa: E402
from deploy.int8_tuning import fit_top_to_int8_prefix  # noqa: E402
from deploy.runtimes import LiteRtModel  # noqa: E402
from hypermodel.backbones import get_backbone  # noqa: E402
from hypermodel.model import PREFIX_NAME  # noqa: E402
from tuning.retrain import read_best  # noqa: E402

FIRST_DEPTHWISE = "expanded_conv_depthwise"  # MobileNetV2's first depthwise layer


def accuracy(tflite, dataset):
    model = LiteRtModel(model_content=tflite)
    predicted = np.concatenate([model(dataset.x_test[i : i + 500]).argmax(1) for i in range(0, 10_000, 500)])
    return float(np.mean(predicted == dataset.y_test))


def int8_with_float_part(source_dir, calibration, int8, names):
    """The int8 conversion with the ops whose output tensor names (as in the `int8`
    file) contain any of `names` left in float."""
    from ai_edge_litert.interpreter import Interpreter

    tensors = [d["name"] for d in Interpreter(model_content=int8).get_tensor_details()]
    converter = tf.lite.TFLiteConverter.from_saved_model(source_dir)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([calibration[i : i + 1]] for i in range(len(calibration)))
    options = tf.lite.experimental.QuantizationDebugOptions(
        denylisted_nodes=[t for t in tensors if any(n in t for n in names)])
    debugger = tf.lite.experimental.QuantizationDebugger(
        converter=converter, debug_dataset=lambda: ([calibration[i : i + 1]] for i in range(8)), debug_options=options)
    return debugger.get_nondebug_quantized_model()


def first_depthwise_rounded(model, dataset, preprocess_input, resolution):
    """(test accuracy, relative RMS change of the prefix's output) with only the first
    depthwise layer's folded weights rounded to int8 per channel."""
    prefix = model.get_layer(PREFIX_NAME)
    depthwise, norm = prefix.get_layer(FIRST_DEPTHWISE), prefix.get_layer(FIRST_DEPTHWISE + "_BN")
    gamma, _, _, variance = norm.get_weights()
    fold = gamma / np.sqrt(variance + norm.epsilon)
    kernel, *rest = depthwise.get_weights()
    folded = kernel[..., 0] * fold
    step = np.abs(folded).reshape(-1, folded.shape[-1]).max(0) / 127
    images = prepare_images(dataset.x_test[:500], resolution, preprocess_input)
    before = prefix.predict(images, verbose=0)
    depthwise.set_weights([(np.round(folded / step) * step / fold)[..., None], *rest])
    after = prefix.predict(images, verbose=0)
    predicted = np.concatenate([
        model.predict(prepare_images(dataset.x_test[i : i + 500], resolution, preprocess_input), verbose=0).argmax(1)
        for i in range(0, 10_000, 500)
    ])
    depthwise.set_weights([kernel, *rest])
    change = float(np.sqrt(np.mean((after - before) ** 2)) / np.std(before))
    return float(np.mean(predicted == dataset.y_test)), change


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    args = parser.parse_args()
    run_dir = Path(args.run_dir)
    dataset = load_dataset()
    _, config = read_best(run_dir)
    model = export.load_trained_model(run_dir)
    preprocess_input = get_backbone(config.backbone).preprocess_input
    calibration = export.calibration_inputs(dataset)
    function = export.tflite_function(model, config.resolution, preprocess_input)
    results = {"float": accuracy(export.converted(function, model, ["tflite"])["tflite"], dataset)}
    int8 = export.converted(function, model, ["tflite-int8"], calibration)["tflite-int8"]
    results["int8"] = accuracy(int8, dataset)
    with tempfile.TemporaryDirectory() as source:
        export._write_saved_model(model, function, source)
        for label, names in {"prefix": [PREFIX_NAME], "first_depthwise": [FIRST_DEPTHWISE + "_relu"],
                             "top": ["trainable_top"]}.items():
            results[f"int8_{label}_in_float"] = accuracy(int8_with_float_part(source, calibration, int8, names),
                                                         dataset)
            print(label, results[f"int8_{label}_in_float"], flush=True)
    results["keras_first_depthwise_rounded"], results["prefix_output_rms_change"] = first_depthwise_rounded(
        model, dataset, preprocess_input, config.resolution)
    prefix = export.converted(export.prefix_function(model, config.resolution, preprocess_input), model,
                              ["tflite-int8"], calibration)["tflite-int8"]
    data = training_data(dataset, 0.1, 0)
    tuning = fit_top_to_int8_prefix(model, prefix, data, tta=False, batch_size=64, seed=0, budget_mb=4096)
    results["int8_top_tuned"] = accuracy(export.converted(function, model, ["tflite-int8"], calibration)["tflite-int8"],
                                         dataset)
    results["top_tuning"] = tuning
    print(json.dumps({"run_dir": str(run_dir), **results, "cpu": cpu_description()}))


if __name__ == "__main__":
    main()
