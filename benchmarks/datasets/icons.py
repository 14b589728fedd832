"""Desktop icons (RGBA PNG with transparency) from Debian icon themes, classed by their context folder.

Two datasets: `icons` (each icon at 32, 48 and 128 px where the theme has them) and
`icons16` (the 16 px renderings only: tiny clipart with transparency).

Themes gnome, oxygen and Tango lay icons out as `<theme>/[base/]<size>x<size>/<context>/<name>.png`;
the context (actions, apps, devices, mimetypes, places, status, …) is the class. Aliases
(symlinks) and byte-identical files are dropped. Per icon and theme, the sizes in SIZES
that exist are kept. The split is by icon
name across all themes, so neither another size nor another theme's drawing of a test
icon is in train. Contexts with fewer than MIN_NAMES icon names are left out (a class
needs names in both splits).
"""

import hashlib
import re
import shutil
from collections import defaultdict
from pathlib import Path

from benchmarks.datasets.common import debian_licences, safe_name, split_identities

THEMES = {"gnome": "gnome-icon-theme", "oxygen": "oxygen-icon-theme", "Tango": "tango-icon-theme"}
PACKAGES = tuple(THEMES.values())
SOURCE = "Debian icon themes: " + ", ".join(PACKAGES) + " (PNG files, /usr/share/icons)"
SPLIT = "by icon name (all sizes and themes of a name together): 25 % of names per class (sha1-ranked) test"
MIN_NAMES = 6
PATTERN = re.compile(r"/(\d+)x\1/([a-z-]+)/([^/]+)\.png$")


def icon_files(sizes):
    """[(theme, size, context, name, path)] of the real (non-alias) PNG files at `sizes`."""
    found = []
    for theme in THEMES:
        for path in sorted(Path("/usr/share/icons", theme).rglob("*.png")):
            match = PATTERN.search(str(path))
            if path.is_symlink() or not match or int(match.group(1)) not in sizes:
                continue
            found.append((theme, int(match.group(1)), match.group(2), match.group(3), path))
    return found


def build(root, sizes):
    files = icon_files(sizes)
    context_of, seen, kept = {}, set(), []
    for theme, size, context, name, path in files:
        digest = hashlib.sha1(path.read_bytes()).hexdigest()
        if digest in seen or context_of.setdefault(name, context) != context:
            continue  # a duplicate file, or a name filed under two contexts: neither split may own it twice
        seen.add(digest)
        kept.append((theme, size, context, name, path))
    names_by_context = defaultdict(set)
    for _, _, context, name, _ in kept:
        names_by_context[context].add(name)
    names_by_context = {c: n for c, n in names_by_context.items() if len(n) >= MIN_NAMES}
    test_names = split_identities(names_by_context, 0.25)
    for theme, size, context, name, path in kept:
        if context not in names_by_context:
            continue
        split = "test" if name in test_names else "train"
        folder = root / split / context
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, folder / f"{safe_name(name)}__{safe_name(theme)}_{size}.png")
    return {"icon_names": sum(len(n) for n in names_by_context.values()), "test_names": len(test_names)}


class IconSet:
    """The icons at some sizes (see the module docstring)."""

    PACKAGES, SOURCE, SPLIT = PACKAGES, SOURCE, SPLIT

    def __init__(self, name, sizes, covers):
        self.NAME, self.sizes, self.COVERS = name, sizes, covers

    def licence(self):
        return debian_licences(PACKAGES)

    def build(self, root):
        return build(root, self.sizes)


ICONS = IconSet("icons", (32, 48, 128), "clipart/icons with transparency (RGBA), mixed sizes, imbalance")
ICONS16 = IconSet("icons16", (16,), "tiny clipart (16 px) with transparency, imbalance")
