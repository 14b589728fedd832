"""Image-file datasets: a class-per-folder tree or a CSV manifest → a validated `ImageFiles`.

Layouts (the Keras convention, `keras.utils.image_dataset_from_directory`):
- `DATA/<class>/<image>`: the tool holds out stratified validation and test splits;
- `DATA/train/<class>/…` + `DATA/test/<class>/…` (+ optional `DATA/val/<class>/…`):
  the given splits are used as given;
- a CSV manifest with `path,label` columns (and an optional `split` column of
  train/val/test); paths are relative to the CSV's folder, or absolute.
Class names are the folder names (or labels), sorted. Hidden files and files without an
image extension are ignored and counted. Every image file is checked before any work:
it must open as PNG/JPEG/BMP/GIF, stay under `MAX_PIXELS`, pass Pillow's integrity
check, and a JPEG must not be truncated. A bad file is a `DataError` naming it, or, with
`skip_bad=True`, is left out and listed.
"""

import collections
import dataclasses
import hashlib
import os
import warnings
from pathlib import Path

import numpy as np

from common.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif")
FORMATS = ("PNG", "JPEG", "BMP", "GIF")
SPLITS = ("train", "val", "test")
MAX_PIXELS = 50_000_000  # larger headers are refused: a decompression bomb, or no photo we can use
TEST_FRACTION = 0.2  # held out as the test split when the layout gives none
SPLIT_SEED = 0  # the held-out test split never changes with --seed


@dataclasses.dataclass(frozen=True)
class ImageFile:
    """One checked image file.

    Attributes:
        path: Its absolute path.
        name: As written in splits.csv: relative to the data folder (or absolute).
        label: Class index.
        split: "train", "val" or "test".
        width, height, mode: From its header (Pillow's mode: "RGB", "L", "P", "RGBA", …).
    """

    path: Path
    name: str
    label: int
    split: str
    width: int
    height: int
    mode: str


@dataclasses.dataclass(frozen=True, eq=False)
class ImageFiles:
    """A validated image-file dataset (pixels not decoded yet: see data_pipeline/store.py).

    Attributes:
        root: The data folder (or the manifest's folder).
        source: "folders" or "manifest".
        class_names: Sorted class names; label i is class_names[i].
        files: Every usable `ImageFile`, with its split.
        ignored: Paths skipped as hidden or not images.
        bad: (path, fault) of bad images left out by `skip_bad`.
        checksum: sha256 over every file's name, label, split and content.
    """

    root: Path
    source: str
    class_names: tuple
    files: tuple
    ignored: tuple
    bad: tuple
    checksum: str

    @property
    def num_classes(self):
        return len(self.class_names)

    def split(self, name):
        return [f for f in self.files if f.split == name]

    def summary(self):
        """Counts per split and class, size range and modes, ignored files (JSON-friendly)."""
        widths = np.array([f.width for f in self.files])
        heights = np.array([f.height for f in self.files])
        per_split = {
            split: np.bincount([f.label for f in self.split(split)], minlength=self.num_classes).tolist()
            for split in SPLITS if self.split(split)
        }
        return {
            "source": self.source,
            "path": str(self.root),
            "images": len(self.files),
            "per_split": per_split,
            "class_names": list(self.class_names),
            "num_classes": self.num_classes,
            "width": [int(widths.min()), int(np.median(widths)), int(widths.max())],
            "height": [int(heights.min()), int(np.median(heights)), int(heights.max())],
            "modes": dict(sorted(collections.Counter(f.mode for f in self.files).items())),
            "ignored": len(self.ignored),
            "bad": [[str(p), fault] for p, fault in self.bad],
            "checksum": self.checksum,
        }


def is_image_dataset(path):
    """True when `path` is a folder of class folders (or train/ + test/), or a CSV manifest."""
    path = Path(path)
    if path.is_file():
        return path.suffix.lower() == ".csv" and "path" in _header(path)
    return path.is_dir() and any(p.is_dir() and not p.name.startswith(".") for p in path.iterdir())


def scan(path, skip_bad=False):
    """Finds, labels and checks every image of the dataset at `path`.

    Args:
        path: A data folder or a CSV manifest.
        skip_bad: Leave bad images out (listed in `ImageFiles.bad`) instead of refusing.

    Returns:
        An `ImageFiles`.
    """
    path = Path(path)
    if path.is_file():
        root, source, entries, ignored = path.parent, "manifest", _read_manifest(path), []
    elif all((path / s).is_dir() for s in ("train", "test")):
        root, source = path, "folders"
        entries, ignored = [], []
        classes = {}
        for split in [s for s in SPLITS if (path / s).is_dir()]:
            found, skipped = _class_folders(path / split)
            classes[split] = sorted(found)
            entries += [(file, name, split) for name, files in found.items() for file in files]
            ignored += skipped
        for split, names in classes.items():
            if names != classes["train"]:
                raise DataError(path / split, f"class folders {names} differ from train/'s {classes['train']}")
    else:
        root, source = path, "folders"
        found, ignored = _class_folders(path)
        entries = [(file, name, None) for name, files in found.items() for file in files]
    class_names = tuple(sorted({name for _, name, _ in entries}))
    if len(class_names) < 2:
        raise DataError(path, f"{len(class_names)} class{'es' if len(class_names) != 1 else ''} "
                              f"({', '.join(class_names) or 'none'}): a classifier needs at least two")
    index = {name: i for i, name in enumerate(class_names)}
    files, bad = [], []
    for file, name, split in entries:
        try:
            width, height, mode = check_image(file)
        except DataError as e:
            if not skip_bad:
                raise
            bad.append((file, e.fault))
            continue
        files.append(ImageFile(file, _display_name(file, root), index[name], split, width, height, mode))
    files = _assign_splits(files, len(class_names))
    for split in ("train", "test"):
        missing = [class_names[k] for k in range(len(class_names)) if not any(
            f.label == k for f in files if f.split == split)]
        if missing:
            raise DataError(path, f"no {split} images of class {', '.join(missing)}")
    checksum = _checksum(files)
    return ImageFiles(root, source, class_names, tuple(files), tuple(ignored), tuple(bad), checksum)


