"""Data layer: load and validate datasets, split them, feed them through tf.data."""

from data_pipeline.errors import DataError, UsageError, UserError
from data_pipeline.sources import Dataset, load_dataset

__all__ = ["DataError", "UsageError", "UserError", "Dataset", "load_dataset"]
