"""Tests of the data layer: every source on real data, every bad input via the real CLI,
and the tf.data pipeline / split the search trains on.

Datasets written here are slices of the vendored Fashion-MNIST (2 train + 1 test image
per class) or a small synthetic 3-class set, so each CLI subprocess is well under a second.
"""

import dataclasses
import gzip
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cli import ROOT, run_cli
from common.errors import DataError, UsageError
from data_pipeline import Dataset, load_dataset
from data_pipeline.sources import FASHION_MNIST_CLASSES, IDX_NAMES, VENDORED_DIR
from reference import resized_rgb

HEADER = ["label"] + [f"pixel{i}" for i in range(1, 785)]


# ---------------------------------------------------------------- data and writers


@dataclasses.dataclass
class Arrays:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


@pytest.fixture(scope="session")
def fashion():
    """The vendored Fashion-MNIST (60000 / 10000)."""
    return load_dataset()


@pytest.fixture(scope="session")
def small(fashion):
    """A real slice: the first 2 train and the first 1 test image of each class (20 / 10)."""
    train = np.concatenate([np.flatnonzero(fashion.y_train == c)[:2] for c in range(10)])
    test = np.concatenate([np.flatnonzero(fashion.y_test == c)[:1] for c in range(10)])
    return Arrays(
        fashion.x_train[train].copy(),
        fashion.y_train[train].copy(),
        fashion.x_test[test].copy(),
        fashion.y_test[test].copy(),
    )


@pytest.fixture(scope="session")
def three_classes():
    """A synthetic dataset that is not Fashion-MNIST: 3 classes of bars (|, -, /), 7 + 4 each."""
    rng = np.random.default_rng(3)

    def make(n_per_class):
        images, labels = [], []
        for cls in range(3):
            for _ in range(n_per_class):
                img = rng.integers(0, 40, (28, 28))
                k = rng.integers(8, 20)
                if cls == 0:
                    img[:, k : k + 3] = 250
                elif cls == 1:
                    img[k : k + 3, :] = 250
                else:
                    idx = np.arange(28)
                    img[idx, idx] = 250
                images.append(img)
                labels.append(cls)
        return np.array(images, np.uint8), np.array(labels, np.int32)

    x_train, y_train = make(7)
    x_test, y_test = make(4)
    return Arrays(x_train, y_train, x_test, y_test)


def idx_bytes(array):
    """The IDX encoding of a uint8 array (images N×H×W: magic 0x803; labels N: 0x801)."""
    array = np.asarray(array, np.uint8)
    magic = 0x800 + array.ndim
    head = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return head + array.tobytes()


def idx_name(role, style):
    """File name for an IDX role; style: gz, plain, dotted (MNIST's), dotted_gz."""
    stem = IDX_NAMES[role][1 if style.startswith("dotted") else 0]
    return stem + (".gz" if style.endswith("gz") else "")


def write_idx(folder, data, style="gz", **raw):
    """Writes the four IDX files; `raw[role]` replaces a file's (uncompressed) bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for role in IDX_NAMES:
        content = raw[role] if role in raw else idx_bytes(getattr(data, role))
        path = folder / idx_name(role, style)
        path.write_bytes(gzip.compress(content, mtime=0) if style.endswith("gz") else content)
        paths[role] = path
    return paths


def csv_lines(x, y, header=HEADER):
    rows = [",".join(header)]
    for img, label in zip(x.reshape(len(x), -1), y):
        rows.append(",".join([str(int(label))] + [str(int(v)) for v in img]))
    return rows


def write_csv(folder, data, train="train.csv", test="test.csv", train_lines=None, test_lines=None):
    """Writes a Kaggle-style CSV pair; `*_lines` replace a file's lines."""
    folder.mkdir(parents=True, exist_ok=True)
    train_lines = csv_lines(data.x_train, data.y_train) if train_lines is None else train_lines
    test_lines = csv_lines(data.x_test, data.y_test) if test_lines is None else test_lines
    (folder / train).write_text("\n".join(train_lines) + "\n")
    (folder / test).write_text("\n".join(test_lines) + "\n")
    return folder / train, folder / test


def write_npz(path, data, shape=(28, 28), **changes):
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {
        "x_train": data.x_train.reshape(len(data.x_train), *shape),
        "y_train": data.y_train,
        "x_test": data.x_test.reshape(len(data.x_test), *shape),
        "y_test": data.y_test,
    }
    arrays.update(changes)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


def write_in_format(fmt, folder, data):
    """Writes `data` in one format; returns what --data would be given."""
    if fmt == "idx":
        write_idx(folder, data)
        return folder
    if fmt == "csv":
        write_csv(folder, data)
        return folder
    return write_npz(folder / "data.npz", data)


def assert_same_arrays(dataset, data):
    for name in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(dataset, name), getattr(data, name))
    assert dataset.x_train.dtype == np.uint8 and dataset.x_test.dtype == np.uint8
    assert dataset.y_train.dtype == np.int32 and dataset.y_test.dtype == np.int32


