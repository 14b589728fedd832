"""Model building: a pretrained backbone cut into a frozen prefix and a trainable top.

Every model is composed as `inputs → frozen_prefix → trainable_top`, where the cut
between the two sits at a block boundary of the backbone: below the first unfrozen
block (or at the backbone's output when `unfrozen_blocks = 0`). The frozen prefix's
output for an image never changes, which is what lets the feature cache
(data_pipeline/feature_cache.py) store it, and `hypermodel.training` train
`trainable_top` on stored activations: the same function as the end-to-end model,
without recomputing the prefix every epoch.
"""

import functools
import time
import types

import keras
import tensorflow as tf

from hypermodel.backbones import get_backbone

PREFIX_NAME, TOP_NAME, SUFFIX_NAME = "frozen_prefix", "trainable_top", "unfrozen_blocks"


def build_transfer_model(config, num_classes, weights="imagenet", seed=0, seconds=None, backbones=None):
    """Builds `inputs → frozen_prefix → trainable_top` for one `TrialConfig`.

    Args:
        config: A `hypermodel.space.TrialConfig`.
        num_classes: Output classes K.
        weights: "imagenet" or "none".
        seed: Seeds the random initialisation (head; whole backbone with "none").
        seconds: Optional dict; receives the seconds spent loading weights ("weights").
        backbones: Optional `ReusedBackbones` to take the backbone from (search trials).

    Returns:
        The end-to-end Keras model, expecting preprocessed [batch, res, res, 3] floats.
    """
    keras.utils.set_random_seed(seed)
    backbone = get_backbone(config.backbone)
    if backbones is None:
        base = backbone.build(config.resolution, weights, seconds)
    else:
        base = backbones.get(backbone, config.resolution, weights, seconds)
    # Seeded again, so the head's initialisation is the same whether the backbone was built or reused.
    keras.utils.set_random_seed(seed)
    prefix, suffix = split_backbone(base, backbone.block_ends(base), config.unfrozen_blocks)
    prefix.trainable = False
    if suffix is not None and backbones is not None:
        suffix = backbones.traced_blocks(base, suffix)

    top_inputs = keras.Input(prefix.output.shape[1:], name="prefix_features")
    x = top_inputs
    if suffix is not None:
        for layer in suffix.layers:
            # Keras 3: a non-trainable BatchNormalization runs in inference mode, keeping
            # the ImageNet statistics (the standard fine-tuning recipe).
            layer.trainable = not isinstance(layer, keras.layers.BatchNormalization)
        x = suffix(x)
    x = keras.layers.GlobalAveragePooling2D()(x) if config.pooling == "avg" else keras.layers.Flatten()(x)
    x = keras.layers.Dropout(config.dropout)(x)
    if config.head == "mlp":
        x = keras.layers.Dense(config.dense_units, activation="relu")(x)
        x = keras.layers.Dropout(config.dropout)(x)
    # float32 softmax even under mixed precision, for a numerically sound loss.
    outputs = keras.layers.Dense(num_classes, activation="softmax", dtype="float32")(x)
    top = keras.Model(top_inputs, outputs, name=TOP_NAME)

    inputs = keras.Input((config.resolution, config.resolution, 3), name="images")
    return keras.Model(inputs, top(prefix(inputs, training=False)), name=f"{config.backbone}_transfer")


