"""Data versions: what a dataset folder holds, version by version (`versions.json` beside data.yaml).

Version 1 is the import (or synthesis); `d3n data add NEW --to DATA` appends a version with the
images it added. A pipeline rerun after an addition brings its stages up to date incrementally
(the repository extended with the new images only, the detectors fine-tuned; see d3n/pipeline.py)
and every stage's `.pipeline.json` records the data version it saw. A dataset without the file
(made before versions existed) is version 1.

The test split is never added to: numbers reported on it stay comparable across versions.

An addition is all or nothing: the new images are imported and checked in a scratch folder inside
DATA, then a journal (`.add-pending.json`: every move, the new version's entry) is written before
the first file moves. A process killed during the moves leaves the journal; `d3n data add --finish
--to DATA` (or the next `d3n data add`) replays it to the end, and until then reading the dataset's
versions is an error naming it, so no stage trains on a half-added split.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from pathlib import Path

from d3n.artifacts import MANIFEST, read_json, write_json
from d3n.data.layout import DatasetLayout, label_path_for
from d3n.errors import DataError

try:
    import fcntl
except ImportError:  # not POSIX: additions are not guarded against running twice at once
    fcntl = None

VERSIONS = "versions.json"
PENDING = ".add-pending.json"
LOCK = ".add.lock"
ADDABLE = ("train", "val")


def read(root: str | Path) -> list[dict]:
    root = Path(root)
    if (root / PENDING).exists():
        raise DataError(f"{root}: a `d3n data add` was interrupted while moving images in ({root / PENDING}); "
                        f"run `d3n data add --finish --to {root}` to complete it")
    path = root / VERSIONS
    return read_json(path)["versions"] if path.exists() else []


def current(root: str | Path) -> int:
    return max(1, len(read(root)))


def record_initial(root: str | Path, source: str) -> Path:
    """Version 1: every image the dataset holds now, per split."""
    return write_json(Path(root) / VERSIONS, {"versions": [entry(1, source, _stems(DatasetLayout.open(root)))]})


def _stems(layout: DatasetLayout) -> dict[str, list[str]]:
    return {s: [p.stem for p in layout.images(s)] for s in layout.splits if layout.has(s)}


def entry(version: int, source: str, added: dict[str, list[str]]) -> dict:
    return {"version": version, "source": source, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "images": {s: len(v) for s, v in added.items()}, "added": added}


def add(new: str | Path, to: str | Path, split: str = "train", fmt: str | None = None,
        skip_bad: bool = False, progress: bool = True) -> dict:
    """Import `new` (VOC / YOLO / COCO, the import's checks) and add all of its images to `split`
    of the dataset `to` (whatever split NEW itself puts them in); returns the new version's entry.
    Nothing is changed if any check fails: the images are imported and checked in a scratch folder
    first, then moved in (renames within one filesystem) under a journal (module docstring)."""
    if split not in ADDABLE:
        raise DataError(f"--split {split}: images are added to train or val; the test split stays fixed so "
                        "numbers reported on it stay comparable")
    target = DatasetLayout.open(to)
    with _locked(target.root):
        return _add(new, target, split, fmt, skip_bad, progress)


@contextlib.contextmanager
def _locked(root: Path):
    """One addition at a time per dataset (another process waiting here, not racing on the files)."""
    with open(root / LOCK, "a") as f:
        if fcntl is not None:
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(f, fcntl.LOCK_UN)


def _add(new, target: DatasetLayout, split: str, fmt: str | None, skip_bad: bool, progress: bool) -> dict:
    from d3n.data.importer import import_dataset

    _finish(target.root)
    for stale in target.root.glob(".add-*"):  # scratch of an addition killed before its journal: never moved in
        if stale.is_dir():
            shutil.rmtree(stale)
    tmp = tempfile.mkdtemp(prefix=".add-", dir=target.root)  # removed by finish() once the moves are done
    try:
        staged = Path(tmp) / "data"
        import_dataset(new, staged, fmt=fmt, val_frac=0.0, skip_bad=skip_bad, names=list(target.names),
                       progress=progress)
        got = DatasetLayout.open(staged)
        images = [p for s in got.splits if got.has(s) for p in got.images(s)]
        taken = {p.stem: p for s in target.splits if target.has(s) for p in target.images(s)}
        clash = [(p, taken[p.stem]) for p in images if p.stem in taken]
        if clash:
            a, b = clash[0]
            raise DataError(f"{new}: {len(clash)} image(s) share a name with images already in {target.root} "
                            f"(first: {a.name} and {b}); rename them before adding")
        history = read(target.root) or [entry(1, "(before versions were recorded)", _stems(target))]
        made = entry(len(history) + 1, str(Path(new).resolve()), {split: sorted(p.stem for p in images)})
        dest = target.splits[split]
        moves = [(src, dst) for img in images
                 for src, dst in ((label_path_for(img), label_path_for(dest / img.name)), (img, dest / img.name))]
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    rel = [[str(a.relative_to(target.root)), str(b.relative_to(target.root))] for a, b in moves]
    write_json(target.root / PENDING, {"versions": [*history, made], "moves": rel, "scratch": Path(tmp).name})
    _finish(target.root)
    return made


def finish(to: str | Path) -> dict | None:
    """Replay an interrupted addition's journal to its end (a move already made is skipped); returns
    the version it completed, or None when nothing was pending. `to`: the dataset folder or its
    data.yaml."""
    root = DatasetLayout.open(to).root
    with _locked(root):
        return _finish(root)


def _finish(root: Path) -> dict | None:
    journal = root / PENDING
    if not journal.exists():
        return None
    j = read_json(journal)
    for src, dst in j["moves"]:  # same filesystem: each move is a rename
        if (root / src).exists():
            (root / dst).parent.mkdir(parents=True, exist_ok=True)
            shutil.move(root / src, root / dst)
        elif not (root / dst).exists():
            raise DataError(f"{journal}: {src} is neither in the scratch folder nor at {dst}; the addition "
                            "cannot be completed (restore the dataset from its source)")
    write_json(root / VERSIONS, {"versions": j["versions"]})
    shutil.rmtree(root / j["scratch"], ignore_errors=True)
    journal.unlink()
    _refresh_stage_manifest(root)
    return j["versions"][-1]


def _refresh_stage_manifest(root: Path) -> None:
    """A dataset inside a pipeline's data stage (RUN/data/dataset): its manifest's outputs are
    fingerprinted again, so the stages downstream see the new version on the next run."""
    manifest = root.parent / MANIFEST
    if not manifest.exists() or read_json(manifest).get("stage") != "data":
        return
    from d3n.artifacts import Manifest

    old = read_json(manifest)
    m = Manifest(root.parent, "data", {}, old.get("config"))
    m.complete([str(Path(root.name) / "data.yaml"), str(Path(root.name) / VERSIONS)])
