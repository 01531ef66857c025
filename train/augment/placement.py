"""Where a new defect goes: a target image of the train split and a mask on it.

Masks come from the user (`DIR/<target stem>.png`, one per target image, the image's size; each
8-connected region of a mask is one place a defect can go, with its own box, every region of every
mask equally likely; the outermost pixel ring is left out, as everywhere here: Poisson cloning needs
a border; regions under MIN_SIDE pixels across are specks, not places), from the real boxes of the
target (an ellipse inside one of them, of the class being added where the image has one: a new
defect where one was), or at random (an ellipse the size of a real box of the class, on a
defect-free image when the split has some, away from the boxes already there; crowded images are
searched whole for a clear spot). The new box is the mask's bounding box.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from d3n.data.layout import DatasetLayout
from d3n.data.validate import image_size
from d3n.errors import DataError


@dataclass
class Target:
    image: Path
    mask: np.ndarray  # bool (h, w): where the defect is drawn
    box: tuple[int, int, int, int]  # the mask's bounding box (x0, y0, x1, y1), pixels
    source: str  # how the mask was chosen, for the manifest


def ellipse(h: int, w: int, box: tuple[int, int, int, int]) -> np.ndarray:
    """The ellipse inscribed in `box`, a pixel away from the image border (Poisson cloning needs one)."""
    x0, y0, x1, y1 = box
    m = np.zeros((h, w), np.uint8)
    cv2.ellipse(m, (((x0 + x1) / 2, (y0 + y1) / 2), (max(x1 - x0, 2), max(y1 - y0, 2)), 0), 1, -1)
    m[[0, -1]] = 0
    m[:, [0, -1]] = 0
    return m.astype(bool)


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


MIN_SIDE = 4  # px: a region whose box is narrower is a speck (a stray brush pixel), not a place


def regions(mask: np.ndarray) -> list[np.ndarray]:
    """Each 8-connected region of a mask (bool), a pixel away from the image border, whose box is
    at least MIN_SIDE pixels on both sides (as the random placement's smallest box)."""
    m = (mask > 0).astype(np.uint8)
    m[[0, -1]] = 0
    m[:, [0, -1]] = 0
    n, labels, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=8)
    return [labels == i for i in range(1, n)
            if min(stats[i, cv2.CC_STAT_WIDTH], stats[i, cv2.CC_STAT_HEIGHT]) >= MIN_SIDE]


def pixel_boxes(layout: DatasetLayout, image: Path, w: int, h: int) -> list[tuple[int, tuple[int, int, int, int]]]:
    return [(int(c), (int((cx - bw / 2) * w), int((cy - bh / 2) * h), int(np.ceil((cx + bw / 2) * w)),
                      int(np.ceil((cy + bh / 2) * h)))) for c, cx, cy, bw, bh in layout.labels(image).tolist()]


