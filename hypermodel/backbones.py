"""The backbone registry: everything the tool knows about each ImageNet CNN.

Each entry knows its `keras.applications` constructor, its `preprocess_input`, its
minimum input size, where its graph can be cut into blocks, and its ImageNet weight
file. Weights resolve offline-first: vendored `weights/`, then the Keras cache, then
a download.
"""

import dataclasses
import re
import time

import keras

from common.download import DownloadError, download
from common.errors import DataError, UsageError
from common.paths import PROJECT_ROOT, keras_home
from hypermodel.space import RESOLUTION_RANGE

VENDORED_WEIGHTS = PROJECT_ROOT / "weights"
KERAS_APPS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/"


@dataclasses.dataclass(frozen=True)
class Backbone:
    """One registry entry.

    Attributes:
        name: Registry key, e.g. "mobilenet_v2_0.5".
        constructor: The `keras.applications` function.
        preprocess_input: Its `preprocess_input` (applied per batch in tf.data).
        block_pattern: Regex over layer names; group 1 names a block, and the last
            matching layer of each block is where the graph can be cut without
            splitting a residual (or dense) connection. The model's output closes
            the last block.
        weight_file: Keras's no-top ImageNet file name (trained at 224 px).
        weight_url: Where Keras downloads it from.
        min_size: Smallest input side the constructor accepts.
        kwargs: Extra constructor arguments (e.g. alpha).
    """

    name: str
    constructor: object
    preprocess_input: object
    block_pattern: str
    weight_file: str
    weight_url: str
    min_size: int = RESOLUTION_RANGE[0]
    kwargs: dict = dataclasses.field(default_factory=dict)

    def build(self, resolution, weights="imagenet", seconds=None):
        """Builds the no-top backbone at `resolution`.

        Args:
            resolution: Input side in pixels (≥ `min_size`).
            weights: "imagenet" or "none".
            seconds: Optional dict; receives the seconds spent loading weights ("weights").
        """
        if resolution < self.min_size:
            raise UsageError(f"{self.name} needs inputs of at least {self.min_size} px, got {resolution}")
        model = self.constructor(
            input_shape=(resolution, resolution, 3), include_top=False, weights=None, **self.kwargs
        )
        if weights == "imagenet":
            started = time.perf_counter()
            load_imagenet_weights(self, model)
            if seconds is not None:
                seconds["weights"] = seconds.get("weights", 0.0) + time.perf_counter() - started
        elif weights != "none":
            raise UsageError(f"weights must be 'imagenet' or 'none', got {weights!r}")
        return model

    def block_ends(self, model):
        """Names of the layers that end each block, bottom to top (last = model output)."""
        last_of_block = {}
        for layer in model.layers:
            match = re.match(self.block_pattern, layer.name)
            if match:
                last_of_block[match.group(1)] = layer.name
        ends = list(last_of_block.values())
        if ends[-1] != model.layers[-1].name:
            ends.append(model.layers[-1].name)
        return ends


def _mobilenet_v2(alpha):
    return Backbone(
        name=f"mobilenet_v2_{alpha}",
        constructor=keras.applications.MobileNetV2,
        preprocess_input=keras.applications.mobilenet_v2.preprocess_input,
        block_pattern=r"^(expanded_conv|block_\d+)_(project_BN|add)$",
        weight_file=f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{alpha}_224_no_top.h5",
        weight_url=KERAS_APPS_URL + "mobilenet_v2/",
        kwargs={"alpha": float(alpha)},
    )


