"""Finished stage folders of an experiment's cells, found by stage key, so no cell repeats a stage
another cell already ran (the same DDPM, the same baseline). A shared folder is copied with hard
links: the files are written once, and a stage key holds only paths relative to its run folder,
so the copy is up to date where it lands.

Cells may run at the same time (`--jobs`, or several sessions on one folder): a stage is made
under a lock on its key, so a second cell that needs the same stage waits for the first and then
shares its folder instead of making it again. The locks are flock()s: a killed process frees its
own, nothing stale is left behind."""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from d3n.artifacts import MANIFEST, atomic_dir, read_json

log = logging.getLogger(__name__)
STATE = ".pipeline.json"
LOCKS = ".locks"  # beside cells/: one lock file per stage key being made


@contextmanager
def exclusive(path: Path, waiting: str | None = None):
    """Hold an exclusive flock on `path`; `waiting` is said when another process holds it first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting:
                log.info("%s", waiting)
                print(waiting, flush=True)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextmanager
def try_exclusive(path: Path):
    """Yield True holding an exclusive flock on `path`, or False at once when another process has it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class StageShare:
    def __init__(self, cells: Path):
        self.cells = Path(cells)
        self.index: dict[str, Path] = {}
        self.copied = 0  # stages taken from another cell in this process
        self._scan()

    def _scan(self) -> None:
        for state in sorted(self.cells.glob(f"*/*/{STATE}")):
            if not (state.parent / MANIFEST).exists():
                continue
            try:
                key = read_json(state).get("key")
            except FileNotFoundError:  # another process is rerunning that stage from scratch
                continue
            known = self.index.get(key)
            if known is None or not (known / MANIFEST).exists():  # new, or the folder it named is being remade
                self.index[key] = state.parent

    def lookup(self, key: str) -> Path | None:
        src = self.index.get(key)
        if src is None or not (src / MANIFEST).exists():  # another process may have finished it since
            self._scan()
            src = self.index.get(key)
        return src if src is not None and (src / MANIFEST).exists() else None

    def making(self, key: str, stage: str):
        """Held while this process decides on and makes the stage with `key`: another cell making
        the same stage is waited for (and then shared)."""
        return exclusive(self.cells.parent / LOCKS / f"{key}.lock",
                         f"stage {stage}: another cell is making it (same key); waiting to share it")

    def add(self, key: str, folder: Path) -> None:
        self.index.setdefault(key, Path(folder))

    def copy(self, src: Path, dst: Path) -> None:
        """Hard-link `src` into `dst` through a temporary folder renamed at the end, without its
        state file (the pipeline writes dst's own): a copy killed half-way never looks finished."""
        def link(a, b):
            try:
                os.link(a, b)
            except OSError:  # another file system: a plain copy
                shutil.copy2(a, b)

        with atomic_dir(dst) as tmp:
            shutil.copytree(src, tmp, copy_function=link, dirs_exist_ok=True, ignore=shutil.ignore_patterns(STATE))
        self.copied += 1
