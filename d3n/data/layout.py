"""The on-disk dataset layout every stage reads: YOLO format with a `data.yaml`.

    DATA/data.yaml              names: {0: crazing, ...}, nc, train: images/train, val: images/val
                                [test: images/test]  (only when the held-out test split exists)
    DATA/images/<split>/<stem>.<jpg|png|bmp>
    DATA/labels/<split>/<stem>.txt   one line per box: class cx cy w h (normalised to [0, 1])

`data.yaml` carries no `path` key: ultralytics then resolves the splits relative to the yaml's
own folder, so a dataset folder can be moved or copied whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from d3n.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
SPLITS = ("train", "val", "test")  # test: a held-out evaluation split, optional


@dataclass(frozen=True)
class DatasetLayout:
    root: Path
    names: tuple[str, ...]
    splits: dict[str, Path]  # split name -> images folder, for each split data.yaml lists

    @classmethod
    def open(cls, root: str | Path) -> DatasetLayout:
        root = Path(root)
        yaml_path = root / "data.yaml" if root.is_dir() else root
        root = yaml_path.parent
        if not yaml_path.exists():
            raise DataError(f"{yaml_path}: no data.yaml (run `d3n data import` or `d3n data synth` first)")
        try:
            spec = yaml.safe_load(yaml_path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise DataError(f"{yaml_path}: not valid YAML ({exc})") from None
        names = spec.get("names")
        if isinstance(names, dict):
            names = [names[k] for k in sorted(names)]
        if not names:
            raise DataError(f"{yaml_path}: no class names")
        splits = {s: root / spec[s] for s in SPLITS if spec.get(s)}
        if not splits:
            raise DataError(f"{yaml_path}: no train, val or test split listed")
        return cls(root=root, names=tuple(names), splits=splits)

    @property
    def yaml_path(self) -> Path:
        return self.root / "data.yaml"

    @property
    def nc(self) -> int:
        return len(self.names)

    def has(self, split: str) -> bool:
        """Whether data.yaml lists `split` and its folder exists (test is optional; it may also be empty)."""
        return split in self.splits and self.splits[split].is_dir()

    def images(self, split: str) -> list[Path]:
        """Image files of a split, sorted by name (a stable order for repositories and seeds)."""
        if split not in self.splits:
            raise DataError(f"{self.yaml_path}: no split '{split}' (has {sorted(self.splits)})")
        folder = self.splits[split]
        if not folder.is_dir():
            raise DataError(f"{folder}: split folder missing")
        return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)

    def label_path(self, image: Path) -> Path:
        return label_path_for(image)

    def labels(self, image: Path) -> np.ndarray:
        """(n, 5) float32 array: class, cx, cy, w, h (normalised). Empty (0, 5) if no boxes."""
        path = self.label_path(image)
        if not path.exists() or not path.read_text().strip():  # no file or empty: no boxes
            return np.zeros((0, 5), np.float32)
        try:
            arr = np.loadtxt(path, dtype=np.float32, ndmin=2)
        except ValueError as exc:
            raise DataError(f"{path}: malformed label file ({exc})") from None
        if arr.size == 0:
            return np.zeros((0, 5), np.float32)
        if arr.shape[1] != 5:
            raise DataError(f"{path}: expected 5 columns (class cx cy w h), got {arr.shape[1]}")
        return arr


def label_path_for(image: str | Path) -> Path:
    """images/<split>/x.jpg -> labels/<split>/x.txt (the last 'images' in the path, as ultralytics does)."""
    parts = list(Path(image).parts)
    if "images" not in parts:
        raise DataError(f"{image}: not inside an images/ folder, so it has no labels/ counterpart")
    idx = len(parts) - 1 - parts[::-1].index("images")
    parts[idx] = "labels"
    return Path(*parts).with_suffix(".txt")


def write_data_yaml(root: str | Path, names: list[str] | tuple[str, ...], test: bool = False) -> Path:
    """data.yaml with train and val (always listed: ultralytics requires both keys) and, if `test`, test."""
    from d3n.artifacts import write_text

    spec = {"names": dict(enumerate(names)), "nc": len(names), "train": "images/train", "val": "images/val"}
    if test:
        spec["test"] = "images/test"
    return write_text(Path(root) / "data.yaml", yaml.safe_dump(spec, sort_keys=False))