class ReusedBackbones:
    """Backbones built once per process, handed out again with their first weights restored.

    Building a MobileNetV2 and loading its weights takes about half a second, most of a
    short cached trial; restoring the weights takes a twentieth of that. Every model
    built on a reused backbone shares its layers (and the trainable flags the last build
    set), so only one of them may be in use at a time: the search's trials, one after
    another in a process, never the retrain or export, whose models must stay intact.
    """

    def __init__(self):
        self._built = {}  # key → (backbone model, {id(variable): its value as first built})
        self._blocks = {}  # (id(backbone model), its cut) → TracedBlocks

    def get(self, backbone, resolution, weights, seconds=None):
        """`backbone.build(resolution, weights, seconds)`, or the same model again, as built."""
        # Variables belong to the strategy they were created under, and layers keep their dtype policy.
        key = (backbone.name, resolution, weights, keras.config.dtype_policy().name, tf.distribute.get_strategy())
        if key not in self._built:
            base = backbone.build(resolution, weights, seconds)
            self._built[key] = (base, {id(v): value for v, value in zip(base.weights, base.get_weights())})
            return base
        base, first_weights = self._built[key]
        started = time.perf_counter()
        # Only what the last trial trained can differ from the first weights, and its layers
        # are still the trainable ones; the rest (BatchNorm statistics too) stayed frozen.
        for variable in base.trainable_weights:
            variable.assign(first_weights[id(variable)])
        if seconds is not None:
            seconds["weights"] = seconds.get("weights", 0.0) + time.perf_counter() - started
        return base

    def traced_blocks(self, base, suffix):
        """`suffix`, blocks cut from `base` (a backbone `get` handed out), as `TracedBlocks`:
        the same ones, traced once, whenever a later trial cuts the same blocks. Under a
        multi-replica strategy `suffix` itself: a function traced in one replica's context
        would read that replica's variables in the others."""
        if tf.distribute.get_strategy().num_replicas_in_sync > 1:
            return suffix
        key = (id(base), suffix.layers[-1].name, len(suffix.layers))
        if key not in self._blocks:
            self._blocks[key] = TracedBlocks(suffix)
        return self._blocks[key]


class TracedBlocks(keras.layers.Layer):
    """Backbone blocks whose forward pass is one `tf.function` shared by every model that
    calls them, so only the first trial on a cut traces them.

    A trial's train step calls the blocks' concrete function (and reuses its gradient),
    so tracing it costs little more than the head and the optimizer: tracing ~150 layers
    anew took a 17-block MobileNetV2 top's first train step a second longer, and its
    first validation twice as long.

    Args:
        blocks: The unfrozen blocks, a model from `split_backbone` (named SUFFIX_NAME).
    """

    # Layers that compute the same in training and inference (BatchNorm: while frozen).
    _TRAINING_AGNOSTIC = (
        keras.layers.InputLayer, keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.Dense,
        keras.layers.ReLU, keras.layers.Activation, keras.layers.Add, keras.layers.Multiply,
        keras.layers.Concatenate, keras.layers.ZeroPadding2D, keras.layers.MaxPooling2D,
        keras.layers.AveragePooling2D, keras.layers.GlobalAveragePooling2D, keras.layers.Reshape,
        keras.layers.Rescaling,
    )

    def __init__(self, blocks):
        super().__init__(name=SUFFIX_NAME)
        self.blocks = blocks
        self._functions = {}  # training flag → traced forward pass
        self.built = True

    @property
    def layers(self):
        return self.blocks.layers

    def _training_changes_output(self):
        return not all(
            isinstance(layer, self._TRAINING_AGNOSTIC)
            or (isinstance(layer, keras.layers.BatchNormalization) and not layer.trainable)
            for layer in self.blocks.layers
        )

    def call(self, inputs, training=False):
        # One function serves training and inference where the blocks compute the same in both.
        training = bool(training) and self._training_changes_output()
        if training not in self._functions:
            signature = tf.TensorSpec((None, *self.blocks.input.shape[1:]), self.compute_dtype)
            self._functions[training] = tf.function(
                functools.partial(self.blocks, training=training), input_signature=[signature], autograph=False)
        return self._functions[training](tf.cast(inputs, self.compute_dtype))

    def compute_output_spec(self, inputs, training=False):
        return self.blocks.compute_output_spec(inputs)


def split_backbone(base, block_ends, unfrozen_blocks):
    """Cuts a backbone below its last `unfrozen_blocks` blocks.

    Args:
        base: The backbone model.
        block_ends: Its block boundaries, bottom to top (`Backbone.block_ends`).
        unfrozen_blocks: How many top blocks go to the suffix; clipped so that block 0,
            the stem, always stays in the frozen prefix.

    Returns:
        (prefix, suffix): `suffix(prefix(x)) == base(x)`; suffix is None for 0 blocks.
    """
    cut_name = cut_layer(block_ends, unfrozen_blocks)
    if cut_name == block_ends[-1]:  # the backbone's output: nothing unfrozen
        return keras.Model(base.input, base.output, name=PREFIX_NAME), None
    cut = base.get_layer(cut_name).output
    return keras.Model(base.input, cut, name=PREFIX_NAME), keras.Model(cut, base.output, name=SUFFIX_NAME)


