"""The scores a model can be chosen by: accuracy, balanced accuracy and macro-F1.

On imbalanced data accuracy rewards a model that ignores the rare classes; balanced
accuracy (the mean of the per-class recalls) and macro-F1 weigh every class alike.
Both are Keras metrics over a streamed confusion matrix, so trials, early stopping and
the tuner's objective can follow either (`--objective`).
"""

import keras
from keras import ops

class _ConfusionMetric(keras.metrics.Metric):
    """Accumulates a K×K confusion matrix (rows: true class, columns: predicted) over
    the batches of an epoch; sample weights are ignored (every image counts once)."""

    def __init__(self, num_classes, name, dtype=None):
        super().__init__(name=name, dtype=dtype)
        self.num_classes = num_classes
        self.confusion = self.add_variable(shape=(num_classes, num_classes), initializer="zeros",
                                           name="confusion", dtype="float32")

    def update_state(self, y_true, y_pred, sample_weight=None):
        truth = ops.one_hot(ops.cast(ops.reshape(y_true, (-1,)), "int32"), self.num_classes, dtype="float32")
        predicted = ops.one_hot(ops.argmax(y_pred, axis=-1), self.num_classes, dtype="float32")
        self.confusion.assign_add(ops.matmul(ops.transpose(truth), predicted))

    def reset_state(self):
        self.confusion.assign(ops.zeros((self.num_classes, self.num_classes), dtype="float32"))

    def _per_class(self):
        """(true positives, images per true class, predictions per class, present mask)."""
        hits = ops.diagonal(self.confusion)
        support = ops.sum(self.confusion, axis=1)
        predicted = ops.sum(self.confusion, axis=0)
        return hits, support, predicted, ops.cast(support > 0, "float32")

    def get_config(self):
        return {"num_classes": self.num_classes, "name": self.name, "dtype": self.dtype}


@keras.saving.register_keras_serializable(package="transfer_tuner")
class BalancedAccuracy(_ConfusionMetric):
    """The mean over classes of the share of each class's images predicted right."""

    def __init__(self, num_classes, name="balanced_accuracy", dtype=None):
        super().__init__(num_classes, name=name, dtype=dtype)

    def result(self):
        hits, support, _, present = self._per_class()
        recall = hits / ops.maximum(support, 1.0)
        return ops.sum(recall * present) / ops.maximum(ops.sum(present), 1.0)


@keras.saving.register_keras_serializable(package="transfer_tuner")
class MacroF1(_ConfusionMetric):
    """The mean over the classes present of each class's F1 score."""

    def __init__(self, num_classes, name="macro_f1", dtype=None):
        super().__init__(num_classes, name=name, dtype=dtype)

    def result(self):
        hits, support, predicted, present = self._per_class()
        f1 = 2 * hits / ops.maximum(support + predicted, 1.0)
        return ops.sum(f1 * present) / ops.maximum(ops.sum(present), 1.0)


def compiled_metrics(num_classes):
    """The metrics every model of the tool is compiled with, one per objective."""
    return ["accuracy", BalancedAccuracy(num_classes), MacroF1(num_classes)]