def snapshot(folder, contents=True):
    """Every path under `folder` with its size, mtime and (files) bytes — to detect any write."""
    state = {}
    for p in sorted(Path(folder).rglob("*")):
        st = p.lstat()
        data = p.read_bytes() if contents and p.is_file() else None
        state[str(p)] = (p.is_dir(), st.st_size, st.st_mtime_ns, data)
    return state


# ---------------------------------------------------------------- sources on real data


def test_vendored_default_is_verified_fashion_mnist(fashion):
    assert fashion.source == "vendored"
    assert Path(fashion.path) == VENDORED_DIR
    assert fashion.x_train.shape == (60000, 28, 28) and fashion.x_test.shape == (10000, 28, 28)
    assert fashion.x_train.dtype == np.uint8 and fashion.y_train.dtype == np.int32
    assert fashion.class_names == FASHION_MNIST_CLASSES
    assert np.bincount(fashion.y_train).tolist() == [6000] * 10
    assert np.bincount(fashion.y_test).tolist() == [1000] * 10
    assert fashion.checksum_status == "verified"
    # Real images, not blank: background 0, ink up to 255.
    assert fashion.x_train.min() == 0 and fashion.x_train.max() == 255


@pytest.mark.parametrize("style", ["gz", "plain", "dotted", "dotted_gz"])
def test_idx_folder_slice(tmp_path, small, style):
    paths = write_idx(tmp_path / "idx", small, style=style)
    assert paths["x_train"].name == idx_name("x_train", style)
    dataset = load_dataset(tmp_path / "idx")
    assert_same_arrays(dataset, small)
    assert dataset.source == "idx"
    assert dataset.num_classes == 10
    # A slice cannot be verified as the official files: its classes are just numbered.
    assert dataset.checksum_status == "computed"
    assert dataset.class_names == tuple(str(i) for i in range(10))


def test_idx_copy_of_official_files_is_verified(tmp_path, fashion):
    folder = tmp_path / "copy"
    folder.mkdir()
    for f in VENDORED_DIR.glob("*.gz"):
        os.symlink(f, folder / f.name)
    dataset = load_dataset(folder)
    assert dataset.source == "idx"
    assert dataset.checksum_status == "verified"
    assert dataset.checksum == fashion.checksum
    assert dataset.class_names == FASHION_MNIST_CLASSES


@pytest.mark.parametrize("label_last", [False, True])
def test_kaggle_csv_folder_slice(tmp_path, small, label_last):
    folder = tmp_path / "kaggle"
    lines = {}
    for split in ("train", "test"):
        x, y = getattr(small, f"x_{split}"), getattr(small, f"y_{split}")
        rows = [row.split(",") for row in csv_lines(x, y)]
        if label_last:
            rows = [r[1:] + r[:1] for r in rows]
        lines[split] = [",".join(r) for r in rows]
    write_csv(
        folder, small, "fashion-mnist_train.csv", "fashion-mnist_test.csv", lines["train"], lines["test"]
    )
    dataset = load_dataset(folder)
    assert_same_arrays(dataset, small)
    assert dataset.source == "csv"
    assert dataset.checksum_status == "computed"
    # Kaggle's Fashion-MNIST file names give the Fashion-MNIST class names.
    assert dataset.class_names == FASHION_MNIST_CLASSES


def test_csv_fashion_in_a_parent_folder_name_does_not_name_the_classes(tmp_path, small):
    """Only the CSV folder's or file's own name marks Kaggle's Fashion-MNIST, not a parent's."""
    folder = tmp_path / "fashion-projects" / "digits"
    write_csv(folder, small)
    assert load_dataset(folder).class_names == tuple(str(i) for i in range(10))


@pytest.mark.parametrize("shape", [(28, 28), (784,), (28, 28, 1)], ids=["Nx28x28", "Nx784", "Nx28x28x1"])
@pytest.mark.parametrize("dtype", [np.uint8, np.float32, np.int64])
def test_npz_slice(tmp_path, small, shape, dtype):
    data = small.replace(x_train=small.x_train.astype(dtype), x_test=small.x_test.astype(dtype))
    path = write_npz(tmp_path / "fashion_slice.npz", data, shape=shape)
    dataset = load_dataset(path)
    assert_same_arrays(dataset, small)
    assert dataset.source == "npz"
    assert dataset.path == str(path)
    assert dataset.checksum_status == "computed"


def test_npz_labels_as_column_vector(tmp_path, small):
    path = write_npz(tmp_path / "d.npz", small, y_train=small.y_train[:, None], y_test=small.y_test[:, None])
    assert_same_arrays(load_dataset(path), small)


@pytest.mark.parametrize("fmt", ["idx", "csv", "npz"])
def test_other_dataset_numbers_its_classes_and_infers_k(tmp_path, three_classes, fmt):
    target = write_in_format(fmt, tmp_path / "bars", three_classes)
    dataset = load_dataset(target)
    assert_same_arrays(dataset, three_classes)
    assert dataset.num_classes == 3
    assert dataset.class_names == ("0", "1", "2")
    summary = dataset.summary()
    assert summary["train_per_class"] == [7, 7, 7] and summary["test_per_class"] == [4, 4, 4]

    # classes.txt beside the data names them (blank lines ignored).
    (tmp_path / "bars" / "classes.txt").write_text("vertical\nhorizontal\n\ndiagonal\n")
    assert load_dataset(target).class_names == ("vertical", "horizontal", "diagonal")


