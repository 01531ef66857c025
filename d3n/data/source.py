"""What every dataset reader returns: records (one per image) plus the problems it found reading.

Readers only parse annotations and pair them with image files; decoding images, checking boxes
against the decoded size and class lists happens once, in the importer, for all formats alike.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from d3n.data.layout import IMAGE_SUFFIXES
from d3n.data.validate import Problem
from d3n.errors import DataError

Box = tuple[str, float, float, float, float]  # class name, x0, y0, x1, y1


@dataclass
class Record:
    stem: str  # output file stem, unique within a source
    ann: Path  # the annotation file that problems about this record point at
    image: Path | None  # None: the annotation names an image that does not exist
    boxes: list[Box] = field(default_factory=list)
    normalised: bool = False  # boxes in [0, 1] (YOLO) instead of pixels
    size: tuple[int, int] | None = None  # (w, h) the annotation declares, checked against the image
    split: str | None = None  # the source's own split, if it has one
    problems: list[Problem] = field(default_factory=list)  # found while parsing this annotation

    def item(self) -> str:
        """How a skipped record is named: its image, else its annotation (+ stem in a shared JSON)."""
        if self.image is not None:
            return str(self.image)
        return f"{self.ann}:{self.stem}" if self.ann.suffix == ".json" else str(self.ann)


@dataclass
class Source:
    format: str
    root: Path
    records: list[Record]
    names: list[str]  # default class order for this format
    problems: list[Problem] = field(default_factory=list)  # not tied to one record
    image_stems: set[str] = field(default_factory=set)  # every image file found, good or bad


def image_files(folder: Path) -> dict[str, list[Path]]:
    """Image files directly in `folder` by stem (a list: two files may share a stem)."""
    found: dict[str, list[Path]] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
            found.setdefault(p.stem, []).append(p)
    return found


def is_coco_json(path: Path) -> bool:
    try:
        head = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(head, dict) and {"images", "annotations", "categories"} <= set(head)


def _voc_dirs(src: Path) -> tuple[Path, Path] | None:
    ann = next((src / n for n in ("ANNOTATIONS", "Annotations") if (src / n).is_dir()), None)
    img = next((src / n for n in ("IMAGES", "JPEGImages") if (src / n).is_dir()), None)
    return (ann, img) if ann and img else None


def coco_jsons(src: Path) -> list[Path]:
    candidates = sorted(src.glob("*.json")) + sorted(src.glob("annotations/*.json"))
    return [p for p in candidates if is_coco_json(p)]


def detect_format(src: Path) -> str:
    """voc | yolo | coco, from the folder's structure (see `d3n data import --help`)."""
    if src.is_file():
        if src.suffix.lower() == ".json":
            return "coco"
        if src.suffix.lower() in (".yaml", ".yml"):
            return "yolo"
        raise DataError(f"{src}: cannot tell the dataset format of this file (expected a COCO .json or data.yaml)")
    if not src.is_dir():
        raise DataError(f"{src}: no such file or folder")
    if (src / "data.yaml").exists():
        return "yolo"
    if _voc_dirs(src):
        return "voc"
    if coco_jsons(src):
        return "coco"
    from d3n.data.masks import layout_of

    if layout_of(src):
        return "masks"
    raise DataError(f"{src}: cannot tell the dataset format: expected VOC (ANNOTATIONS/ or Annotations/ "
                    "with IMAGES/ or JPEGImages/), YOLO (data.yaml), COCO (a .json with images, "
                    "annotations, categories) or masks (images/ + masks/, MVTec-like ground_truth/, "
                    "KSDD2-like *_GT.png); pass --format")


def voc_dirs(src: Path) -> tuple[Path, Path]:
    dirs = _voc_dirs(src)
    if not dirs:
        raise DataError(f"{src}: not a VOC folder (needs ANNOTATIONS/ or Annotations/ and IMAGES/ or JPEGImages/)")
    return dirs
