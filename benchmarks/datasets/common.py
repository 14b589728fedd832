"""What every suite dataset shares: its cache, its packages, its licence, its split and its figures.

A dataset is built once into `<cache>/<name>/{train,test}/<class>/<image>` (the layout
`search.py --data` uses as given) with `dataset.json` beside them: source, packages,
licence, and the figures of the README table. The cache is `$SUITE_CACHE`, else
`~/.cache/transfer-tuner/suite`. A tree without `dataset.json` (an interrupted build)
is rebuilt.
"""

import hashlib
import json
import os
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif")


class DatasetUnavailable(RuntimeError):
    """A dataset's source cannot be obtained on this machine (the message says why and what to run)."""


def cache_root():
    return Path(os.environ.get("SUITE_CACHE", Path.home() / ".cache" / "transfer-tuner" / "suite"))


def installed(package):
    """Whether a Debian package is installed (dpkg's own word)."""
    result = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True)
    return result.returncode == 0 and result.stdout.endswith("installed")


def ensure_debian_packages(packages):
    """Installs the Debian packages that are missing, with apt-get (root, package registry only).

    Raises:
        DatasetUnavailable: apt-get is absent or failed; names the packages and the command.
    """
    missing = [p for p in packages if not installed(p)]
    if not missing:
        return
    command = ["apt-get", "install", "-y", "--no-install-recommends", *missing]
    if shutil.which("apt-get") is None:
        raise DatasetUnavailable(f"needs the Debian packages {' '.join(missing)}, and apt-get is not here")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        last = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise DatasetUnavailable(f"`{' '.join(command)}` failed ({last[0]}); "
                                 "run `apt-get update` first, as root")


def debian_licences(packages):
    """{package: "licence names"} from the packages' /usr/share/doc/<pkg>/copyright (DEP-5 `License:` lines)."""
    licences = {}
    for package in packages:
        path = Path("/usr/share/doc") / package / "copyright"
        if not path.exists():
            licences[package] = "unknown (no /usr/share/doc/%s/copyright)" % package
            continue
        names = []
        for line in path.read_text(errors="replace").splitlines():
            match = re.match(r"License:\s*(\S.*)", line)
            if match and match.group(1).strip() not in names:
                names.append(match.group(1).strip())
        licences[package] = ", ".join(names) or "see /usr/share/doc/%s/copyright" % package
    return licences


def identity_rank(identity, seed="suite"):
    """A fixed pseudo-random rank for a source identity (the same on every machine and Python)."""
    return hashlib.sha1(f"{seed}:{identity}".encode()).hexdigest()


def split_identities(identities_by_class, test_fraction):
    """Chooses the test identities: per class, the `test_fraction` of them ranked first by identity_rank.

    Each class with at least 2 identities keeps at least one in each split.

    Args:
        identities_by_class: {class: iterable of identities}; an identity belongs to one class.
        test_fraction: float in (0, 1).

    Returns:
        The set of test identities.
    """
    test = set()
    for identities in identities_by_class.values():
        ranked = sorted(set(identities), key=identity_rank)
        if len(ranked) < 2:
            continue
        count = min(len(ranked) - 1, max(1, round(test_fraction * len(ranked))))
        test.update(ranked[:count])
    return test


def safe_name(text):
    """A file or folder name made of [A-Za-z0-9._-] only."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "x"


def tree_figures(root):
    """The README table's figures for a built tree: images, classes, sizes, imbalance, smallest class."""
    counts, splits, sides, modes = Counter(), Counter(), [], Counter()
    for split in ("train", "test"):
        for path in sorted((root / split).glob("*/*")):
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            counts[path.parent.name] += 1
            splits[split] += 1
            with Image.open(path) as image:
                sides.append(min(image.size))
                sides.append(max(image.size))
                modes[image.mode] += 1
    sides.sort()
    smallest = min(counts.values())
    return {
        "images": sum(counts.values()), "train": splits["train"], "test": splits["test"],
        "classes": len(counts),
        "side_min": sides[0], "side_median": sides[len(sides) // 2], "side_max": sides[-1],
        "modes": dict(modes),
        "largest_class": max(counts.values()), "smallest_class": smallest,
        "imbalance": round(max(counts.values()) / smallest, 1),
        "per_class": dict(sorted(counts.items())),
    }


def build_cached(dataset, rebuild=False):
    """The built tree of `dataset` (a module with NAME, SOURCE, PACKAGES, COVERS and build(root)).

    Returns:
        (root, metadata dict as stored in dataset.json).
    """
    root = cache_root() / dataset.NAME
    meta_path = root / "dataset.json"
    if meta_path.exists() and not rebuild:
        return root, json.loads(meta_path.read_text())
    ensure_debian_packages(dataset.PACKAGES)
    if root.exists():
        shutil.rmtree(root)
    partial = root.with_name(root.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    notes = dataset.build(partial)
    meta = {
        "name": dataset.NAME, "source": dataset.SOURCE, "covers": dataset.COVERS,
        "packages": list(dataset.PACKAGES), "split": dataset.SPLIT,
        "licence": dataset.licence() if hasattr(dataset, "licence") else debian_licences(dataset.PACKAGES),
        **tree_figures(partial), **(notes or {}),
    }
    (partial / "dataset.json").write_text(json.dumps(meta, indent=1) + "\n")
    partial.rename(root)
    return root, meta