def test_classes_txt_overrides_fashion_names(tmp_path, small):
    folder = tmp_path / "fashion"
    write_csv(folder, small)
    names = [f"c{i}" for i in range(10)]
    (folder / "classes.txt").write_text("\n".join(names))
    assert load_dataset(folder).class_names == tuple(names)


def test_test_split_may_lack_classes(tmp_path, three_classes):
    """K comes from train; a test split without class 2 still gives K = 3."""
    keep = three_classes.y_test < 2
    data = three_classes.replace(x_test=three_classes.x_test[keep], y_test=three_classes.y_test[keep])
    dataset = load_dataset(write_npz(tmp_path / "d.npz", data))
    assert dataset.num_classes == 3
    assert dataset.summary()["test_per_class"] == [4, 4, 0]


def test_checksum_tracks_content(tmp_path, small):
    a = load_dataset(write_idx(tmp_path / "a", small)["x_train"].parent)
    b = load_dataset(write_idx(tmp_path / "b", small)["x_train"].parent)
    assert a.checksum == b.checksum and len(a.checksum) == 64
    x = small.x_train.copy()
    x[0, 0, 0] ^= 1
    c = load_dataset(write_idx(tmp_path / "c", small.replace(x_train=x))["x_train"].parent)
    assert c.checksum != a.checksum


# ---------------------------------------------------------------- the CLI


def test_cli_data_default_summary():
    result = run_cli("data")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    out = result.stdout
    assert f"source:      vendored ({VENDORED_DIR})" in out
    assert "60000 / 10000 images" in out
    assert "image shape: 28x28" in out
    assert "classes:     10" in out
    for i, name in enumerate(FASHION_MNIST_CLASSES):
        line = next(line for line in out.splitlines() if line.strip().startswith(f"{i} {name}"))
        assert line.split()[-4:] == ["train", "6000", "test", "1000"], line
    assert "verified against the official sha256" in out


