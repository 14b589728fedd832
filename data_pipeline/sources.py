"""Dataset sources: IDX folder, Kaggle-style CSV folder, NPZ file, vendored default,
and image files (a class-per-folder tree or a CSV manifest: data_pipeline/folders.py).

Array sources load into a validated `Dataset` of uint8 N×28×28 images and int32 labels
0..K-1. Image files load into a validated `ImageFiles` first (checked, not decoded);
`Dataset.from_files` then serves their pixels from the image store. Every fault
raises one `DataError` naming the file and the fault.
"""

import dataclasses
import hashlib
import itertools
import json
import zipfile
from pathlib import Path

import numpy as np

from common.download import DownloadError, download
from common.errors import DataError
from common.paths import PROJECT_ROOT, file_sha256, keras_home
from data_pipeline import folders, validate
from data_pipeline.store import StoredImages

VENDORED_DIR = PROJECT_ROOT / "data" / "fashion-mnist"
FASHION_MNIST_URL = "https://storage.googleapis.com/tensorflow/tf-keras-datasets/"

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
# The official files' sha256 (data/fashion-mnist/README.md).
FASHION_MNIST_SHA256 = {
    "train-images-idx3-ubyte.gz": "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
    "train-labels-idx1-ubyte.gz": "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
    "t10k-images-idx3-ubyte.gz": "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
    "t10k-labels-idx1-ubyte.gz": "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
}
# IDX roles and the file names accepted for each (gzipped or not; MNIST's dotted names).
IDX_NAMES = {
    "x_train": ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
    "y_train": ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte"),
    "x_test": ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"),
    "y_test": ("t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"),
}
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A validated image-classification dataset.

    Attributes:
        x_train, y_train, x_test, y_test: uint8 images (N×28×28 arrays, or N×S×S×3
            `StoredImages` for image files) and int32 labels.
        class_names: One name per class, index = label.
        source: How it was found ("vendored", "idx", "csv", "npz", "keras-cache",
            "folders", "manifest").
        path: The file or folder it was read from.
        checksum: sha256 over the source files, in a fixed order.
        checksum_status: "verified" (matches official sha256), or "computed" (no reference).
        x_val, y_val: A validation split the data came with (else None: carved from train).
        files: The `ImageFiles` of an image-file dataset (None for arrays).
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: tuple
    source: str
    path: str
    checksum: str
    checksum_status: str
    x_val: object = None
    y_val: np.ndarray = None
    files: folders.ImageFiles = None

    @classmethod
    def from_files(cls, files, store):
        """The `Dataset` of validated image files whose pixels `store` holds (in `files.files` order)."""
        def split(name):
            rows = [i for i, f in enumerate(files.files) if f.split == name]
            labels = np.array([files.files[i].label for i in rows], dtype=np.int32)
            return (StoredImages(store, rows), labels) if rows else (None, None)

        (x_train, y_train), (x_val, y_val), (x_test, y_test) = split("train"), split("val"), split("test")
        return cls(x_train, y_train, x_test, y_test, files.class_names, files.source, str(files.root),
                   files.checksum, "computed", x_val, y_val, files)

    @property
    def num_classes(self):
        return len(self.class_names)

    def summary(self):
        """A JSON-friendly description (no arrays)."""
        if self.files is not None:
            return self.files.summary()
        return {
            "source": self.source,
            "path": self.path,
            "train": int(len(self.x_train)),
            "test": int(len(self.x_test)),
            "image_shape": list(self.x_train.shape[1:]),
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "train_per_class": np.bincount(self.y_train, minlength=self.num_classes).tolist(),
            "test_per_class": np.bincount(self.y_test, minlength=self.num_classes).tolist(),
            "checksum": self.checksum,
            "checksum_status": self.checksum_status,
        }


