"""The suite's datasets (issue 38): real image-classification sets that install offline from package registries.

Each module has NAME, SOURCE, PACKAGES, COVERS, SPLIT, licence() and build(root); see
common.build_cached for the cache. Files are named `<identity>__<rest>.png` where one
source identity (an icon name, a font family, a stamp) has several images, so a
validation split carved from train can keep identities apart too.
"""

from benchmarks.datasets import digits8, glyphs, icons, stamps

DATASETS = {module.NAME: module for module in (digits8, glyphs, icons.ICONS, icons.ICONS16, stamps.COARSE, stamps.FINE)}
