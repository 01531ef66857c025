"""COCO reader: one JSON with images / annotations / categories; bbox is [x, y, w, h] in pixels.

Image `file_name`s are looked up beside the JSON, in its parent, in SRC and in SRC/images. An
image entry with no annotations is a deliberate empty image; an image file in the same folder
that the JSON does not list is reported as an image without annotation.
"""

from __future__ import annotations

import json
from pathlib import Path

from d3n.data.source import Record, Source, coco_jsons, image_files
from d3n.data.validate import Problem
from d3n.errors import DataError


def _find_json(src: Path) -> Path:
    if src.is_file():
        return src
    found = coco_jsons(src)
    if len(found) != 1:
        listed = ", ".join(str(p) for p in found) or "none"
        raise DataError(f"{src}: expected one COCO .json, found {listed}; pass the .json as SRC")
    return found[0]


def _load(path: Path) -> dict:
    try:
        spec = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: unreadable ({exc})") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: malformed JSON ({exc})") from None
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


def read_coco(src: Path) -> Source:
    jpath = _find_json(src)
    spec = _load(jpath)
    cats = _categories(spec, jpath)
    base = src if src.is_dir() else jpath.parent
    roots = list(dict.fromkeys([jpath.parent, jpath.parent.parent, base, base / "images"]))
    records: dict[int, Record] = {}
    problems: list[Problem] = []
    seen_stems: dict[str, str] = {}
    for k, im in enumerate(spec["images"]):
        if not isinstance(im, dict) or not isinstance(im.get("id"), int) or not isinstance(im.get("file_name"), str):
            problems.append(Problem(jpath, f"images[{k}]: needs an integer id and a file_name"))
            continue
        name = im["file_name"]
        path = _image_path(name, roots)
        rec = Record(stem=Path(name).stem, ann=jpath, image=path)
        if isinstance(im.get("width"), int) and isinstance(im.get("height"), int):
            rec.size = (im["width"], im["height"])
        if path is None:
            rec.problems.append(Problem(jpath, f"annotation without image: '{name}' not found under "
                                               f"{', '.join(map(str, roots))}"))
        if rec.stem in seen_stems:
            rec.problems.append(Problem(jpath, f"'{name}' has the same stem as '{seen_stems[rec.stem]}'"))
        seen_stems.setdefault(rec.stem, name)
        records[im["id"]] = rec
    for k, a in enumerate(spec["annotations"]):
        bbox = a.get("bbox") if isinstance(a, dict) else None
        rec = records.get(a.get("image_id")) if isinstance(a, dict) else None
        if rec is None:
            problems.append(Problem(jpath, f"annotations[{k}]: image_id not among images"))
        elif not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, int | float) for v in bbox)):
            rec.problems.append(Problem(jpath, f"annotations[{k}] ({rec.stem}): bbox must be [x, y, w, h]"))
        elif a.get("category_id") not in cats:
            rec.problems.append(Problem(jpath, f"annotations[{k}] ({rec.stem}): unknown category_id "
                                               f"{a.get('category_id')}"))
        else:
            x, y, w, h = (float(v) for v in bbox)
            rec.boxes.append((cats[a["category_id"]], x, y, x + w, y + h))
    listed = {r.image.resolve() for r in records.values() if r.image is not None}
    folders = {r.image.parent for r in records.values() if r.image is not None}
    image_stems = {r.stem for r in records.values() if r.image is not None}
    for folder in sorted(folders):
        for stem, paths in image_files(folder).items():
            for p in paths:
                if p.resolve() not in listed:
                    problems.append(Problem(p, f"image without annotation (not listed in {jpath})"))
                    image_stems.add(stem)
    return Source("coco", base, list(records.values()), list(cats.values()), problems, image_stems)