def cut_layer(block_ends, unfrozen_blocks):
    """The name of the layer the prefix ends at with `unfrozen_blocks` unfrozen (clipped so
    the stem, block 0, stays frozen; the backbone's output for 0)."""
    return block_ends[-(min(unfrozen_blocks, len(block_ends) - 1) + 1)]


def prefixes_for(model, backbone, unfrozen_choices):
    """The frozen prefixes `model` would have with each of `unfrozen_choices`, cut from
    its own graph (same input layer, current weights), so one pass computes them all.

    Args:
        model: A model from `build_transfer_model`.
        backbone: Its `Backbone`.
        unfrozen_choices: `unfrozen_blocks` values (duplicates after clipping merge).

    Returns:
        The prefix models, bottom cut first.
    """
    prefix = model.get_layer(PREFIX_NAME)
    suffix = unfrozen_blocks_of(model.get_layer(TOP_NAME))
    layers = {layer.name: layer for layer in prefix.layers + (suffix.layers if suffix else [])}
    ends = backbone.block_ends(types.SimpleNamespace(layers=list(layers.values())))
    cuts = sorted({cut_layer(ends, u) for u in unfrozen_choices}, key=ends.index)
    # Layer.output is the output in the backbone's own graph, the one `prefix.input` starts.
    return [keras.Model(prefix.input, layers[cut].output, name=PREFIX_NAME) for cut in cuts]


class InferencePass:
    """A model's inference, traced once for any batch size: its predictions, and its
    frozen prefix's activations at the cuts the search can ask for.

    The footprint times it on one image and, when its cuts reach the backbone's output
    (the pass then computes nothing a prefix-only pass would not), the feature cache
    runs it over the data: one trace, about a second for a MobileNetV2, serves both.
    Nothing is built or traced until first used.

    Args:
        model: A model from `build_transfer_model`.
        backbone: Its `Backbone`.
        unfrozen_choices: `unfrozen_blocks` values whose cuts it returns.

    Attributes:
        reaches_backbone_output: Whether one of the cuts is the backbone's output.
    """

    def __init__(self, model, backbone, unfrozen_choices=()):
        self.model, self.backbone, self.unfrozen_choices = model, backbone, tuple(unfrozen_choices)
        self.reaches_backbone_output = 0 in self.unfrozen_choices

    @functools.cached_property
    def prefixes(self):
        """The prefix models of the cuts, bottom cut first."""
        return prefixes_for(self.model, self.backbone, self.unfrozen_choices)

    @functools.cached_property
    def _function(self):
        whole = prefixes_for(self.model, self.backbone, (0,))[0]  # the backbone, to its output
        # The top's head (the chain after its blocks) on the backbone's output: the model's
        # own function, since the cut is exact, with each layer computed once.
        predictions = whole.output
        for layer in self.model.get_layer(TOP_NAME).layers[1:]:
            if layer.name != SUFFIX_NAME:
                predictions = layer(predictions)
        graph = keras.Model(whole.input, [predictions] + [prefix.output for prefix in self.prefixes])
        return tf.function(lambda images: graph(images, training=False), autograph=False,
                           input_signature=[tf.TensorSpec((None, *graph.input.shape[1:]), tf.float32)])

    def predictions(self, images):
        """The model's output for a batch of preprocessed images."""
        return self._function(images)[0]

    def activations(self, images):
        """{cut layer name: the prefix's activations} for a batch of preprocessed images."""
        return {prefix.layers[-1].name: a for prefix, a in zip(self.prefixes, self._function(images)[1:])}


def unfrozen_blocks_of(top):
    """The backbone blocks inside `trainable_top` (named SUFFIX_NAME), or None for a head only."""
    return next((layer for layer in top.layers if layer.name == SUFFIX_NAME), None)


def set_unfrozen_blocks_trainable(model, trainable):
    """Freezes or unfreezes the backbone blocks of `trainable_top` (BatchNorm stays frozen)."""
    suffix = unfrozen_blocks_of(model.get_layer(TOP_NAME))
    for layer in suffix.layers if suffix else []:
        layer.trainable = trainable and not isinstance(layer, keras.layers.BatchNormalization)


