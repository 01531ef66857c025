"""COCO reader: a JSON with images / annotations / categories; bbox is [x, y, w, h] in pixels.

SRC is one JSON (or a folder with one), or a folder with one JSON per split whose names say the
split (instances_train2017.json, instances_val2017.json, instances_test*.json): each image then
keeps that split, test being the held-out one. Image `file_name`s are looked up beside the JSON,
in its parent, in SRC and in SRC/images (and, per split, SRC/[images/]val2017 after the JSON's
name). An image entry with no annotations is a deliberate empty image; an image file in the same
folder that no JSON lists is reported as an image without annotation.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from d3n.data.source import Record, Source, coco_jsons, image_files
from d3n.data.validate import Problem, read_text_as
from d3n.errors import DataError

SPLIT_WORDS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


def split_of(path: Path) -> str | None:
    """train | val | test as a COCO file name says (instances_val2017.json -> val); None if it names none or several."""
    words = {w for w in re.split(r"[^a-z]+", path.stem.lower()) if w}
    found = {SPLIT_WORDS[w] for w in words if w in SPLIT_WORDS}
    return found.pop() if len(found) == 1 else None


def _find_jsons(src: Path) -> list[tuple[Path, str | None]]:
    """The JSON(s) to read, each with the split its name gives.

    One JSON (or a .json as SRC) carries no split, as before several were read: its images are
    split by --splits / --val-frac. Several JSONs are read together only when each name gives a
    different split (COCO's instances_train2017.json, instances_val2017.json, ...).
    """
    if src.is_file():
        return [(src, None)]
    found = coco_jsons(src)
    if len(found) == 1:
        return [(found[0], None)]
    splits = [split_of(p) for p in found]
    if not found or None in splits or len(set(splits)) != len(splits):
        listed = ", ".join(str(p) for p in found) or "none"
        raise DataError(f"{src}: expected one COCO .json, or one per split named for it (instances_train*.json, "
                        f"instances_val*.json, instances_test*.json), found {listed}; pass the .json as SRC")
    return list(zip(found, splits, strict=True))


def _load(path: Path) -> dict:
    spec = read_text_as(path, json.loads, json.JSONDecodeError, "JSON")
    for key in ("images", "annotations", "categories"):
        if not isinstance(spec.get(key) if isinstance(spec, dict) else None, list):
            raise DataError(f"{path}: malformed COCO JSON (no '{key}' list)")
    return spec


def _categories(spec: dict, path: Path) -> dict[int, str]:
    cats = {}
    for k, c in enumerate(spec["categories"]):
        if not isinstance(c, dict) or not isinstance(c.get("id"), int) or not isinstance(c.get("name"), str):
            raise DataError(f"{path}: malformed COCO JSON (categories[{k}] needs an integer id and a name)")
        cats[c["id"]] = c["name"]
    return dict(sorted(cats.items()))  # category order by id


def _image_path(file_name: str, roots: list[Path]) -> Path | None:
    for root in roots:
        if (root / file_name).is_file():
            return root / file_name
    return None


@dataclass
class _Read:
    """What the JSON(s) of one source add up to; stems are unique across all of them."""
    records: list[Record] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    seen_stems: dict[str, str] = field(default_factory=dict)


def _roots(jpath: Path, base: Path, split: str | None) -> list[Path]:
    roots = [jpath.parent, jpath.parent.parent, base, base / "images"]
    if split:  # COCO keeps each split's images in a folder named like the JSON's tail: val2017/
        tail = jpath.stem.split("_")[-1]
        roots += [base / tail, base / "images" / tail]
    return list(dict.fromkeys(roots))


def _read_images(spec: dict, jpath: Path, roots: list[Path], split: str | None, out: _Read) -> dict[int, Record]:
    records: dict[int, Record] = {}
    for k, im in enumerate(spec["images"]):
        if not isinstance(im, dict) or not isinstance(im.get("id"), int) or not isinstance(im.get("file_name"), str):
            out.problems.append(Problem(jpath, f"images[{k}]: needs an integer id and a file_name"))
            continue
        name = im["file_name"]
        path = _image_path(name, roots)
        rec = Record(stem=Path(name).stem, ann=jpath, image=path, split=split)
        if isinstance(im.get("width"), int) and isinstance(im.get("height"), int):
            rec.size = (im["width"], im["height"])
        if path is None:
            rec.problems.append(Problem(jpath, f"annotation without image: '{name}' not found under "
                                               f"{', '.join(map(str, roots))}"))
        if rec.stem in out.seen_stems:
            rec.problems.append(Problem(jpath, f"'{name}' has the same stem as '{out.seen_stems[rec.stem]}'"))
        out.seen_stems.setdefault(rec.stem, name)
        records[im["id"]] = rec
    return records


def _read_boxes(spec: dict, jpath: Path, cats: dict[int, str], records: dict[int, Record], out: _Read) -> None:
    for k, a in enumerate(spec["annotations"]):
        bbox = a.get("bbox") if isinstance(a, dict) else None
        rec = records.get(a.get("image_id")) if isinstance(a, dict) else None
        if rec is None:
            out.problems.append(Problem(jpath, f"annotations[{k}]: image_id not among images"))
        elif not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, int | float) for v in bbox)):
            rec.problems.append(Problem(jpath, f"annotations[{k}] ({rec.stem}): bbox must be [x, y, w, h]"))
        elif a.get("category_id") not in cats:
            rec.problems.append(Problem(jpath, f"annotations[{k}] ({rec.stem}): unknown category_id "
                                               f"{a.get('category_id')}"))
        else:
            x, y, w, h = (float(v) for v in bbox)
            rec.boxes.append((cats[a["category_id"]], x, y, x + w, y + h))


def _unlisted(out: _Read, jpaths: list[Path]) -> set[str]:
    """Report images beside listed ones that no JSON lists; returns the stems of every image found."""
    listed = {r.image.resolve() for r in out.records if r.image is not None}
    folders = {r.image.parent for r in out.records if r.image is not None}
    image_stems = {r.stem for r in out.records if r.image is not None}
    where = str(jpaths[0]) if len(jpaths) == 1 else f"any of {', '.join(map(str, jpaths))}"
    for folder in sorted(folders):
        for stem, paths in image_files(folder).items():
            for p in paths:
                if p.resolve() not in listed:
                    out.problems.append(Problem(p, f"image without annotation (not listed in {where})"))
                    image_stems.add(stem)
    return image_stems


def read_coco(src: Path) -> Source:
    jsons = _find_jsons(src)
    base = src if src.is_dir() else src.parent
    out = _Read()
    names: list[str] | None = None
    for jpath, split in jsons:
        spec = _load(jpath)
        cats = _categories(spec, jpath)
        if names is not None and list(cats.values()) != names:  # one class order for every split
            raise DataError(f"{jpath}: categories differ from {jsons[0][0]} ({list(cats.values())} vs {names})")
        names = list(cats.values())
        records = _read_images(spec, jpath, _roots(jpath, base, split), split, out)
        _read_boxes(spec, jpath, cats, records, out)
        out.records += records.values()
    image_stems = _unlisted(out, [j for j, _ in jsons])
    return Source("coco", base, out.records, names or [], out.problems, image_stems)
