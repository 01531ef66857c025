"""Finished stage folders of an experiment's cells, found by stage key, so no cell repeats a stage
another cell already ran (the same DDPM, the same baseline). A shared folder is copied with hard
links: the files are written once, and a stage key holds only paths relative to its run folder,
so the copy is up to date where it lands."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from d3n.artifacts import MANIFEST, read_json

STATE = ".pipeline.json"


class StageShare:
    def __init__(self, cells: Path):
        self.cells = Path(cells)
        self.index: dict[str, Path] = {}
        self.copied = 0  # stages taken from another cell in this process
        for state in sorted(self.cells.glob(f"*/*/{STATE}")):
            if (state.parent / MANIFEST).exists():
                self.index.setdefault(read_json(state).get("key"), state.parent)

    def lookup(self, key: str) -> Path | None:
        src = self.index.get(key)
        return src if src is not None and (src / MANIFEST).exists() else None

    def add(self, key: str, folder: Path) -> None:
        self.index.setdefault(key, Path(folder))

    def copy(self, src: Path, dst: Path) -> None:
        def link(a, b):
            try:
                os.link(a, b)
            except OSError:  # another file system: a plain copy
                shutil.copy2(a, b)

        shutil.copytree(src, dst, copy_function=link)
        self.copied += 1
