"""Small image folders drawn on the fly for the image-data tests: no downloads, every format and size varied.

Each class is a colour (with noise and a darker square at a random place), so a small CNN learns it in a few
dozen steps whatever the crop; sizes vary per image (wide, tall, square) and the formats rotate through JPEG,
PNG, WebP and BMP, with some grayscale-free RGBA/palette PNGs to exercise the mode conversions.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = {"blue": (40, 60, 210), "green": (40, 190, 60), "red": (210, 40, 40)}
FORMATS = ("jpg", "png", "webp", "bmp")


def draw(rng: np.random.Generator, colour, size) -> np.ndarray:
    """(h, w, 3) uint8: the colour, noise, and a darker square somewhere."""
    w, h = size
    base = np.asarray(colour, np.float32) + rng.normal(0, 25, (h, w, 3))
    s = max(2, min(w, h) // 3)
    y, x = rng.integers(0, h - s + 1), rng.integers(0, w - s + 1)
    base[y:y + s, x:x + s] *= 0.4
    return np.clip(base, 0, 255).astype(np.uint8)


def encode(pixels: np.ndarray, fmt: str, mode: str = "RGB") -> bytes:
    im = Image.fromarray(pixels).convert(mode)
    buf = io.BytesIO()
    im.save(buf, {"jpg": "JPEG", "png": "PNG", "webp": "WEBP", "bmp": "BMP"}[fmt],
            **({"quality": 90} if fmt in ("jpg", "webp") else {}))
    return buf.getvalue()


def write_image_folder(root, *, counts=None, classes=tuple(COLOURS), seed: int = 0,
                       sizes=((48, 32), (32, 48), (40, 40), (64, 40))) -> Path:
    """``root/<split>/<class>/<i>.<fmt>`` for each split in ``counts`` ({split: images per class})."""
    root = Path(root)
    counts = counts or {"train": 16, "val": 6}
    rng = np.random.default_rng(seed)
    for split, n in counts.items():
        for c, cls in enumerate(classes):
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                fmt = FORMATS[(i + c) % len(FORMATS)]
                mode = "RGBA" if (fmt == "png" and i % 3 == 0) else "RGB"
                pixels = draw(rng, COLOURS[cls], sizes[(i + 2 * c) % len(sizes)])
                (d / f"{i:03d}.{fmt}").write_bytes(encode(pixels, fmt, mode))
    return root
