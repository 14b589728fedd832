"""Tux Paint's stamps: photographic cut-outs (RGBA PNG, transparent background) in category folders.

tuxpaint-stamps-default ships its stamps as `stamps/<category>/<subcategory>/…/<stamp>.png`
(plus SVG clipart, sounds and descriptions, which are not used). Two datasets:

- stamps: the top-level category is the class (animals, food, plants, town, …); the
  `symbols` category (letters, coins, chess pieces, maths signs: drawings, not
  photos) and `cartoon` folders are left out, so it stays photographs.
- stamps_fine: the subcategory is the class (birds, mammals, fruit, flowers, roadsigns,
  money, chess, …), symbols included: many classes, a few with only a handful of stamps.

A stamp's identity is its file stem without `_mirror` (Tux Paint ships some stamps with
a mirrored copy): a stamp and its mirror stay in one split. Per class, 25 % of the
identities (sha1-ranked, at least one) are test. Classes with fewer than `min_stamps`
identities are left out.
"""

import re
import shutil
from collections import defaultdict
from pathlib import Path

from benchmarks.datasets.common import debian_licences, safe_name, split_identities

STAMPS = Path("/usr/share/tuxpaint/stamps")
PACKAGES = ("tuxpaint-stamps-default",)


class StampSet:
    """One way of classing the stamps (see the module docstring)."""

    PACKAGES = PACKAGES
    SOURCE = "Debian tuxpaint-stamps-default (/usr/share/tuxpaint/stamps, PNG stamps)"

    def __init__(self, name, level, min_stamps, leave_out, covers):
        self.NAME, self.level, self.min_stamps, self.leave_out, self.COVERS = name, level, min_stamps, leave_out, covers
        self.SPLIT = "by stamp (a stamp and its _mirror together): 25 % of stamps per class (sha1-ranked) test"

    def licence(self):
        return debian_licences(PACKAGES)

    def class_of(self, path):
        parts = path.relative_to(STAMPS).parts
        if any(part in self.leave_out for part in parts[:-1]) or len(parts) < self.level + 1:
            return None
        return parts[0] if self.level == 1 else f"{parts[0]}_{parts[1]}"

    def build(self, root):
        members = defaultdict(lambda: defaultdict(list))
        for path in sorted(STAMPS.rglob("*.png")):
            label = self.class_of(path)
            if label:
                members[label][re.sub(r"_mirror$", "", path.stem)].append(path)
        members = {label: stamps for label, stamps in members.items() if len(stamps) >= self.min_stamps}
        test = split_identities({label: [(label, s) for s in stamps] for label, stamps in members.items()}, 0.25)
        for label, stamps in members.items():
            for stamp, paths in stamps.items():
                split = "test" if (label, stamp) in test else "train"
                folder = root / split / safe_name(label)
                folder.mkdir(parents=True, exist_ok=True)
                for path in paths:
                    parent = safe_name("_".join(path.relative_to(STAMPS).parts[self.level:-1]))
                    shutil.copyfile(path, folder / f"{safe_name(stamp)}__{parent}_{safe_name(path.stem)}.png")
        return {"stamps": sum(len(s) for s in members.values()), "test_stamps": len(test)}


COARSE = StampSet("stamps", 1, 8, {"symbols", "cartoon"},
                  "natural photos (cut-outs, RGBA, 7–2 348 px), imbalance, few-shot")
FINE = StampSet("stamps_fine", 2, 4, {"cartoon", "alphabets"},
                "many classes (≥ 30), few-shot (a handful per class), photos and drawings")