class Placer:
    def __init__(self, layout: DatasetLayout, how: str, user_masks: Path | None = None):
        if how not in ("random", "boxes", "dir"):
            raise DataError(f"--masks {how}: expected random, boxes or a folder of PNGs")
        self.layout, self.how, self.user = layout, how, user_masks
        self.images = layout.images("train")
        self.clean = [p for p in self.images if not len(layout.labels(p))]
        self.with_boxes = [p for p in self.images if len(layout.labels(p))]
        self.sizes: dict[int, list[tuple[float, float]]] = {}  # real box sizes per class, as image fractions
        for p in self.with_boxes:
            for c, _, _, bw, bh in layout.labels(p).tolist():
                self.sizes.setdefault(int(c), []).append((bw, bh))
        if how == "dir":
            self.user_files = sorted(Path(user_masks).glob("*.png")) if user_masks and Path(user_masks).is_dir() else []
            if not self.user_files:
                raise DataError(f"{user_masks}: no mask PNGs (one per target image, named after it)")
            by_stem = {p.stem: p for p in self.images}
            missing = [m.name for m in self.user_files if m.stem not in by_stem]
            if missing:
                raise DataError(f"{user_masks}/{missing[0]}: no train image named {Path(missing[0]).stem}.* "
                                f"in {layout.splits['train']} ({len(missing)} such masks)")
            self.user_targets = []  # (image, mask file, region index): every region is a place
            for m in self.user_files:  # all checked before anything is made
                img = by_stem[m.stem]
                mask = cv2.imread(str(m), cv2.IMREAD_GRAYSCALE)
                if mask is None:
                    raise DataError(f"{m}: unreadable mask")
                w, h = image_size(img)
                if mask.shape != (h, w):
                    raise DataError(f"{m}: mask is {mask.shape[1]}x{mask.shape[0]} but {img} is {w}x{h}")
                if not mask.any():
                    raise DataError(f"{m}: empty mask (nothing to draw into)")
                found = regions(mask)
                if not found:
                    raise DataError(f"{m}: no region of the mask is {MIN_SIDE} x {MIN_SIDE} pixels or more a pixel "
                                    "away from the image border (nothing to draw into)")
                self.user_targets += [(img, m, i) for i in range(len(found))]

    def place(self, cls: int, rng: np.random.Generator, h_w: dict[Path, tuple[int, int]]) -> Target:
        if self.how == "dir":
            img, path, i = self.user_targets[int(rng.integers(len(self.user_targets)))]
            mask = regions(cv2.imread(str(path), cv2.IMREAD_GRAYSCALE))[i]  # checked at construction
            return Target(img, mask, mask_box(mask), f"mask {path.name} region {i + 1}")
        if self.how == "boxes":
            pool = [p for p in self.with_boxes if any(c == cls for c, *_ in self.layout.labels(p).tolist())]
            pool = pool or self.with_boxes
            img = pool[int(rng.integers(len(pool)))]
            h, w = h_w[img]
            boxes = pixel_boxes(self.layout, img, w, h)
            # one of the class's own boxes where the image has one: the defect redrawn is of the class
            # topped up, and a neighbouring defect of another class keeps its box
            boxes = [b for c, b in boxes if c == cls] or [b for _, b in boxes]
            box = boxes[int(rng.integers(len(boxes)))]
            mask = ellipse(h, w, box)
            return Target(img, mask, mask_box(mask), f"ellipse in a real box of {img.name}")
        pool = self.clean or self.images
        name = self.layout.names[cls]
        sizes = self.sizes.get(cls)
        if not sizes:
            raise DataError(f"class '{name}' has no box in the train split: no size to draw it at")
        for _ in range(50):
            img = pool[int(rng.integers(len(pool)))]
            h, w = h_w[img]
            bw, bh = _size(sizes, rng, w, h)
            # a pixel from the border: Poisson cloning (paste) needs one around the region
            x0, y0 = int(rng.integers(1, max(w - bw, 2))), int(rng.integers(1, max(h - bh, 2)))
            box = (x0, y0, min(x0 + bw, w - 1), min(y0 + bh, h - 1))
            if all(_disjoint(box, b) for _, b in pixel_boxes(self.layout, img, w, h)):
                mask = ellipse(h, w, box)
                return Target(img, mask, mask_box(mask), f"random on {img.name}")
        # 50 random spots were all taken (a split without defect-free images and with large boxes, as
        # NEU-DET): every image once, in random order, searched whole for a clear spot of a drawn size
        for i in rng.permutation(len(pool)):
            img = pool[i]
            h, w = h_w[img]
            bw, bh = _size(sizes, rng, w, h)
            box = _free_spot([b for _, b in pixel_boxes(self.layout, img, w, h)], w, h, bw, bh, rng)
            if box is not None:
                mask = ellipse(h, w, box)
                return Target(img, mask, mask_box(mask), f"random on {img.name} (searched)")
        raise DataError(f"no free place for a '{name}' defect: none of the {len(pool)} train images has a spot "
                        f"the size of a real '{name}' box clear of its boxes (the split has "
                        f"{len(self.clean)} defect-free images); --masks boxes draws inside real boxes instead")


def _size(sizes: list[tuple[float, float]], rng: np.random.Generator, w: int, h: int) -> tuple[int, int]:
    """A real box size of the class (image fractions) in pixels of a w x h image, at least 4 pixels
    and leaving the border ring free."""
    bw, bh = sizes[int(rng.integers(len(sizes)))]
    return min(max(int(bw * w), 4), w - 2), min(max(int(bh * h), 4), h - 2)


def _free_spot(taken: list[tuple[int, int, int, int]], w: int, h: int, bw: int, bh: int,
              rng: np.random.Generator) -> tuple[int, int, int, int] | None:
    """A random bw x bh box inside a w x h image, a pixel from its border, overlapping none of the
    boxes in `taken`; None where there is no such place."""
    occupied = np.zeros((h, w), np.int32)
    for x0, y0, x1, y1 in taken:
        occupied[max(y0, 0):max(y1, 0), max(x0, 0):max(x1, 0)] = 1
    occupied[[0, -1]] = 1
    occupied[:, [0, -1]] = 1
    s = np.pad(occupied.cumsum(0).cumsum(1), ((1, 0), (1, 0)))  # summed-area table
    inside = s[bh:, bw:] - s[:-bh, bw:] - s[bh:, :-bw] + s[:-bh, :-bw]  # taken pixels of the box at each top-left
    ys, xs = np.nonzero(inside == 0)
    if not len(ys):
        return None
    i = int(rng.integers(len(ys)))
    return int(xs[i]), int(ys[i]), int(xs[i]) + bw, int(ys[i]) + bh


def _disjoint(a, b) -> bool:
    return a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]
