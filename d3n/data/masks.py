"""Segmentation-style datasets (one mask PNG per image) read as boxes: `--format masks`.

Three layouts, told apart by their folders:

- MVTec AD-like: `train/<type>/*.png`, `test/<type>/*.png`, masks in
  `ground_truth/<type>/<stem>_mask.png`; the type `good` is defect-free, every other type is a
  class. Stems repeat across types, so an image is imported as `<split>_<type>_<stem>`; the
  source's train holds only good images, so every image is split at random (--val-frac,
  --test-frac) rather than by the source's folders.
- KSDD2-like: `train/` and `test/` with `<stem>.png` beside its mask `<stem>_GT.png` (one class,
  `defect`); an all-zero mask is a defect-free image. The source's test split is kept.
- Plain: `images/<stem>.*` and `masks/<stem>.png`. A binary mask (any non-zero pixel is defect)
  gives class `defect`; with a `classes.txt` (one name per line) mask value k is class k (1-based).

Each connected region of a mask (8-connected) becomes one box around it. A mask that does not
match its image (size), an image without its mask, a mask without its image and a mask value
with no class are problems naming the file, listed before the import fails like any other.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from d3n.data.layout import IMAGE_SUFFIXES
from d3n.data.source import Record, Source, image_files
from d3n.data.validate import Problem
from d3n.errors import DataError

DEFECT = "defect"
GOOD = "good"  # MVTec's defect-free type


def layout_of(src: Path) -> str | None:
    """mvtec | ksdd2 | plain, or None when `src` is none of them."""
    if (src / "ground_truth").is_dir() and any((src / s).is_dir() for s in ("train", "test")):
        return "mvtec"
    if (src / "images").is_dir() and (src / "masks").is_dir():
        return "plain"
    if any(any((src / s).glob("*_GT.png")) for s in ("train", "test") if (src / s).is_dir()):
        return "ksdd2"
    return None


def mask_boxes(mask: np.ndarray, values: dict[int, str] | None,
               name: str = DEFECT) -> list[tuple[str, float, float, float, float]]:
    """One (class, x0, y0, x1, y1) per 8-connected region; `values` maps a mask value to its class
    (None: binary, every non-zero pixel is class `name`)."""
    import cv2

    layers = [(name, mask > 0)] if values is None else [(name, mask == v) for v, name in sorted(values.items())]
    boxes = []
    for name, region in layers:
        n, _, stats, _ = cv2.connectedComponentsWithStats(region.astype(np.uint8), connectivity=8)
        for left, top, w, h, _area in stats[1:n].tolist():  # row 0 is the background
            boxes.append((name, float(left), float(top), float(left + w), float(top + h)))
    return boxes


def _read_mask(path: Path) -> np.ndarray:
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        arr = np.asarray(ImageOps.exif_transpose(im))  # turned as OpenCV reads the image it belongs to
    if arr.ndim == 2:
        return arr
    # RGB(A) / LA: any colour channel marks the defect; alpha says nothing about it
    return arr[..., :3].max(axis=-1) if arr.shape[-1] >= 3 else arr[..., 0]


def _record(stem: str, image: Path, mask: Path | None, values: dict[int, str] | None, split: str | None,
            name: str = DEFECT) -> Record:
    """A record whose boxes come from `mask` (None: a defect-free image). The mask's size is what
    the record declares, so the importer names both files when it does not match the image."""
    rec = Record(stem=stem, ann=mask or image, image=image, split=split)
    if mask is None:
        return rec
    try:
        arr = _read_mask(mask)
    except (OSError, ValueError) as exc:
        rec.problems.append(Problem(mask, f"unreadable mask ({exc})"))
        return rec
    rec.size = (arr.shape[1], arr.shape[0])
    if values is not None:
        unknown = sorted(set(np.unique(arr).tolist()) - set(values) - {0})
        if unknown:
            rec.problems.append(Problem(mask, f"mask values {unknown[:5]} have no class in classes.txt "
                                              f"(1..{len(values)})"))
            return rec
    rec.boxes = mask_boxes(arr, values, name)
    return rec


def _mvtec(src: Path) -> tuple[list[Record], list[str], list[Problem]]:
    records, problems, types, seen = [], [], set(), set()
    for split in ("train", "test"):
        if not (src / split).is_dir():
            continue
        for tdir in sorted(p for p in (src / split).iterdir() if p.is_dir()):
            for stem, paths in image_files(tdir).items():
                mask = src / "ground_truth" / tdir.name / f"{stem}_mask.png"
                if tdir.name == GOOD:
                    mask = None
                elif not mask.exists():
                    problems.append(Problem(paths[0], f"defect image without its mask (no {mask})"))
                    continue
                else:
                    types.add(tdir.name)
                    seen.add((tdir.name, stem))
                # binary masks: the class is the folder's defect type
                records.append(_record(f"{split}_{tdir.name}_{stem}", paths[0], mask, None, None, tdir.name))
    names = sorted(types)
    for m in sorted((src / "ground_truth").glob("*/*_mask.png")):
        if (m.parent.name, m.name.removesuffix("_mask.png")) not in seen:
            problems.append(Problem(m, f"mask without image (no {m.name.removesuffix('_mask.png')}.* in "
                                       f"train/{m.parent.name} or test/{m.parent.name})"))
    return records, names, problems


def _ksdd2(src: Path) -> tuple[list[Record], list[str], list[Problem]]:
    records, problems = [], []
    for split in ("train", "test"):
        folder = src / split
        if not folder.is_dir():
            continue
        files = image_files(folder)
        for stem, paths in files.items():
            if stem.endswith("_GT"):
                if stem.removesuffix("_GT") not in files:
                    problems.append(Problem(paths[0], f"mask without image (no {stem.removesuffix('_GT')}.* in {folder})"))
                continue
            mask = folder / f"{stem}_GT.png"
            if not mask.exists():
                problems.append(Problem(paths[0], f"image without its mask (no {mask.name}; a defect-free image "
                                                  "has an all-zero mask)"))
                continue
            records.append(_record(stem, paths[0], mask, None, split))
    return records, [DEFECT], problems


def _plain(src: Path) -> tuple[list[Record], list[str], list[Problem]]:
    classes = src / "classes.txt"
    names = [n.strip() for n in classes.read_text().splitlines() if n.strip()] if classes.exists() else [DEFECT]
    values = {k: n for k, n in enumerate(names, 1)} if classes.exists() else None
    images, masks = image_files(src / "images"), {p.stem: p for p in sorted((src / "masks").glob("*.png"))}
    records, problems = [], []
    for stem, paths in images.items():
        if stem not in masks:
            problems.append(Problem(paths[0], f"image without its mask (no masks/{stem}.png; a defect-free "
                                              "image has an all-zero mask)"))
            continue
        records.append(_record(stem, paths[0], masks[stem], values, None))
    problems += [Problem(m, f"mask without image (no images/{stem}.*)") for stem, m in masks.items()
                 if stem not in images]
    return records, names, problems


def read_masks(src: Path) -> Source:
    kind = layout_of(src)
    if kind is None:
        raise DataError(f"{src}: not a mask dataset: expected images/ with masks/, train|test/ with "
                        "ground_truth/ (MVTec-like) or train|test/ with *_GT.png masks (KSDD2-like)")
    records, names, problems = {"mvtec": _mvtec, "ksdd2": _ksdd2, "plain": _plain}[kind](src)
    if not names:
        raise DataError(f"{src}: no defect type found (only '{GOOD}' images)")
    stems = {r.stem for r in records} | {p.path.stem for p in problems if p.path.suffix.lower() in IMAGE_SUFFIXES}
    return Source("masks", src, records, names, problems, image_stems=stems)
