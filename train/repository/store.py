"""The feature repository on disk: sharded, memory-mapped float16 arrays with an index.

    REPO/store.json                      kind, levels, timesteps, image_ids, shapes, shards, meta
    REPO/shards/<k>.json                 one finished shard: image range and per-file sha256
    REPO/shards/<level>_<k>.npy          float16 (n_images, T, C, H, W) for images [start, start+n)

A shard's arrays are written under temporary names and renamed, then its `<k>.json` is written
last: a shard counts as finished only when that record exists, so a killed build resumes at the
first shard without one. `store.json` is written once every shard is done.

Readers (dataloader workers, many at once, reading at random) open the arrays lazily, per
process, with `np.load(mmap_mode="r")`: `get()` touches only one item's pages (O(1), no
whole-file load) and a forked worker never inherits another process's file handles.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from d3n.artifacts import read_json, sha256_file, write_json
from d3n.errors import ArtifactError

INDEX = "store.json"
SHARDS = "shards"
KINDS = ("raw", "resvae", "pca")
LEVELS = ("p3", "p4", "p5")  # strides 8/16/32 of the detector input
DTYPE = np.float16


def shard_file(level: str, k: int) -> str:
    return f"{SHARDS}/{level}_{k:05d}.npy"


def shard_record(k: int) -> str:
    return f"{SHARDS}/{k:05d}.json"


def shard_ranges(n_items: int, shard_size: int) -> list[tuple[int, int]]:
    """(start, count) of each shard over `n_items` images."""
    if shard_size < 1:
        raise ValueError("shard_size must be >= 1")
    return [(s, min(shard_size, n_items - s)) for s in range(0, n_items, shard_size)]


class StoreWriter:
    """Writes a repository shard by shard; finished shards found on disk are kept (resume).

    A repository can also grow: given the ids of a finished one followed by new ids (and its shard
    ranges followed by new ones, `ranges`), the finished shards stay as they are and only the new
    ones are written (an incremental update after images were added to the dataset).
    """

    def __init__(self, root: str | os.PathLike, *, kind: str, levels: list[str], timesteps: list[int],
                 image_ids: list[str], shapes: dict[str, tuple[int, int, int]], shard_size: int,
                 meta: dict[str, Any], ranges: list[tuple[int, int]] | None = None):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.root = Path(root)
        self.kind, self.levels, self.timesteps = kind, list(levels), [int(t) for t in timesteps]
        self.image_ids, self.shard_size, self.meta = list(image_ids), int(shard_size), dict(meta)
        self.shapes = {lv: (len(self.timesteps), *map(int, shapes[lv])) for lv in self.levels}
        self.ranges = [tuple(r) for r in ranges] if ranges is not None else shard_ranges(len(self.image_ids),
                                                                                         self.shard_size)
        if sum(c for _, c in self.ranges) != len(self.image_ids):
            raise ValueError("shard ranges do not cover the image ids")
        (self.root / SHARDS).mkdir(parents=True, exist_ok=True)
        self._check_plan()

    def _plan(self) -> dict[str, Any]:
        return {"kind": self.kind, "levels": self.levels, "timesteps": self.timesteps,
                "image_ids": self.image_ids, "shapes": self.shapes, "shard_size": self.shard_size,
                "meta": self.meta, "ranges": [list(r) for r in self.ranges]}

    def _check_plan(self) -> None:
        """A resumed build must be the same build: refuse to mix shards from a different plan. A
        plan that only appends images (and shards) to a finished one extends it."""
        plan_path = self.root / SHARDS / "plan.json"
        plan = json.loads(json.dumps(self._plan()))
        if plan_path.exists():
            old = read_json(plan_path)
            old.setdefault("ranges", [list(r) for r in shard_ranges(len(old["image_ids"]), old["shard_size"])])
            if old == plan:
                return
            if not self._extends(old, plan):
                raise ArtifactError(f"{plan_path}: an unfinished build with different inputs (images, levels, "
                                    "timesteps, shard size or source model) is in this folder; use a new --out")
        write_json(plan_path, plan)

    def _extends(self, old: dict[str, Any], new: dict[str, Any]) -> bool:
        """`new` appends images in new shards to the finished repository `old` (provenance in
        `meta` may change: the new shards record theirs)."""
        same = all(old[k] == new[k] for k in ("kind", "levels", "timesteps", "shapes", "shard_size"))
        n, k = len(old["image_ids"]), len(old["ranges"])
        return (same and (self.root / INDEX).exists() and new["image_ids"][:n] == old["image_ids"]
                and new["ranges"][:k] == old["ranges"])

    def done(self, k: int) -> bool:
        rec = self.root / shard_record(k)
        return rec.exists() and all((self.root / shard_file(lv, k)).exists() for lv in self.levels)

    def pending(self) -> list[int]:
        return [k for k in range(len(self.ranges)) if not self.done(k)]

    def write_shard(self, k: int, arrays: dict[str, np.ndarray]) -> None:
        start, count = self.ranges[k]
        files = {}
        for lv in self.levels:
            arr = np.ascontiguousarray(arrays[lv], dtype=DTYPE)
            if arr.shape != (count, *self.shapes[lv]):
                raise ValueError(f"shard {k} level {lv}: shape {arr.shape} != {(count, *self.shapes[lv])}")
            rel = shard_file(lv, k)
            tmp = self.root / f"{rel}.tmp.npy"
            np.save(tmp, arr)
            os.replace(tmp, self.root / rel)
            files[lv] = {"file": rel, "sha256": sha256_file(self.root / rel)}
        write_json(self.root / shard_record(k), {"index": k, "start": start, "count": count, "files": files})

    def finish(self) -> Path:
        missing = self.pending()
        if missing:
            raise ArtifactError(f"{self.root}: shards {missing} not written")
        shards = [read_json(self.root / shard_record(k)) for k in range(len(self.ranges))]
        plan = self._plan()
        del plan["ranges"]  # the shard records hold them
        index = {**plan, "dtype": np.dtype(DTYPE).name, "shards": shards}
        return write_json(self.root / INDEX, index)


class FeatureStore:
    """Read side of a repository: `get(image_id)` -> {level: float16 (T, C, H, W)} memory-mapped."""

    def __init__(self, root: Path, index: dict[str, Any]):
        self.root = root
        self.kind: str = index["kind"]
        self.levels: list[str] = list(index["levels"])
        self.timesteps: list[int] = [int(t) for t in index["timesteps"]]
        self.image_ids: list[str] = list(index["image_ids"])
        self.meta: dict[str, Any] = dict(index.get("meta", {}))
        self.shard_size: int = int(index["shard_size"])
        self._shapes = {lv: tuple(int(x) for x in s) for lv, s in index["shapes"].items()}
        self._shards = index["shards"]
        self._pos = {iid: i for i, iid in enumerate(self.image_ids)}
        # (shard, row) of each image from the shard records: shards of a grown repository are not all full
        self._where = [(k, j) for k, sh in enumerate(self._shards) for j in range(int(sh["count"]))]
        self._maps: dict[tuple[str, int], np.ndarray] = {}
        self._pid = os.getpid()

    @classmethod
    def open(cls, path: str | os.PathLike, verify: bool = True) -> FeatureStore:
        """Open a finished repository. `verify` checks every shard's sha256 (do it once, in the
        main process); without it only the sizes and array headers are checked."""
        root = Path(path)
        index_path = root / INDEX
        if not index_path.exists():
            hint = " (its build did not finish: run `d3n repo build` again to resume)" \
                if (root / SHARDS).is_dir() else ""
            raise ArtifactError(f"{index_path}: not a feature repository{hint}")
        index = read_json(index_path)
        for key in ("kind", "levels", "timesteps", "image_ids", "shapes", "shards", "shard_size"):
            if key not in index:
                raise ArtifactError(f"{index_path}: missing '{key}'")
        store = cls(root, index)
        store._check(verify)
        return store

    def _check(self, verify: bool) -> None:
        for shard in self._shards:
            for lv in self.levels:
                f = shard["files"][lv]
                path = self.root / f["file"]
                if not path.exists():
                    raise ArtifactError(f"{path}: shard file missing from repository {self.root}")
                want = (shard["count"], *self._shapes[lv])
                try:
                    arr = np.load(path, mmap_mode="r")
                except (ValueError, OSError) as exc:
                    raise ArtifactError(f"{path}: corrupt shard (unreadable header: {exc})") from None
                if arr.shape != want or arr.dtype != DTYPE:
                    raise ArtifactError(f"{path}: corrupt shard (shape {arr.shape} {arr.dtype}, "
                                        f"expected {want} float16)")
                del arr
                if verify and sha256_file(path) != f["sha256"]:
                    raise ArtifactError(f"{path}: corrupt shard (sha256 does not match {INDEX})")

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getstate__(self) -> dict[str, Any]:
        # Pickled into dataloader workers without open maps; each worker maps its own.
        state = dict(self.__dict__)
        state["_maps"] = {}
        return state

    def shape(self, level: str) -> tuple[int, int, int, int]:
        return self._shapes[level]

    def nbytes(self) -> int:
        """Bytes of feature data (all items, all levels): what a loader moves and holds."""
        per_image = sum(int(np.prod(self._shapes[lv])) for lv in self.levels) * np.dtype(DTYPE).itemsize
        return per_image * len(self.image_ids)

    def disk_bytes(self) -> int:
        """Bytes of the shard files on disk (data plus the .npy headers)."""
        return sum((self.root / f["file"]).stat().st_size for s in self._shards for f in s["files"].values())

    def _map(self, level: str, k: int) -> np.ndarray:
        if os.getpid() != self._pid:  # forked after maps were opened: start afresh
            self._maps, self._pid = {}, os.getpid()
        key = (level, k)
        arr = self._maps.get(key)
        if arr is None:
            arr = np.load(self.root / self._shards[k]["files"][level]["file"], mmap_mode="r")
            self._maps[key] = arr
        return arr

    def locate(self, image_id: str) -> tuple[int, int]:
        try:
            i = self._pos[image_id]
        except KeyError:
            raise ArtifactError(f"{self.root}: image '{image_id}' is not in this repository") from None
        return self._where[i]

    def has(self, image_id: str) -> bool:
        return image_id in self._pos

    def get(self, image_id: str) -> dict[str, np.ndarray]:
        k, j = self.locate(image_id)
        return {lv: self._map(lv, k)[j] for lv in self.levels}

    def get_index(self, i: int) -> dict[str, np.ndarray]:
        return self.get(self.image_ids[i])

    def iter_shards(self, level: str) -> Iterator[np.ndarray]:
        """Each shard's (n, T, C, H, W) map of one level, in image order (for streaming fits)."""
        for k in range(len(self._shards)):
            yield self._map(level, k)
