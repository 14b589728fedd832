"""scikit-learn's bundled handwritten digits: 1 797 images of 8×8 px, 17 grey levels, 10 classes.

The file is UCI's optdigits test set (13 writers) and names no writer, so the split
cannot be by writer: the first 70 % of the file's order is train and the rest test
(contiguous, so if the file is in writer order, writers do not cross; this cannot be
checked). Grey levels 0–16 are scaled to 0–255, ink white on black as in the file.
"""

import numpy as np
from PIL import Image

from benchmarks.datasets.common import safe_name

NAME = "digits8"
SOURCE = "scikit-learn (PyPI) sklearn/datasets/data/digits.csv.gz = UCI optdigits test set"
PACKAGES = ()
COVERS = "tiny grayscale (8 px), handwriting (a flip changes the class)"
SPLIT = "file order: first 70 % train, last 30 % test (the file names no writers)"
TRAIN_FRACTION = 0.7


def licence():
    return {"scikit-learn": "BSD-3-Clause (package); data: UCI ML repository optdigits, CC BY 4.0"}


def build(root):
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.round(digits.images * (255 / 16)).astype(np.uint8)
    cut = int(round(TRAIN_FRACTION * len(pixels)))
    for index, (image, label) in enumerate(zip(pixels, digits.target)):
        split = "train" if index < cut else "test"
        folder = root / split / safe_name(str(label))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image, mode="L").save(folder / f"{index:04d}.png")
    return {"notes": "1 797 images; ink white on black as in the file"}
