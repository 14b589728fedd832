"""Letters and digits (62 classes) rendered with Pillow from the fonts of Debian's fonts-* packages.

One 32×32 grayscale image per character per font: black ink on white, every glyph of a
font at the same size on the same baseline, so case shows by height (`o` vs `O`) and a
mirror changes the class (`b`/`d`, `p`/`q`). Fonts are grouped by family (the name
table's typographic family), and whole families go to train or test, so no weight or
italic of a test font is seen in training. At most STYLES_PER_FAMILY styles per family
(Noto alone ships 18 weights of each) keep families from dominating. A font is skipped
if its cmap lacks one of the 62 characters; its lowercase is dropped where it draws
lowercase as the uppercase glyphs (all-caps display faces), and small-caps families
(SMALL_CAPS in the name) are skipped, as are the GFS packages (Greek faces that draw
Greek letters at Latin code points).
"""

from collections import defaultdict
from pathlib import Path
import re
import string

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from benchmarks.datasets.common import debian_licences, identity_rank, safe_name, split_identities

NAME = "glyphs"
SIDE = 32
STYLES_PER_FAMILY = 2
PACKAGES = tuple((Path(__file__).with_name("glyph_fonts.txt")).read_text().split())
SOURCE = f"{len(PACKAGES)} Debian fonts-* packages (list in benchmarks/datasets/glyph_fonts.txt), rendered with Pillow"
COVERS = "glyphs where a flip changes the class, many classes (62), large set (≥ 20 000)"
SPLIT = "by font family: 25 % of families (sha1-ranked) test"
SMALL_CAPS = re.compile(r"(small ?caps|\bSC\b|\bcaps\b)", re.IGNORECASE)
CHARACTERS = string.digits + string.ascii_uppercase + string.ascii_lowercase


def class_name(character):
    kind = "digit" if character.isdigit() else "upper" if character.isupper() else "lower"
    return f"{kind}_{character}"


def licence():
    return debian_licences(PACKAGES)


def font_files():
    """The .ttf/.otf files the packages installed, sorted (dpkg -L's word on which are theirs)."""
    import subprocess

    files = set()
    for package in PACKAGES:
        listing = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True).stdout.split()
        files.update(p for p in listing if p.lower().endswith((".ttf", ".otf")) and Path(p).is_file())
    return sorted(files)


def family_and_coverage(path):
    """(family name, True if the cmap has all 62 characters, True if lowercase is its own glyphs)."""
    from fontTools.ttLib import TTFont

    try:
        font = TTFont(path, lazy=True, fontNumber=0)
        cmap = font.getBestCmap() or {}
        names = font["name"]
        family = names.getDebugName(16) or names.getDebugName(1) or Path(path).stem
    except Exception:  # a font fontTools cannot read is no source of glyphs
        return None, False, False
    covered = all(ord(c) in cmap for c in CHARACTERS)
    own_lowercase = covered and sum(cmap[ord(c)] != cmap[ord(c.upper())] for c in string.ascii_lowercase) > 20
    return family, covered, own_lowercase


def render_font(path):
    """{character: uint8 [SIDE, SIDE]} for one font, every glyph on one baseline at one size."""
    probe = ImageFont.truetype(path, 100)
    ascent, descent = probe.getmetrics()
    size = max(4, int(100 * (SIDE - 2) / max(1, ascent + descent)))
    glyphs = {}
    for character in CHARACTERS:
        font = ImageFont.truetype(path, size)
        left, top, right, bottom = font.getbbox(character, anchor="ls")
        if right - left > SIDE - 2:  # a wide glyph (W, m) shrinks alone rather than being cut
            font = ImageFont.truetype(path, max(4, int(size * (SIDE - 2) / (right - left))))
            left, top, right, bottom = font.getbbox(character, anchor="ls")
        image = Image.new("L", (SIDE, SIDE), 255)
        baseline = 1 + round(ascent * size / 100)
        ImageDraw.Draw(image).text((SIDE / 2 - (left + right) / 2, baseline), character, fill=0, font=font,
                                   anchor="ls")
        glyphs[character] = np.asarray(image)
    return glyphs


def build(root):
    families = defaultdict(list)
    skipped = 0
    for path in font_files():
        family, covered, own_lowercase = family_and_coverage(path)
        if not covered or SMALL_CAPS.search(family):
            skipped += 1
            continue
        families[family].append((path, own_lowercase))
    test_families = split_identities({"all": families}, 0.25)
    used_fonts = 0
    for family, fonts in sorted(families.items()):
        split = "test" if family in test_families else "train"
        for path, own_lowercase in sorted(fonts, key=lambda f: identity_rank(f[0]))[:STYLES_PER_FAMILY]:
            try:
                glyphs = render_font(path)
            except OSError:
                skipped += 1
                continue
            if not own_lowercase or sum(np.array_equal(glyphs[c], glyphs[c.upper()])
                                        for c in string.ascii_lowercase) > 13:
                glyphs = {c: g for c, g in glyphs.items() if not c.islower()}
            blank = [c for c, g in glyphs.items() if g.min() > 128]
            glyphs = {c: g for c, g in glyphs.items() if c not in blank}
            used_fonts += 1
            stem = f"{safe_name(family)}__{safe_name(Path(path).stem)}_{identity_rank(path)[:6]}"
            for character, pixels in glyphs.items():
                folder = root / split / class_name(character)
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels, mode="L").save(folder / f"{stem}.png")
    return {"fonts_used": used_fonts, "families": len(families), "test_families": len(test_families),
            "font_files_skipped": skipped}
