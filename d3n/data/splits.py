"""Train/val assignment: from split files (train.txt / val.txt stems) or a seeded random split."""

from __future__ import annotations

import random
from pathlib import Path

from d3n.data.validate import Problem
from d3n.errors import DataError

SPLIT_NAMES = ("train", "val")


def read_split_files(folder: Path) -> dict[str, list[str]]:
    """Stems per split from FOLDER/train.txt and FOLDER/val.txt (one stem or file name per line)."""
    stems = {}
    for split in SPLIT_NAMES:
        path = folder / f"{split}.txt"
        if not path.is_file():
            raise DataError(f"{path}: split file missing (--splits needs train.txt and val.txt)")
        lines = [ln.strip() for ln in path.read_text().splitlines()]
        stems[split] = [Path(ln).stem for ln in lines if ln and not ln.startswith("#")]
    return stems


def from_files(folder: Path, stems: list[str], image_stems: set[str]) -> tuple[dict[str, str], list[Problem]]:
    """Split of each of `stems` as the split files say; problems for any mismatch.

    `image_stems` holds every image found in the source (good or bad): a listed stem outside it
    has no image at all, which is always an error, with or without --skip-bad.
    """
    listed = read_split_files(folder)
    where: dict[str, str] = {}
    problems = []
    for split, names in listed.items():
        path = folder / f"{split}.txt"
        for stem in names:
            if stem in where:
                problems.append(Problem(path, f"'{stem}' is listed in both {where[stem]}.txt and {split}.txt"
                                        if where[stem] != split else f"'{stem}' is listed twice"))
            elif stem not in image_stems:
                problems.append(Problem(path, f"'{stem}' has no image"))
            where.setdefault(stem, split)
    for stem in stems:
        if stem not in where:
            problems.append(Problem(folder, f"'{stem}' is in neither train.txt nor val.txt"))
    return {s: where[s] for s in stems if s in where}, problems


def random_split(stems: list[str], val_frac: float, seed: int) -> dict[str, str]:
    """A seeded shuffle of the sorted stems; val gets round(n * val_frac), at least 1 of n >= 2."""
    if not 0 <= val_frac < 1:
        raise DataError(f"--val-frac must be in [0, 1) (got {val_frac})")
    order = sorted(stems)
    random.Random(seed).shuffle(order)
    n_val = int(round(len(order) * val_frac))
    if len(order) >= 2 and val_frac > 0:
        n_val = min(max(n_val, 1), len(order) - 1)
    val = set(order[:n_val])
    return {s: "val" if s in val else "train" for s in stems}
