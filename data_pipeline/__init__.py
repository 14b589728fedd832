"""Data layer: load and validate datasets, split them, feed them through tf.data, store features."""

from data_pipeline.sources import Dataset, load_dataset

__all__ = ["Dataset", "load_dataset"]
