"""The test suite runs TensorFlow as the tool does (settings applied before it is imported)."""

import common.tensorflow_env  # noqa: F401
