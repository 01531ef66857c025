"""YOLO reader: data.yaml (names, train/val/test folders, optional `path`) with images/ and labels/ trees.

Each image keeps the split whose folder it lies in; `test` is the held-out split. A data.yaml
without a `test` key but with an images/test folder beside images/train gets that folder as test:
such a folder holds test images the yaml just does not name, and dropping them silently loses them.
"""

from __future__ import annotations

import logging
from pathlib import Path

import yaml

from d3n.data.layout import SPLITS, label_path_for
from d3n.data.source import Record, Source, image_files
from d3n.data.validate import Problem, parse_yolo_label, read_text_as
from d3n.errors import DataError

log = logging.getLogger(__name__)


def _spec(yaml_path: Path) -> dict:
    spec = read_text_as(yaml_path, yaml.safe_load, yaml.YAMLError, "YAML")
    if not isinstance(spec, dict):
        raise DataError(f"{yaml_path}: malformed data.yaml (not a mapping)")
    return spec


def _names(spec: dict, yaml_path: Path) -> list[str]:
    names = spec.get("names")
    if isinstance(names, dict):
        if sorted(names) != list(range(len(names))):
            raise DataError(f"{yaml_path}: names must be keyed 0..{len(names) - 1}")
        names = [names[k] for k in sorted(names)]
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise DataError(f"{yaml_path}: no list of class names")
    return [str(n) for n in names]


def _split_folders(spec: dict, root: Path, yaml_path: Path) -> dict[str, Path]:
    """Images folder per split the data.yaml lists (plus an unlisted images/test, see the module doc)."""
    folders = {}
    for split in SPLITS:
        if not spec.get(split):
            continue
        if not isinstance(spec[split], str) or not (root / spec[split]).is_dir():
            raise DataError(f"{yaml_path}: {split}: '{spec[split]}' is not a folder under {root}")
        folders[split] = root / spec[split]
    guess = root / "images" / "test"
    if "test" not in folders and guess.is_dir() and guess not in folders.values():
        log.warning("%s: no 'test' key; importing %s as the test split", yaml_path, guess)
        folders["test"] = guess
    if not folders:
        raise DataError(f"{yaml_path}: lists no train, val or test folder")
    return folders


def read_yolo(src: Path) -> Source:
    yaml_path = src if src.is_file() else src / "data.yaml"
    spec = _spec(yaml_path)
    names = _names(spec, yaml_path)
    root = yaml_path.parent / spec["path"] if spec.get("path") else yaml_path.parent
    folders = _split_folders(spec, root, yaml_path)
    records, problems, stems = [], [], {}
    for split, folder in folders.items():
        if "images" not in folder.parts:
            raise DataError(f"{yaml_path}: {split}: '{folder}' must lie in an images/ tree (labels/ beside it)")
        for stem, paths in image_files(folder).items():
            for img in paths:
                label = label_path_for(img)  # images/... -> labels/... (ultralytics rule)
                rec = Record(stem=stem, ann=label, image=img, normalised=True, split=split)
                if stem in stems:
                    rec.problems.append(Problem(img, f"same stem as {stems[stem]}"))
                stems.setdefault(stem, img)
                if not label.exists():
                    rec.problems.append(Problem(img, f"image without annotation (no {label})"))
                else:
                    rows, bad = parse_yolo_label(label, len(names))
                    rec.problems += bad
                    rec.boxes = [(names[int(c)], x - w / 2, y - h / 2, x + w / 2, y + h / 2)
                                 for c, x, y, w, h in rows.tolist()]
                records.append(rec)
        labels_dir = label_path_for(folder / "x.jpg").parent
        split_stems = {r.stem for r in records if r.split == split}
        if labels_dir.is_dir():
            for txt in sorted(labels_dir.glob("*.txt")):
                if txt.stem not in split_stems:
                    problems.append(Problem(txt, f"annotation without image (no {txt.stem}.* in {folder})"))
    return Source("yolo", root, records, names, problems, image_stems=set(stems))
