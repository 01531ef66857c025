"""Defect shapes for the synthetic steel dataset, one drawer per NEU-DET class.

Each drawer paints a coverage mask (float32 in [0, 1], full image size) for one defect centred
near (cx, cy) and returns it with the grey-level change to apply. The box label is derived from
the mask afterwards, so it is exactly the extent of what was drawn. Lengths are given for a
256 px image and scaled by `s = size / 256`, with floors so small images still show the defect.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# NEU-DET's class names in its own order (alphabetical, as its files and papers list them).
CLASSES = ("crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches")

Drawn = tuple[np.ndarray, float]  # (mask, grey-level delta at full coverage)


def _canvas(size: int) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    img = Image.new("L", (size, size), 0)
    return img, ImageDraw.Draw(img)


def _mask(img: Image.Image, blur: float = 0.0) -> np.ndarray:
    if blur > 0:
        img = img.filter(ImageFilter.GaussianBlur(blur))
    return np.asarray(img, dtype=np.float32) / 255.0


def _px(value: float, s: float, floor: float = 1.0) -> float:
    return max(floor, value * s)


def _blob(cx: float, cy: float, a: float, b: float, angle: float, rng: np.random.Generator,
          jitter: float = 0.25, n: int = 18) -> list[tuple[float, float]]:
    """An irregular ellipse as a polygon: radii jittered per vertex so edges look ragged."""
    t = np.linspace(0, 2 * math.pi, n, endpoint=False)
    r = 1.0 + rng.uniform(-jitter, jitter, n)
    x, y = a * r * np.cos(t), b * r * np.sin(t)
    ca, sa = math.cos(angle), math.sin(angle)
    return list(zip(cx + x * ca - y * sa, cy + x * sa + y * ca, strict=True))


def crazing(size: int, cx: float, cy: float, s: float, rng: np.random.Generator) -> Drawn:
    """A network of thin dark cracks: branching random walks from a common area."""
    img, draw = _canvas(size)
    extent = _px(rng.uniform(28, 60), s, 8)
    step = _px(rng.uniform(3, 5), s, 1.5)
    # some 2 px cracks at full size, so the network survives the detector's downscaling
    width = int(rng.integers(1, 3)) if s >= 0.75 else 1
    for _ in range(int(rng.integers(5, 10))):
        x, y = cx + rng.uniform(-extent, extent) * 0.6, cy + rng.uniform(-extent, extent) * 0.6
        heading = rng.uniform(0, 2 * math.pi)
        pts = [(x, y)]
        for _ in range(int(rng.integers(6, 16))):
            heading += rng.normal(0, 0.45)
            x, y = x + step * math.cos(heading), y + step * math.sin(heading)
            if abs(x - cx) > extent or abs(y - cy) > extent:
                break
            pts.append((x, y))
            if rng.random() < 0.15:  # a side branch makes the mesh look like crazing, not a line
                bh = heading + rng.choice([-1, 1]) * rng.uniform(0.6, 1.3)
                draw.line([(x, y), (x + 3 * step * math.cos(bh), y + 3 * step * math.sin(bh))], 255, width)
        if len(pts) > 1:
            draw.line(pts, fill=255, width=width)
    return _mask(img), -rng.uniform(60, 85)


def inclusion(size: int, cx: float, cy: float, s: float, rng: np.random.Generator) -> Drawn:
    """Elongated dark (or bright) blobs lying along the rolling direction."""
    img, draw = _canvas(size)
    a = _px(rng.uniform(16, 30), s, 6)
    for _ in range(int(rng.integers(1, 4))):
        la = a * rng.uniform(0.5, 1.0)
        lb = max(1.5, la / rng.uniform(2.5, 5.0))
        ox, oy = rng.uniform(-a, a) * 0.8, rng.uniform(-a, a) * 0.3
        draw.polygon(_blob(cx + ox, cy + oy, la, lb, rng.normal(0, 0.15), rng), fill=255)
    delta = -rng.uniform(55, 85) if rng.random() < 0.75 else rng.uniform(45, 65)
    return _mask(img, 0.6), delta


def patches(size: int, cx: float, cy: float, s: float, rng: np.random.Generator) -> Drawn:
    """Large dark irregular blotches with soft edges and a mottled interior."""
    img, draw = _canvas(size)
    r = _px(rng.uniform(18, 42), s, 6)
    for _ in range(int(rng.integers(3, 7))):
        ox, oy = rng.normal(0, r * 0.45, 2)
        draw.polygon(_blob(cx + ox, cy + oy, r * rng.uniform(0.4, 0.8), r * rng.uniform(0.3, 0.7),
                           rng.uniform(0, math.pi), rng, jitter=0.35), fill=255)
    mask = _mask(img, _px(1.5, s, 0.8))
    mottle = 0.75 + 0.25 * rng.random(mask.shape).astype(np.float32)
    return mask * mottle, -rng.uniform(50, 75)


def pitted_surface(size: int, cx: float, cy: float, s: float, rng: np.random.Generator) -> Drawn:
    """A cluster of small dark pits."""
    img, draw = _canvas(size)
    spread = _px(rng.uniform(12, 32), s, 5)
    for _ in range(int(rng.integers(12, 40))):
        x, y = cx + rng.normal(0, spread * 0.5), cy + rng.normal(0, spread * 0.5)
        pr = _px(rng.uniform(0.8, 2.3), s, 0.8)
        draw.ellipse([x - pr, y - pr * rng.uniform(0.6, 1.0), x + pr, y + pr], fill=255)
    return _mask(img), -rng.uniform(55, 85)


def rolled_in_scale(size: int, cx: float, cy: float, s: float, rng: np.random.Generator) -> Drawn:
    """Flaky dark scale pressed into the strip: many short ragged flakes along the rolling (x) axis."""
    img, draw = _canvas(size)
    w, h = _px(rng.uniform(25, 55), s, 8), _px(rng.uniform(8, 22), s, 4)
    for _ in range(int(rng.integers(10, 28))):
        x, y = cx + rng.uniform(-w, w), cy + rng.uniform(-h, h)
        fl, fh = _px(rng.uniform(3, 9), s, 1.5), _px(rng.uniform(1.2, 3.0), s, 1.0)
        draw.polygon(_blob(x, y, fl, fh, rng.normal(0, 0.12), rng, jitter=0.45, n=8), fill=255)
    return _mask(img), -rng.uniform(45, 70)


def scratches(size: int, cx: float, cy: float, s: float, rng: np.random.Generator) -> Drawn:
    """One or two long thin lines, gently curved, bright (metal exposed) or dark.

    They cross the rolling direction (within ~60 deg of vertical), as NEU-DET's mostly do; a
    scratch lying along the horizontal streaks would be hard to tell from the texture.
    """
    img, draw = _canvas(size)
    half = _px(rng.uniform(40, 100), s, 10)
    angle = math.pi / 2 + float(np.clip(rng.normal(0, 0.5), -1.05, 1.05))
    dx, dy = half * math.cos(angle), half * math.sin(angle)
    normal = np.array([-math.sin(angle), math.cos(angle)])
    bend = rng.normal(0, half * 0.12)  # quadratic Bezier control offset, normal to the line
    width = int(round(_px(rng.uniform(2.0, 3.5), s, 1.0)))
    t = np.linspace(0, 1, 32)[:, None]
    offsets = [0.0] if rng.random() < 0.7 else [0.0, rng.choice([-1, 1]) * _px(rng.uniform(5, 10), s, 3)]
    for off in offsets:
        c = np.array([cx, cy]) + off * normal
        p0, p2 = c - (dx, dy), c + (dx, dy)
        p1 = c + bend * normal
        pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
        draw.line([tuple(p) for p in pts], fill=255, width=width)
    delta = rng.uniform(65, 90) if rng.random() < 0.6 else -rng.uniform(65, 90)
    return _mask(img), delta


DRAWERS: dict[str, Callable[..., Drawn]] = {
    "crazing": crazing,
    "inclusion": inclusion,
    "patches": patches,
    "pitted_surface": pitted_surface,
    "rolled-in_scale": rolled_in_scale,
    "scratches": scratches,
}
assert tuple(DRAWERS) == CLASSES