def test_cli_data_custom_dataset_without_tensorflow(tmp_path, three_classes):
    """`search.py data` summarises a custom set, and stays fast: it never imports TensorFlow."""
    target = write_in_format("npz", tmp_path, three_classes)
    (tmp_path / "classes.txt").write_text("vertical\nhorizontal\ndiagonal\n")
    code = (
        "import sys, search\n"
        f"rc = search.main(['data', '--data', {str(target)!r}])\n"
        "assert 'tensorflow' not in sys.modules, 'search.py data imported tensorflow'\n"
        "sys.exit(rc)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], check=False, cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert f"source:      npz ({target})" in result.stdout
    assert "21 / 12 images" in result.stdout
    assert "classes:     3" in result.stdout
    assert "diagonal" in result.stdout
    assert "computed (no reference to verify)" in result.stdout


# Bad inputs: each builder writes into `d` (a folder that does not exist yet) and returns
# (the --data argument, the file the error must name, a regex the fault must match).
BAD = {}


def bad(fn):
    BAD[fn.__name__] = fn
    return fn


def _idx(d, s, role, content, style="gz"):
    paths = write_idx(d, s, style=style, **{role: content})
    return d, paths[role]


def _short_image_idx(s, n):
    return idx_bytes(s.x_train)[: 16 + 784 * n]


@bad
def missing_folder(d, s):
    return d / "nowhere", d / "nowhere", r"no such file or folder"


@bad
def missing_npz_file(d, s):
    d.mkdir()
    return d / "data.npz", d / "data.npz", r"no such file or folder"


@bad
def idx_missing_one_file(d, s):
    paths = write_idx(d, s)
    paths["y_test"].unlink()
    return d, d, r"incomplete IDX dataset: missing t10k-labels-idx1-ubyte"


@bad
def no_known_layout(d, s):
    d.mkdir()
    (d / "notes.txt").write_text("images are elsewhere\n")
    np.save(d / "images.npy", s.x_train)
    return d, d, r"no known dataset layout"


@bad
def empty_folder(d, s):
    d.mkdir()
    return d, d, r"no known dataset layout"


@bad
def unsupported_file(d, s):
    write_csv(d, s)
    return d / "train.csv", d / "train.csv", r"unsupported file"


@bad
def idx_empty_gz_file(d, s):
    paths = write_idx(d, s)
    paths["x_train"].write_bytes(b"")
    return d, paths["x_train"], r"file is empty"


@bad
def idx_empty_plain_file(d, s):
    return (*_idx(d, s, "y_test", b"", style="dotted"), r"file is empty")


@bad
def idx_not_gzip(d, s):
    paths = write_idx(d, s)
    paths["y_train"].write_bytes(idx_bytes(s.y_train))  # raw IDX under a .gz name
    return d, paths["y_train"], r"not a gzip file"


@bad
def idx_truncated_gzip(d, s):
    paths = write_idx(d, s)
    raw = paths["x_test"].read_bytes()
    paths["x_test"].write_bytes(raw[: len(raw) // 2])
    return d, paths["x_test"], r"truncated gzip"


@bad
def idx_corrupt_gzip(d, s):
    paths = write_idx(d, s)
    raw = bytearray(paths["x_train"].read_bytes())
    raw[-8] ^= 0xFF  # the CRC32 trailer
    paths["x_train"].write_bytes(bytes(raw))
    return d, paths["x_train"], r"corrupt gzip"


@bad
def idx_binary_garbage_gz(d, s):
    paths = write_idx(d, s)
    paths["x_train"].write_bytes(np.random.default_rng(1).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    return d, paths["x_train"], r"not a gzip file"


@bad
def idx_binary_garbage_plain(d, s):
    garbage = np.random.default_rng(2).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    return (*_idx(d, s, "x_test", garbage, style="plain"), r"wrong IDX magic")


@bad
def idx_wrong_magic_images(d, s):
    return (*_idx(d, s, "x_train", idx_bytes(s.y_train)), r"wrong IDX magic 0x00000801, expected 0x00000803")


@bad
def idx_wrong_magic_labels(d, s):
    content = (0x0C01).to_bytes(4, "big") + idx_bytes(s.y_test)[4:]  # int32 labels
    return (*_idx(d, s, "y_test", content), r"wrong IDX magic 0x00000c01, expected 0x00000801")


@bad
def idx_images_not_28x28(d, s):
    content = idx_bytes(np.pad(s.x_train, ((0, 0), (2, 2), (2, 2))))
    return (*_idx(d, s, "x_train", content), r"images are 32x32, expected 28x28")


@bad
def idx_header_too_short(d, s):
    return (*_idx(d, s, "x_test", idx_bytes(s.x_test)[:10]), r"too short for an IDX header")


@bad
def idx_truncated_body(d, s):
    content = idx_bytes(s.x_train)[:-100]
    return (*_idx(d, s, "x_train", content), r"IDX header declares \[20, 28, 28\].*\(truncated\)")


@bad
def idx_image_label_count_mismatch(d, s):
    return (*_idx(d, s, "y_train", idx_bytes(s.y_train[:19])), r"19 labels for 20 images")


@bad
def idx_zero_images(d, s):
    paths = write_idx(d, s, x_train=idx_bytes(s.x_train[:0]), y_train=idx_bytes(s.y_train[:0]))
    return d, paths["x_train"], r"zero images"


@bad
def idx_single_class(d, s):
    return (*_idx(d, s, "y_train", idx_bytes(np.zeros(20, np.uint8))), r"a single class \(0\)")


@bad
def idx_test_label_out_of_range(d, s):
    y = s.y_test.copy()
    y[3] = 10
    return (*_idx(d, s, "y_test", idx_bytes(y)), r"label 10 out of range: train has classes 0\.\.9")


@bad
def idx_classes_missing(d, s):
    y = s.y_train.copy()
    y[y == 3] = 4
    return (*_idx(d, s, "y_train", idx_bytes(y)), r"labels must be 0\.\.K-1: classes \[3\] never occur")


@bad
def classes_txt_wrong_count(d, s):
    write_idx(d, s)
    (d / "classes.txt").write_text("\n".join(FASHION_MNIST_CLASSES[:9]))
    return d, d / "classes.txt", r"9 class names for 10 classes"


def _csv(d, s, which, lines):
    train, test = write_csv(d, s, **{f"{which}_lines": lines})
    return d, train if which == "train" else test


def _edit_field(s, row, column, value, split="train"):
    """CSV lines with field `column` (0 = label) of data row `row` set to `value`."""
    lines = csv_lines(getattr(s, f"x_{split}"), getattr(s, f"y_{split}"))
    fields = lines[row + 1].split(",")
    fields[column] = value
    lines[row + 1] = ",".join(fields)
    return lines


@bad
def csv_empty_file(d, s):
    train, _ = write_csv(d, s)
    train.write_bytes(b"")
    return d, train, r"file is empty"


@bad
def csv_header_only(d, s):
    return (*_csv(d, s, "test", [",".join(HEADER)]), r"header only")


@bad
def csv_no_label_column(d, s):
    lines = csv_lines(s.x_train, s.y_train, header=["class"] + HEADER[1:])
    return (*_csv(d, s, "train", lines), r"no 'label' column")


@bad
def csv_no_header(d, s):
    return (*_csv(d, s, "train", csv_lines(s.x_train, s.y_train)[1:]), r"no 'label' column")


@bad
def csv_short_row(d, s):
    lines = csv_lines(s.x_train, s.y_train)
    lines[3] = ",".join(lines[3].split(",")[:-10])
    return (*_csv(d, s, "train", lines), r"line 4: short row \(775 of 785 fields\)")


@bad
def csv_long_first_row(d, s):
    lines = csv_lines(s.x_train, s.y_train)
    lines[1] += ",0"
    return (*_csv(d, s, "train", lines), r"line 2: more fields than the 785 header columns")


@bad
def csv_long_later_row(d, s):
    lines = csv_lines(s.x_test, s.y_test)
    lines[4] += ",0"
    return (*_csv(d, s, "test", lines), r"Expected 785 fields in line 5, saw 786")


@bad
def csv_wrong_pixel_count(d, s):
    lines = [",".join(line.split(",")[:-1]) for line in csv_lines(s.x_train, s.y_train)]
    return (*_csv(d, s, "train", lines), r"783 pixel columns, expected 784")


@bad
def csv_non_numeric_pixel(d, s):
    return (
        *_csv(d, s, "train", _edit_field(s, 5, 100, "abc")),
        r"line 7 column 'pixel100': non-numeric value 'abc'",
    )


@bad
def csv_na_pixel(d, s):
    return (
        *_csv(d, s, "train", _edit_field(s, 2, 9, "NA")),
        r"line 4 column 'pixel9': non-numeric value 'NA'",
    )


@bad
def csv_empty_pixel(d, s):
    return (
        *_csv(d, s, "test", _edit_field(s, 4, 300, "", split="test")),
        r"line 6 column 'pixel300': empty value",
    )


@bad
def csv_pixel_above_255(d, s):
    return (
        *_csv(d, s, "train", _edit_field(s, 0, 1, "256")),
        r"pixel values range 0\.\.256, expected 0\.\.255",
    )


@bad
def csv_pixel_negative(d, s):
    return (*_csv(d, s, "test", _edit_field(s, 1, 2, "-1", split="test")), r"pixel values range -1\.\.255")


@bad
def csv_pixel_not_integer(d, s):
    return (*_csv(d, s, "train", _edit_field(s, 0, 50, "12.5")), r"pixel values are not integers")


@bad
def csv_pixel_huge(d, s):
    return (*_csv(d, s, "train", _edit_field(s, 0, 50, "9" * 25)), r"pixel values range .*expected 0\.\.255")


@bad
def csv_negative_label(d, s):
    return (*_csv(d, s, "train", _edit_field(s, 3, 0, "-1")), r"negative label -1")


@bad
def csv_non_integer_label(d, s):
    return (*_csv(d, s, "train", _edit_field(s, 3, 0, "1.5")), r"label 1\.5 is not an integer")


@bad
def csv_empty_label(d, s):
    return (*_csv(d, s, "train", _edit_field(s, 3, 0, "")), r"line 5 column 'label': empty value")


@bad
def csv_label_too_large(d, s):
    # 2**32 used to wrap around to class 0 in the int32 cast.
    return (
        *_csv(d, s, "test", _edit_field(s, 0, 0, str(2**32), split="test")),
        r"label 4294967296 is too large",
    )


@bad
def csv_train_test_columns_differ(d, s):
    lines = csv_lines(s.x_test, s.y_test, header=["label"] + [f"px{i}" for i in range(1, 785)])
    return (
        *_csv(d, s, "test", lines),
        r"columns differ from train\.csv: column 2 is 'px1' here, 'pixel1' there",
    )


@bad
def csv_binary_garbage(d, s):
    train, _ = write_csv(d, s)
    train.write_bytes(np.random.default_rng(4).integers(0, 256, 20000, dtype=np.uint8).tobytes())
    return d, train, r"not a text CSV file \(binary content\)"


@bad
def csv_single_class(d, s):
    lines = csv_lines(s.x_train, np.full(20, 7))
    return (*_csv(d, s, "train", lines), r"a single class \(7\)")


@bad
def csv_test_label_out_of_range(d, s):
    return (*_csv(d, s, "test", _edit_field(s, 0, 0, "12", split="test")), r"label 12 out of range")


@bad
def csv_classes_missing(d, s):
    lines = csv_lines(s.x_train, np.where(s.y_train == 0, 10, s.y_train))
    return (*_csv(d, s, "train", lines), r"classes \[0\] never occur \(max label 10\)")


@bad
def csv_only_train_file(d, s):
    _, test = write_csv(d, s)
    test.unlink()
    return d, d, r"expected exactly one \*train\*\.csv and one \*test\*\.csv, found 1 and 0"


@bad
def csv_two_train_files(d, s):
    train, _ = write_csv(d, s)
    shutil.copy(train, d / "train_old.csv")
    return d, d, r"found 2 and 1"


@bad
def csv_folder_named_like_a_csv(d, s):
    train, _ = write_csv(d, s)
    train.unlink()
    train.mkdir()
    return d, d, r"found 0 and 1"


def _npz(d, s, **changes):
    return d / "data.npz", write_npz(d / "data.npz", s, **changes)


@bad
def npz_empty_file(d, s):
    d.mkdir()
    (d / "data.npz").write_bytes(b"")
    return d / "data.npz", d / "data.npz", r"not a valid \.npz file"


@bad
def npz_binary_garbage(d, s):
    d.mkdir()
    (d / "data.npz").write_bytes(np.random.default_rng(5).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    return d / "data.npz", d / "data.npz", r"not a valid \.npz file"


@bad
def npz_truncated(d, s):
    path = write_npz(d / "data.npz", s)
    path.write_bytes(path.read_bytes()[:5000])
    return path, path, r"not a valid \.npz file|unreadable array"


@bad
def npz_missing_array(d, s):
    return (*_npz(d, s, y_test=None), r"missing arrays \['y_test'\]")


@bad
def npz_object_array(d, s):
    labels = np.array([int(v) for v in s.y_train], dtype=object)
    return (*_npz(d, s, y_train=labels), r"unreadable array")


@bad
def npz_images_not_28x28(d, s):
    return (*_npz(d, s, x_train=np.zeros((20, 32, 32), np.uint8)), r"images have shape \(20, 32, 32\)")


@bad
def npz_rgb_images(d, s):
    return (*_npz(d, s, x_test=np.zeros((10, 28, 28, 3), np.uint8)), r"images have shape \(10, 28, 28, 3\)")


@bad
def npz_count_mismatch(d, s):
    return (*_npz(d, s, y_test=s.y_test[:9]), r"9 labels for 10 images")


@bad
def npz_zero_images(d, s):
    return (*_npz(d, s, x_test=s.x_test[:0], y_test=s.y_test[:0]), r"zero images")


@bad
def npz_pixel_out_of_range(d, s):
    x = s.x_train.astype(np.int16)
    x[0, 0, 0] = 300
    return (*_npz(d, s, x_train=x), r"pixel values range 0\.\.300")


@bad
def npz_pixel_not_integer(d, s):
    return (*_npz(d, s, x_train=s.x_train / 255.0), r"pixel values are not integers")


@bad
def npz_pixel_nan(d, s):
    x = s.x_test.astype(np.float32)
    x[2, 5, 5] = np.nan
    return (*_npz(d, s, x_test=x), r"NaN or infinite")


@bad
def npz_string_labels(d, s):
    return (*_npz(d, s, y_train=s.y_train.astype(str)), r"labels have dtype <U\d+, expected integers")


@bad
def npz_labels_not_a_vector(d, s):
    return (*_npz(d, s, y_train=np.zeros((20, 2), np.int64)), r"labels have shape \(20, 2\)")


@bad
def npz_negative_label(d, s):
    return (*_npz(d, s, y_test=s.y_test - 1), r"negative label -1")


@bad
def npz_non_integer_label(d, s):
    return (*_npz(d, s, y_train=s.y_train + 0.5), r"label 0\.5 is not an integer")


@bad
def npz_single_class(d, s):
    return (*_npz(d, s, y_train=np.ones(20, np.int64)), r"a single class \(1\)")


@bad
def npz_test_label_out_of_range(d, s):
    return (*_npz(d, s, y_test=s.y_test + 1), r"label 10 out of range")


@bad
def npz_classes_missing(d, s):
    return (*_npz(d, s, y_train=s.y_train * 2), r"classes \[1, 3, 5, 7, 9, 11, 13, 15, 17\] never occur")


@bad
def npz_label_too_large_for_int32(d, s):
    y = s.y_train.astype(np.int64)
    y[0] = 2**32  # used to wrap around silently to class 0
    return (*_npz(d, s, y_train=y), r"label 4294967296 is too large")


@bad
def npz_huge_max_label(d, s):
    y = s.y_train.astype(np.int64)
    y[0] = 2**31 - 1  # used to build a set of 2**31 ints (minutes, gigabytes)
    return (
        *_npz(d, s, y_train=y),
        r"classes \[10, 11, 12, 13, 14, 15, 16, 17, 18, 19\] never occur \(max label 2147483647\)",
    )


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(BAD))
def test_cli_refuses_bad_input(case, tmp_path, small):
    """`search.py data --data BAD`: exit 2, one line naming the file and the fault, nothing written."""
    arg, fault_file, fault = BAD[case](tmp_path / "data", small)
    before = snapshot(tmp_path)
    top_before = sorted(os.listdir(ROOT))
    results_before = snapshot(ROOT / "results", contents=False)
    result = run_cli("data", "--data", str(arg), timeout=60)
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].strip(), result.stderr
    line = lines[0]
    assert line.startswith(f"error: {fault_file}: "), line
    assert re.search(fault, line[len(f"error: {fault_file}: ") :]), line
    assert result.stdout == ""
    assert snapshot(tmp_path) == before
    assert snapshot(ROOT / "results", contents=False) == results_before
    assert sorted(os.listdir(ROOT)) == top_before


def test_bad_inputs_raise_data_error_in_process(tmp_path, small):
    """The same faults through the API: a `DataError` with `.path` and `.fault` (a sample)."""
    for case in ("idx_truncated_gzip", "csv_short_row", "npz_count_mismatch", "idx_classes_missing"):
        arg, fault_file, fault = BAD[case](tmp_path / case, small)
        with pytest.raises(DataError) as info:
            load_dataset(arg)
        assert info.value.path == str(fault_file)
        assert re.search(fault, info.value.fault), info.value.fault
        assert str(info.value) == f"{fault_file}: {info.value.fault}"


# ---------------------------------------------------------------- the tf.data pipeline


@pytest.fixture(scope="module")
def tf():
    import tensorflow

    return tensorflow


@pytest.fixture(scope="module")
def backbones():
    from hypermodel.backbones import REGISTRY

    return REGISTRY


def collect(ds):
    xs, ys = [], []
    for batch in ds:
        x, y = batch
        xs.append(x.numpy())
        ys.append(y.numpy())
    return np.concatenate(xs), np.concatenate(ys)


def test_make_dataset_mobilenet_v2_scales_to_minus_one_one(tf, backbones, small):
    from data_pipeline.pipeline import make_dataset

    ds = make_dataset(
        small.x_train, small.y_train, 32, backbones["mobilenet_v2_0.5"].preprocess_input, batch_size=8
    )
    x, y = collect(ds)
    assert x.shape == (20, 32, 32, 3) and x.dtype == np.float32
    np.testing.assert_array_equal(y, small.y_train)  # no shuffle without a seed
    assert x.min() == -1.0 and x.max() <= 1.0 and x.max() > 0.9
    np.testing.assert_allclose(x, resized_rgb(small.x_train, 32) / 127.5 - 1.0, atol=1e-5)


def test_make_dataset_resnet50_is_caffe_bgr_mean_subtracted(tf, backbones, small):
    from data_pipeline.pipeline import make_dataset

    ds = make_dataset(small.x_test, small.y_test, 32, backbones["resnet50"].preprocess_input, batch_size=4)
    x, _ = collect(ds)
    assert x.shape == (10, 32, 32, 3) and x.dtype == np.float32
    ref = resized_rgb(small.x_test, 32)[..., 0]
    mean_bgr = (103.939, 116.779, 123.68)
    for c in range(3):
        np.testing.assert_allclose(x[..., c], ref - mean_bgr[c], atol=1e-3)
    # Gray in, so the channels differ only by the per-channel mean (B first, R last).
    np.testing.assert_allclose(x[..., 2] - x[..., 0], 103.939 - 123.68, atol=1e-3)
    assert x[..., 0].min() == pytest.approx(-103.939, abs=1e-3)


def test_make_dataset_efficientnet_keeps_0_255(tf, backbones, small):
    from data_pipeline.pipeline import make_dataset

    ds = make_dataset(
        small.x_train, small.y_train, 32, backbones["efficientnet_b0"].preprocess_input, batch_size=64
    )
    x, _ = collect(ds)
    assert x.shape == (20, 32, 32, 3) and x.dtype == np.float32
    assert x.min() == 0.0 and 200 < x.max() <= 255.0
    np.testing.assert_allclose(x, resized_rgb(small.x_train, 32), atol=1e-4)


@pytest.mark.parametrize("resolution", [32, 96, 299])
def test_make_dataset_resolution(tf, backbones, small, resolution):
    from data_pipeline.pipeline import make_dataset

    ds = make_dataset(
        small.x_test[:4],
        small.y_test[:4],
        resolution,
        backbones["efficientnet_b0"].preprocess_input,
        batch_size=4,
    )
    batches = list(ds)
    assert len(batches) == 1
    x, y = batches[0]
    assert tuple(x.shape) == (4, resolution, resolution, 3) and x.dtype == tf.float32
    x = x.numpy()
    # Bilinear upsampling keeps the image: same mean intensity per image, gray channels.
    np.testing.assert_allclose(x.mean(axis=(1, 2, 3)), small.x_test[:4].mean(axis=(1, 2)), rtol=0.05)
    np.testing.assert_array_equal(x[..., 0], x[..., 2])
    np.testing.assert_array_equal(y.numpy(), small.y_test[:4])


def test_make_dataset_unlabeled(backbones, small):
    from data_pipeline.pipeline import make_dataset

    ds = make_dataset(small.x_test, None, 32, backbones["efficientnet_b0"].preprocess_input, batch_size=6)
    shapes = [tuple(batch.shape) for batch in ds]
    assert shapes == [(6, 32, 32, 3), (4, 32, 32, 3)]


@pytest.mark.parametrize("kwargs", [{"resolution": 32, "augmentation": "mixup"}])
def test_make_dataset_rejects_bad_settings(backbones, small, kwargs):
    from data_pipeline.pipeline import make_dataset

    with pytest.raises(UsageError):
        make_dataset(
            small.x_test,
            small.y_test,
            preprocess_input=backbones["efficientnet_b0"].preprocess_input,
            **kwargs,
        )


def test_augmentation_only_when_shuffling(tf, backbones, small):
    from data_pipeline.pipeline import make_dataset

    preprocess = backbones["efficientnet_b0"].preprocess_input
    ids = np.arange(len(small.x_train))  # labels as image ids, to follow the shuffle
    reference = resized_rgb(small.x_train, 32)

    # No shuffle seed (evaluation): augmentation is ignored, order kept.
    x, y = collect(
        make_dataset(small.x_train, ids, 32, preprocess, batch_size=8, augmentation="flip_shift_erase")
    )
    np.testing.assert_array_equal(y, ids)
    np.testing.assert_allclose(x, reference, atol=1e-4)

    # Shuffle seed, no augmentation: a new order, identical images.
    x, y = collect(make_dataset(small.x_train, ids, 32, preprocess, batch_size=8, shuffle_seed=1))
    assert sorted(y.tolist()) == ids.tolist() and y.tolist() != ids.tolist()
    np.testing.assert_allclose(x, reference[y], atol=1e-4)

    # Shuffle seed and augmentation: the images change (flip/shift), values stay in range.
    x, y = collect(
        make_dataset(
            small.x_train, ids, 32, preprocess, batch_size=8, shuffle_seed=1, augmentation="flip_shift"
        )
    )
    assert sorted(y.tolist()) == ids.tolist()
    changed = [not np.allclose(x[i], reference[y[i]], atol=1e-4) for i in range(len(y))]
    assert sum(changed) >= len(y) // 2, changed
    assert x.min() >= 0.0 and x.max() <= 255.0


# ---------------------------------------------------------------- the split


def test_split_is_stratified_and_covers_train(fashion):
    from data_pipeline.splits import split_train_validation

    # Six classes of 10, 24, 37, 6, 14 and 3 images, shuffled: a tenth of each, rounded
    # to the nearest image, is 1, 2, 4, 1, 1 and 0, but no class is left out of validation.
    labels = np.random.default_rng(0).permutation(np.repeat(np.arange(6), [10, 24, 37, 6, 14, 3]))
    train, val = split_train_validation(labels, fraction=0.1, seed=0)
    assert np.bincount(labels[val], minlength=6).tolist() == [1, 2, 4, 1, 1, 1]
    assert np.bincount(labels[train], minlength=6).tolist() == [9, 22, 33, 5, 13, 2]
    assert len(np.intersect1d(train, val)) == 0
    np.testing.assert_array_equal(np.union1d(train, val), np.arange(len(labels)))
    assert np.all(np.diff(train) > 0) and np.all(np.diff(val) > 0)
    # On real labels, each class's validation share is its tenth, to the nearest image.
    labels = fashion.y_train[:3000]
    train, val = split_train_validation(labels, fraction=0.1, seed=0)
    per_class = np.bincount(labels, minlength=10)
    assert np.all(np.abs(np.bincount(labels[val], minlength=10) - 0.1 * per_class) <= 0.5)
    np.testing.assert_array_equal(np.union1d(train, val), np.arange(3000))


def test_split_is_deterministic_per_seed(fashion):
    from data_pipeline.splits import split_train_validation

    labels = fashion.y_train[:3000]
    a_train, a_val = split_train_validation(labels, 0.2, seed=7)
    b_train, b_val = split_train_validation(labels, 0.2, seed=7)
    _, c_val = split_train_validation(labels, 0.2, seed=8)
    np.testing.assert_array_equal(a_train, b_train)
    np.testing.assert_array_equal(a_val, b_val)
    assert len(c_val) == len(a_val) and not np.array_equal(c_val, a_val)
    assert np.bincount(labels[c_val]).tolist() == np.bincount(labels[a_val]).tolist()


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_split_rejects_bad_fraction(fraction):
    from data_pipeline.splits import split_train_validation

    with pytest.raises(UsageError):
        split_train_validation(np.array([0, 1, 0, 1]), fraction)


@pytest.mark.parametrize("subsets", [(None, None), (500, 100)])
def test_training_data_never_includes_test_images(tmp_path, fashion, subsets):
    from data_pipeline.splits import training_data

    x_train, y_train = fashion.x_train[:2000], fashion.y_train[:2000]
    x_test, y_test = fashion.x_test[:1000], fashion.y_test[:1000]
    train_bytes = {img.tobytes(): i for i, img in enumerate(x_train)}
    test_bytes = {img.tobytes() for img in x_test}
    assert len(train_bytes) == 2000 and not test_bytes & set(train_bytes)  # precondition: all distinct
    dataset = Dataset(
        x_train, y_train, x_test, y_test, FASHION_MNIST_CLASSES, "npz", "slice", "0" * 64, "computed"
    )
    data = training_data(dataset, train_subset=subsets[0], val_subset=subsets[1])

    assert not any(f.name.startswith(("x_test", "y_test")) for f in dataclasses.fields(data))
    train_idx = [train_bytes[img.tobytes()] for img in data.x_train]  # KeyError = not a train image
    val_idx = [train_bytes[img.tobytes()] for img in data.x_val]
    assert not {img.tobytes() for img in data.x_train} & test_bytes
    assert not {img.tobytes() for img in data.x_val} & test_bytes
    assert not set(train_idx) & set(val_idx)
    np.testing.assert_array_equal(data.y_train, y_train[train_idx])
    np.testing.assert_array_equal(data.y_val, y_train[val_idx])
    if subsets == (None, None):
        assert sorted(train_idx + val_idx) == list(range(2000))
        # The default validation fraction: a tenth of each class, to the nearest image.
        per_class = np.bincount(y_train, minlength=10)
        assert np.all(np.abs(np.bincount(data.y_val, minlength=10) - 0.1 * per_class) <= 0.5)
    else:
        # Rounded per class, so within one image per class of the requested size.
        assert abs(len(train_idx) - 500) <= 10 and abs(len(val_idx) - 100) <= 10
        assert np.bincount(data.y_train, minlength=10).min() >= 40  # stratified subset
    assert not (tmp_path / "run").exists()