def load_dataset(path=None, skip_bad_images=False):
    """Loads and validates a dataset.

    Args:
        path: A folder with the four IDX files, a folder with `*train*.csv` and
            `*test*.csv`, an `.npz` file, a folder of class folders (or train/ and
            test/ of class folders), a CSV manifest of image files, or None for the
            vendored Fashion-MNIST.
        skip_bad_images: Image files only: leave bad files out (listed) instead of refusing.

    Returns:
        A `Dataset`, or `ImageFiles` for image files (`Dataset.from_files` serves their pixels).
    """
    if path is None:
        return _load_default()
    path = Path(path)
    if not path.exists():
        raise DataError(path, "no such file or folder")
    if path.is_dir() and _find_idx_files(path):
        return _load_idx(path, source="idx")
    if path.is_dir() and _find_csv_pair(path):
        return _load_csv(path)
    if folders.is_image_dataset(path):
        return folders.scan(path, skip_bad=skip_bad_images)
    if path.is_file():
        if path.suffix.lower() == ".npz":
            return _load_npz(path)
        raise DataError(path, "unsupported file: give an .npz file, a CSV manifest (path,label columns), "
                              "or a folder (class folders, IDX files, or *train*.csv + *test*.csv)")
    missing = [stems[0] + "[.gz]" for stems in IDX_NAMES.values() if not _idx_file(path, stems)]
    if len(missing) < len(IDX_NAMES):
        raise DataError(path, f"incomplete IDX dataset: missing {', '.join(missing)}")
    raise DataError(
        path,
        "no known dataset layout: expected class folders of images, the four IDX files "
        "(train-images-idx3-ubyte[.gz], ...), one *train*.csv and one *test*.csv, or an .npz file",
    )


def _load_default():
    if VENDORED_DIR.is_dir() and _find_idx_files(VENDORED_DIR):
        dataset = _load_idx(VENDORED_DIR, source="vendored")
        if dataset.checksum_status != "verified":
            raise DataError(VENDORED_DIR, "vendored Fashion-MNIST files do not match their official sha256")
        return dataset
    cache_dir = keras_home() / "datasets" / "fashion-mnist"
    if not (cache_dir.is_dir() and _find_idx_files(cache_dir)):
        try:
            for name in FASHION_MNIST_SHA256:
                download(FASHION_MNIST_URL + name, cache_dir / name)
        except DownloadError as e:
            raise DataError(
                VENDORED_DIR,
                f"Fashion-MNIST not found and not downloadable ({e}): put the four official "
                "*-ubyte.gz files in data/fashion-mnist/ (see its README)",
            ) from None
    return _load_idx(cache_dir, source="keras-cache")


def _find_idx_files(folder):
    """Maps each IDX role to its file in `folder`, or returns None if any is absent."""
    found = {role: _idx_file(folder, stems) for role, stems in IDX_NAMES.items()}
    return found if all(found.values()) else None


def _idx_file(folder, stems):
    """The first existing file of `stems` (gzipped first), or None."""
    candidates = [folder / (s + ext) for s in stems for ext in (".gz", "")]
    return next((c for c in candidates if c.is_file()), None)


def _load_idx(folder, source):
    files = _find_idx_files(folder)
    x_train = validate.parse_idx(files["x_train"], expect_images=True)
    y_train = validate.parse_idx(files["y_train"], expect_images=False)
    x_test = validate.parse_idx(files["x_test"], expect_images=True)
    y_test = validate.parse_idx(files["y_test"], expect_images=False)
    digests = {role: file_sha256(p) for role, p in files.items()}
    official = all(
        FASHION_MNIST_SHA256.get(files[role].name) == digest for role, digest in digests.items()
    )
    return _assemble(
        x_train, y_train, x_test, y_test, files, folder, source, digests,
        status="verified" if official else "computed",
        is_fashion_mnist=official,
    )


def _find_csv_pair(folder):
    csvs = [p for p in folder.glob("*.csv") if p.is_file()]
    train = sorted(p for p in csvs if "train" in p.name.lower())
    test = sorted(p for p in csvs if "test" in p.name.lower())
    if not train and not test:
        return None
    if len(train) != 1 or len(test) != 1:
        raise DataError(
            folder,
            f"expected exactly one *train*.csv and one *test*.csv, found {len(train)} and {len(test)}",
        )
    return {"train": train[0], "test": test[0]}


def _load_csv(folder):
    files = _find_csv_pair(folder)
    train_cols, x_train, y_train = _read_csv(files["train"])
    test_cols, x_test, y_test = _read_csv(files["test"])
    if test_cols != train_cols:
        i = next(i for i, (a, b) in enumerate(zip(test_cols, train_cols)) if a != b)
        raise DataError(
            files["test"], f"columns differ from {files['train'].name}: column {i + 1} is "
            f"'{test_cols[i]}' here, '{train_cols[i]}' there",
        )
    files = {"x_train": files["train"], "x_test": files["test"]}
    digests = {role: file_sha256(p) for role, p in files.items()}
    return _assemble(
        x_train, y_train, x_test, y_test,
        {"x_train": files["x_train"], "y_train": files["x_train"],
         "x_test": files["x_test"], "y_test": files["x_test"]},
        folder, "csv", digests, status="computed",
        is_fashion_mnist="fashion" in (folder.name + files["x_train"].name).lower(),
    )


