"""Validators shared by `d3n data import` and `d3n data check`.

A problem is always a file plus a reason. Importers collect every problem before failing, so a
user fixes a dataset in one pass instead of one error at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from d3n.data.layout import IMAGE_SUFFIXES
from d3n.errors import DataError

# Boxes may overshoot the image by this many pixels (rounding in annotation tools); such
# overshoot is clipped and counted. Anything further out is an error, never clipped silently.
BOX_TOLERANCE_PX = 1.0

# EXIF orientations that turn an image by 90 degrees (5-8 of TIFF/EXIF tag 0x0112). OpenCV, which
# every stage reads images with, applies the orientation of JPEG and PNG files, as photo viewers
# do; Pillow does not. Sizes are therefore always taken as the turned image's.
_ORIENTATION_TAG = 0x0112
TURNED = (5, 6, 7, 8)


def exif_orientation(im: Image.Image) -> int:
    """The EXIF orientation of an open image (1, upright, when it has none)."""
    value = im.getexif().get(_ORIENTATION_TAG, 1)
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def shown_size(im: Image.Image) -> tuple[int, int]:
    """(width, height) of an open image as OpenCV decodes it, its EXIF orientation applied."""
    w, h = im.size
    return (h, w) if exif_orientation(im) in TURNED else (w, h)


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) as every stage sees the image (a JPEG's header suffices; Pillow decodes a PNG
    to look for an EXIF chunk after its pixel data)."""
    with Image.open(path) as im:
        return shown_size(im)


@dataclass(frozen=True)
class Problem:
    path: Path
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"

    def as_dict(self) -> dict[str, str]:
        return {"file": str(self.path), "reason": self.reason}


class FileProblem(Exception):
    """Raised inside validators; callers turn it into a Problem and carry on collecting."""

    def __init__(self, path: Path | str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.problem = Problem(Path(path), reason)


def read_text_as(path: Path, parse, errors: type[Exception] | tuple, kind: str):
    """`parse(text)` of a file, any failure a DataError naming the file: unreadable, or malformed `kind`."""
    try:
        return parse(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: unreadable ({exc})") from None
    except errors as exc:
        raise DataError(f"{path}: malformed {kind} ({exc})") from None


def fail_with(problems: list[Problem], what: str) -> None:
    """Raise one DataError listing every problem (sorted by file, so the list reads in order)."""
    if not problems:
        return
    lines = "\n".join(f"  {p}" for p in sorted(problems, key=lambda p: (str(p.path), p.reason)))
    raise DataError(f"{what}: {len(problems)} problem(s)\n{lines}")


def turn_hint(path: Path, declared: tuple[int, int], size: tuple[int, int]) -> str:
    """Why `declared` differs from the image's `size` when it is the size of the stored pixels of a
    turned image (annotated before the turn); empty otherwise."""
    with Image.open(path) as im:
        turn = exif_orientation(im)
    if turn not in TURNED or tuple(declared) != size[::-1]:
        return ""
    return (f" once its EXIF orientation ({turn}) is applied, as d3n reads every image (OpenCV, like a photo"
            " viewer, turns it): annotate the turned image, or store the pixels upright without the tag")


def check_image(path: Path) -> tuple[int, int]:
    """(width, height) of an image after decoding it fully (a truncated file is caught here), as
    every stage sees it: its EXIF orientation applied."""
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise FileProblem(path, f"unsupported image type '{path.suffix}' (use one of {', '.join(IMAGE_SUFFIXES)})")
    try:
        with Image.open(path) as im:
            im.verify()  # structure and checksums (PNG CRCs)
        with Image.open(path) as im:
            im.load()  # full decode: verify() alone does not read JPEG scan data
            w, h = shown_size(im)
    except FileNotFoundError:
        raise FileProblem(path, "image file not found") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise FileProblem(path, f"unreadable or truncated image ({exc})") from None
    except ImportError:  # ultralytics, once imported, turns Pillow's "unidentified image" into a missing HEIF plugin
        raise FileProblem(path, "unreadable image (not a format Pillow can identify)") from None
    if w < 1 or h < 1:
        raise FileProblem(path, f"image has no pixels ({w}x{h})")
    return w, h


def check_box_px(box: tuple[float, float, float, float], w: int, h: int, where: Path,
                 label: str) -> tuple[tuple[float, float, float, float], bool]:
    """Validate an (x0, y0, x1, y1) pixel box in a w x h image; returns (box, was_clipped)."""
    x0, y0, x1, y1 = box
    if not all(np.isfinite(v) for v in box):
        raise FileProblem(where, f"{label}: non-finite coordinates {box}")
    if x1 <= x0 or y1 <= y0:
        raise FileProblem(where, f"{label}: empty box (x {x0:g}..{x1:g}, y {y0:g}..{y1:g})")
    tol = BOX_TOLERANCE_PX
    if x0 < -tol or y0 < -tol or x1 > w + tol or y1 > h + tol:
        raise FileProblem(where, f"{label}: box (x {x0:g}..{x1:g}, y {y0:g}..{y1:g}) "
                                 f"outside the {w}x{h} image")
    clipped = (max(0.0, x0), max(0.0, y0), min(float(w), x1), min(float(h), y1))
    if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
        raise FileProblem(where, f"{label}: box lies on the image border, nothing inside")
    return clipped, clipped != (x0, y0, x1, y1)


def parse_yolo_label(path: Path, nc: int) -> tuple[np.ndarray, list[Problem]]:
    """Rows of a YOLO label file as (n, 5) [cls cx cy w h]; every bad row is a problem."""
    rows, problems = [], []
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        return np.zeros((0, 5), np.float32), [Problem(path, f"unreadable label file ({exc})")]
    tol = 1e-4  # normalised coordinates are written with ~6 decimals
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        where = f"line {n}"
        if len(parts) != 5:
            problems.append(Problem(path, f"{where}: expected 5 values (class cx cy w h), got {len(parts)}"))
            continue
        try:
            vals = [float(v) for v in parts]
        except ValueError:
            problems.append(Problem(path, f"{where}: not numeric: {line.strip()!r}"))
            continue
        cls, cx, cy, bw, bh = vals
        if not all(np.isfinite(vals)):
            problems.append(Problem(path, f"{where}: non-finite value"))
        elif cls != int(cls) or not 0 <= cls < nc:
            problems.append(Problem(path, f"{where}: unknown class id {parts[0]} (dataset has {nc} classes)"))
        elif bw <= 0 or bh <= 0:
            problems.append(Problem(path, f"{where}: empty box (w {bw:g}, h {bh:g})"))
        elif min(cx - bw / 2, cy - bh / 2) < -tol or max(cx + bw / 2, cy + bh / 2) > 1 + tol:
            problems.append(Problem(path, f"{where}: box ({cx:g} {cy:g} {bw:g} {bh:g}) outside [0, 1]"))
        else:
            rows.append(vals)
    return np.asarray(rows, np.float32).reshape(-1, 5), problems