REGISTRY = {
    b.name: b
    for b in [
        _mobilenet_v2("0.35"),
        _mobilenet_v2("0.5"),
        _mobilenet_v2("1.0"),
        Backbone(
            name="mobilenet_v3_small",
            constructor=keras.applications.MobileNetV3Small,
            preprocess_input=keras.applications.mobilenet_v3.preprocess_input,
            block_pattern=r"^(expanded_conv(?:_\d+)?)_(project_bn|add)$",
            weight_file="weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5",
            weight_url=KERAS_APPS_URL + "mobilenet_v3/",
        ),
        Backbone(
            name="efficientnet_b0",
            constructor=keras.applications.EfficientNetB0,
            preprocess_input=keras.applications.efficientnet.preprocess_input,
            block_pattern=r"^(block\d[a-z])_(project_bn|add)$",
            weight_file="efficientnetb0_notop.h5",
            weight_url="https://storage.googleapis.com/keras-applications/",
        ),
        Backbone(
            name="resnet50",
            constructor=keras.applications.ResNet50,
            preprocess_input=keras.applications.resnet50.preprocess_input,
            block_pattern=r"^(conv\d_block\d+)_out$",
            weight_file="resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
            weight_url=KERAS_APPS_URL + "resnet/",
        ),
        Backbone(
            name="densenet121",
            constructor=keras.applications.DenseNet121,
            preprocess_input=keras.applications.densenet.preprocess_input,
            block_pattern=r"^(conv\d_block\d+|pool\d)_(concat|pool)$",
            weight_file="densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5",
            weight_url=KERAS_APPS_URL + "densenet/",
        ),
        Backbone(
            name="vgg16",
            constructor=keras.applications.VGG16,
            preprocess_input=keras.applications.vgg16.preprocess_input,
            block_pattern=r"^(block\d)_pool$",
            weight_file="vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
            weight_url=KERAS_APPS_URL + "vgg16/",
        ),
    ]
}


def get_backbone(name):
    """Looks a backbone up by name; the error lists the known names."""
    if name not in REGISTRY:
        raise UsageError(f"unknown backbone {name!r}; known: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def keras_cache_dir():
    return keras_home() / "models"


def find_weights(backbone):
    """The local path of a backbone's ImageNet weights, or None (never downloads)."""
    for folder in (VENDORED_WEIGHTS, keras_cache_dir()):
        path = folder / backbone.weight_file
        if path.is_file() and path.stat().st_size > 0:
            return path
    return None


_IMAGENET_WEIGHTS = {}  # backbone name → its ImageNet weights, as read from the file


def load_imagenet_weights(backbone, model):
    """Loads `backbone`'s ImageNet weights into `model`, reading the file once per process.

    No-top weights do not depend on the input size, so the 224 px file loads at any
    size, and weights read for one resolution serve every other.
    """
    weights = _IMAGENET_WEIGHTS.get(backbone.name)
    if weights is None:
        model.load_weights(resolve_weights(backbone))
        _IMAGENET_WEIGHTS[backbone.name] = model.get_weights()
    else:
        model.set_weights(weights)


def resolve_weights(backbone, offline=False, download_timeout=10):
    """Finds a backbone's weights offline-first, downloading into the Keras cache last.

    Args:
        offline: Never download.

    Raises:
        DataError: naming the missing file, where to put it, and why it could not be had.
    """
    path = find_weights(backbone)
    if path is not None:
        return path
    where = f"put {backbone.weight_file} in weights/ or {keras_cache_dir()}/"
    if offline:
        raise DataError(VENDORED_WEIGHTS / backbone.weight_file,
                        f"ImageNet weights for {backbone.name} not found (--offline): {where}")
    try:
        return download(backbone.weight_url + backbone.weight_file, keras_cache_dir() / backbone.weight_file,
                        timeout=download_timeout)
    except DownloadError as e:
        raise DataError(VENDORED_WEIGHTS / backbone.weight_file,
                        f"ImageNet weights for {backbone.name} not found and not downloadable ({e}): {where}") from None


def usable_backbones(names, offline=False):
    """Splits backbones into those whose ImageNet weights can be had and those that can't.

    Returns:
        (usable names, {dropped name: why}).
    """
    usable, dropped = [], {}
    for name in names:
        try:
            resolve_weights(get_backbone(name), offline=offline)
            usable.append(name)
        except DataError as e:
            dropped[name] = e.fault
    return tuple(usable), dropped