def _read_csv(path):
    """Reads a Kaggle-format CSV: header `label,pixel1..pixel784`, one image per row."""
    import pandas as pd

    if path.stat().st_size == 0:
        raise DataError(path, "file is empty")
    try:
        # Only empty fields are missing values: "NA" or "nan" is reported as non-numeric.
        frame = pd.read_csv(path, low_memory=False, keep_default_na=False, na_values=[""])
    except UnicodeDecodeError:
        raise DataError(path, "not a text CSV file (binary content)") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as e:
        raise DataError(path, f"not a valid CSV file ({str(e).splitlines()[0]})") from None
    columns = [str(c).strip() for c in frame.columns]
    if "label" not in columns:
        raise DataError(path, "no 'label' column in the header")
    if len(frame) == 0:
        raise DataError(path, "header only, no rows")
    if not isinstance(frame.index, pd.RangeIndex):  # pandas made an index of the extra first field
        raise DataError(path, f"line 2: more fields than the {len(columns)} header columns")
    frame.columns = columns
    pixel_cols = [c for c in columns if c != "label"]
    if len(pixel_cols) != validate.IMAGE_SIDE**2:
        raise DataError(path, f"{len(pixel_cols)} pixel columns, expected 784")
    for column in columns:
        values = frame[column]
        if values.isna().any():
            row = int(np.flatnonzero(values.isna().to_numpy())[0])
            raise DataError(path, _describe_missing(path, row, column, len(columns)))
        if not pd.api.types.is_numeric_dtype(values):
            numeric = pd.to_numeric(values, errors="coerce")
            bad = np.flatnonzero(numeric.isna().to_numpy())
            if len(bad) == 0:  # numbers too big for int64 (range-checked below)
                frame[column] = numeric.astype(np.float64)
                continue
            row = int(bad[0])
            raise DataError(path, f"line {row + 2} column '{column}': non-numeric value {values.iloc[row]!r}")
    images = validate.as_images(frame[pixel_cols].to_numpy(), path)
    labels = validate.as_labels(frame["label"].to_numpy(), path, len(images))
    return columns, images, labels


def _describe_missing(path, row, column, num_fields):
    line_no = row + 2  # 1-based, after the header
    with open(path, errors="replace") as f:
        line = next(itertools.islice(f, line_no - 1, None), "")
    fields = line.rstrip("\r\n").split(",")
    if len(fields) < num_fields:
        return f"line {line_no}: short row ({len(fields)} of {num_fields} fields)"
    return f"line {line_no} column '{column}': empty value"


def _load_npz(path):
    try:
        archive = np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise DataError(path, f"not a valid .npz file ({e})") from None
    with archive:
        missing = [k for k in NPZ_KEYS if k not in archive.files]
        if missing:
            raise DataError(path, f"missing arrays {missing}; expected {list(NPZ_KEYS)}")
        try:
            arrays = {k: archive[k] for k in NPZ_KEYS}
        except (ValueError, zipfile.BadZipFile, OSError, EOFError) as e:
            raise DataError(path, f"unreadable array in .npz ({e})") from None
    digests = {"npz": file_sha256(path)}
    return _assemble(
        arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"],
        dict.fromkeys(NPZ_KEYS, path), path, "npz", digests, status="computed",
        is_fashion_mnist="fashion" in path.name.lower(),
    )


def _assemble(x_train, y_train, x_test, y_test, files, path, source, digests, status, is_fashion_mnist):
    x_train = validate.as_images(x_train, files["x_train"])
    x_test = validate.as_images(x_test, files["x_test"])
    y_train = validate.as_labels(y_train, files["y_train"], len(x_train))
    y_test = validate.as_labels(y_test, files["y_test"], len(x_test))
    num_classes = validate.check_classes(y_train, y_test, files["y_train"], files["y_test"])
    folder = path if Path(path).is_dir() else Path(path).parent
    if (folder / "classes.txt").is_file():
        class_names = validate.read_class_names(folder / "classes.txt", num_classes)
    elif is_fashion_mnist and num_classes == len(FASHION_MNIST_CLASSES):
        class_names = FASHION_MNIST_CLASSES
    else:
        class_names = tuple(str(i) for i in range(num_classes))
    checksum = hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest()
    return Dataset(
        x_train, y_train, x_test, y_test, class_names, source, str(path), checksum, status
    )
