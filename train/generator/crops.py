"""Defect crops: the generator's training data, at a resolution that keeps defect detail.

A whole 200-pixel image shrunk to the stage-1 DDPM's 16 or 64 pixels loses thin scratches; a crop
around each box, `context` times its longer side (a square, at least `min_side` pixels, moved
inside the image), keeps them at the generator's `size`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from d3n.data.layout import DatasetLayout
from d3n.errors import DataError


@dataclass(frozen=True)
class Crop:
    image: Path
    cls: int
    box: tuple[int, int, int, int]  # the defect's box in the image, pixels
    window: tuple[int, int, int, int]  # the square crop around it, pixels (x0, y0, x1, y1)


def window_around(box: tuple[float, float, float, float], w: int, h: int, context: float,
                  min_side: int) -> tuple[int, int, int, int]:
    """A square of side max(box side x context, min_side), centred on the box, moved (not
    clipped) to lie inside the image; the image's shorter side at most."""
    x0, y0, x1, y1 = box
    side = int(round(min(max(max(x1 - x0, y1 - y0) * context, min_side), w, h)))
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    left = int(round(min(max(cx - side / 2, 0), w - side)))
    top = int(round(min(max(cy - side / 2, 0), h - side)))
    return left, top, left + side, top + side


def read_rgb(path: Path) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise DataError(f"{path}: cannot read image")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def to_model(patch: np.ndarray, size: int) -> np.ndarray:
    """uint8 RGB (h, w, 3) -> float32 (3, size, size) in [-1, 1]."""
    patch = cv2.resize(patch, (size, size), interpolation=cv2.INTER_AREA)
    return (patch.astype(np.float32) / 127.5 - 1.0).transpose(2, 0, 1)


def from_model(x: np.ndarray, w: int, h: int) -> np.ndarray:
    """float (3, s, s) in [-1, 1] -> uint8 RGB (h, w, 3)."""
    img = ((np.clip(x, -1, 1) + 1) * 127.5).round().astype(np.uint8).transpose(1, 2, 0)
    return cv2.resize(img, (w, h), interpolation=cv2.INTER_CUBIC if w > img.shape[1] else cv2.INTER_AREA)


def defect_crops(layout: DatasetLayout, split: str, context: float, min_side: int) -> list[Crop]:
    crops = []
    for path in layout.images(split):
        rows = layout.labels(path)
        if not len(rows):
            continue
        h, w = read_rgb(path).shape[:2]
        for c, cx, cy, bw, bh in rows.tolist():
            box = ((cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h)
            crops.append(Crop(path, int(c), tuple(int(round(v)) for v in box),
                              window_around(box, w, h, context, min_side)))
    return crops


def load_crops(crops: list[Crop], size: int) -> np.ndarray:
    out, cache = [], {}
    for c in crops:
        if c.image not in cache:
            cache = {c.image: read_rgb(c.image)}  # crops come image by image
        x0, y0, x1, y1 = c.window
        out.append(to_model(cache[c.image][y0:y1, x0:x1], size))
    return np.stack(out) if out else np.zeros((0, 3, size, size), np.float32)