def check_image(path):
    """Opens and verifies one image file; returns (width, height, Pillow mode)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if path.stat().st_size == 0:
        raise DataError(path, "file is empty")
    kind = path.suffix.lstrip(".").upper()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height, mode, kind = image.width, image.height, image.mode, image.format
                if width * height > MAX_PIXELS:
                    raise DataError(path, f"{width}×{height} pixels: over the {MAX_PIXELS:,} limit "
                                          "(a decompression bomb?); shrink it or remove it")
                if kind not in FORMATS:
                    raise DataError(path, f"{kind} image: use PNG, JPEG, BMP or GIF")
                image.verify()  # PNG chunk CRCs, structure
            if kind == "JPEG":
                with Image.open(path) as image:
                    image.draft("RGB", (max(1, width // 8), max(1, height // 8)))  # fast, still reads it all
                    image.load()
    except DataError:
        raise
    except UnidentifiedImageError:
        raise DataError(path, "not an image Pillow can read (wrong extension, or corrupt header)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DataError(path, f"decompression bomb ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(path, f"corrupt {kind} image ({e})") from None
    return width, height, mode


def _class_folders(folder):
    """{class name: [image paths]} of `folder`'s class folders, and the ignored paths."""
    classes, ignored = {}, []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            ignored.append(entry)
        elif entry.is_dir():
            images = []
            for dirpath, dirnames, filenames in os.walk(entry):
                ignored += [Path(dirpath, d) for d in dirnames if d.startswith(".")]
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for name in sorted(filenames):
                    file = Path(dirpath, name)
                    if name.startswith(".") or file.suffix.lower() not in IMAGE_SUFFIXES:
                        ignored.append(file)
                    else:
                        images.append(file)
            if not images:
                raise DataError(entry, "class folder has no images (PNG, JPEG, BMP or GIF)")
            classes[entry.name] = images
        elif entry.suffix.lower() in IMAGE_SUFFIXES:
            raise DataError(entry, f"image outside any class folder: put each image in {folder}/<class>/")
        else:
            ignored.append(entry)
    return classes, ignored


def _header(path):
    """The lower-cased column names of a CSV's first line (empty if it is not text)."""
    try:
        with open(path, encoding="utf-8") as f:
            return [c.strip().strip('"').lower() for c in f.readline().split(",")]
    except (OSError, UnicodeDecodeError):
        return []


def _read_manifest(path):
    """[(file, label, split or None)] from a `path,label[,split]` CSV."""
    import pandas as pd

    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as e:
        raise DataError(path, f"not a valid CSV manifest ({str(e).splitlines()[0]})") from None
    frame.columns = [str(c).strip().lower() for c in frame.columns]
    if not {"path", "label"} <= set(frame.columns):
        found = ", ".join(frame.columns[:5]) + (", …" if len(frame.columns) > 5 else "")
        raise DataError(path, f"a manifest needs `path` and `label` columns, found {found}")
    if frame.empty:
        raise DataError(path, "header only, no rows")
    entries = []
    for row, (file, label, split) in enumerate(zip(frame["path"], frame["label"],
                                                   frame.get("split", [""] * len(frame))), start=2):
        file, label, split = file.strip(), label.strip(), split.strip().lower()
        if not label:
            raise DataError(path, f"line {row}: empty label")
        if not file:
            raise DataError(path, f"line {row}: empty path")
        if split and split not in SPLITS:
            raise DataError(path, f"line {row}: split {split!r} is not one of {', '.join(SPLITS)}")
        resolved = Path(file) if Path(file).is_absolute() else path.parent / file
        if not resolved.is_file():
            raise DataError(path, f"line {row}: {file}: file not found")
        entries.append((resolved, label, split or None))
    given = {split for _, _, split in entries}
    if given != {None} and None in given:
        raise DataError(path, "some rows have a split and some do not: give every row one, or none")
    if given != {None} and not {"train", "test"} <= given:
        raise DataError(path, "the split column needs both train and test rows")
    return entries


def _assign_splits(files, num_classes):
    """Holds out a stratified test split (and leaves validation to the search) when none is given."""
    if not files or files[0].split is not None:
        return files
    labels = np.array([f.label for f in files])
    rng = np.random.default_rng(SPLIT_SEED)
    test = set()
    for k in range(num_classes):
        members = np.flatnonzero(labels == k)
        if len(members) < 3:
            raise DataError(files[members[0]].path.parent if len(members) else Path("."),
                            f"only {len(members)} images: each class needs at least 3 (train, validation, test)")
        take = max(1, int(round(TEST_FRACTION * len(members))))
        test.update(rng.permutation(members)[:take].tolist())
    return [dataclasses.replace(f, split="test" if i in test else "train") for i, f in enumerate(files)]


def _display_name(file, root):
    try:
        return file.relative_to(root).as_posix()
    except ValueError:
        return str(file)


def _checksum(files):
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}\0{f.label}\0{f.split}\0".encode())
        with open(f.path, "rb") as stream:
            h.update(hashlib.file_digest(stream, "sha256").digest())
    return h.hexdigest()
