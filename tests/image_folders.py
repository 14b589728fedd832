"""Small image-folder datasets written with Pillow: mixed sizes, modes and formats.

Classes differ in what a photo would: shape and colour of an object on a textured
background, at random positions and scales, so the task is learnable but not trivial.
Real pictures shipped with matplotlib (`sample_data`) join as extra files.
"""

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("circle", "square", "triangle")
FORMATS = (("png", "RGB"), ("jpg", "RGB"), ("png", "RGBA"), ("png", "L"), ("bmp", "RGB"), ("gif", "P"),
           ("png", "P"), ("jpg", "L"))


def draw(kind, size, rng):
    """One synthetic photo: a coloured shape on a noisy background, uint8 RGB."""
    width, height = size
    background = rng.integers(60, 200, 3)
    pixels = np.clip(background + rng.normal(0, 25, (height, width, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    pen = ImageDraw.Draw(image)
    side = int(min(width, height) * rng.uniform(0.35, 0.7))
    x0 = int(rng.integers(0, width - side + 1))
    y0 = int(rng.integers(0, height - side + 1))
    colour = tuple(int(c) for c in rng.integers(0, 256, 3))
    box = (x0, y0, x0 + side, y0 + side)
    if kind == "circle":
        pen.ellipse(box, fill=colour)
    elif kind == "square":
        pen.rectangle(box, fill=colour)
    else:
        pen.polygon([(x0, y0 + side), (x0 + side, y0 + side), (x0 + side // 2, y0)], fill=colour)
    return image


def save(image, path, mode):
    if mode == "RGBA":
        image = image.convert("RGBA")
        alpha = Image.new("L", image.size, 255)
        ImageDraw.Draw(alpha).rectangle((0, 0, image.width // 6, image.height), fill=0)  # a transparent strip
        image.putalpha(alpha)
    elif mode != "RGB":
        image = image.convert(mode)
    image.save(path)


def write_dataset(root, per_class=30, seed=0, layout="flat", sizes=((40, 120), (30, 90))):
    """Writes a dataset and returns its root.

    Args:
        root: Folder to create.
        per_class: Images per class (per split for layout "splits": train gets this many,
            val and test a third of it each).
        layout: "flat" (`root/<class>/…`) or "splits" (`root/train|val|test/<class>/…`).
        sizes: ((min, max) width, (min, max) height) ranges.
    """
    rng = np.random.default_rng(seed)
    root = Path(root)
    splits = {"flat": {"": per_class}, "splits": {"train": per_class, "val": per_class // 3,
                                                  "test": per_class // 3}}[layout]
    index = 0
    for split, count in splits.items():
        for kind in CLASSES:
            folder = root / split / kind
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                suffix, mode = FORMATS[index % len(FORMATS)]
                index += 1
                size = (int(rng.integers(*sizes[0])), int(rng.integers(*sizes[1])))
                save(draw(kind, size, rng), folder / f"{kind}_{i:03d}.{suffix}", mode)
    return root


def sample_photos():
    """Real photos shipped with matplotlib (JPEG and PNG)."""
    import matplotlib

    folder = Path(matplotlib.get_data_path()) / "sample_data"
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".png"))
