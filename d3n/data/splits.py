"""Train/val/test assignment: from split files (train.txt / val.txt / test.txt stems) or a seeded random split."""

from __future__ import annotations

import random
from pathlib import Path

from d3n.data.validate import Problem
from d3n.errors import DataError

SPLIT_NAMES = ("train", "val", "test")
REQUIRED = ("train", "val")  # test.txt is optional: most split folders (NEU-DET's splits/) have none
EVAL_HINT = ("to import an evaluation-only set (no training images) pass --eval-only: every image then "
             "goes to test, or to the split files --splits gives")


def read_split_files(folder: Path, required: tuple[str, ...] = REQUIRED) -> dict[str, list[str]]:
    """Stems per split from FOLDER/<split>.txt (one stem or file name per line); absent optional files are left out."""
    if not folder.is_dir():
        raise DataError(f"{folder}: --splits must be a folder holding train.txt, val.txt and optionally test.txt")
    stems = {}
    for split in SPLIT_NAMES:
        path = folder / f"{split}.txt"
        if not path.is_file():
            if split in required:
                raise DataError(f"{path}: split file missing (--splits needs {' and '.join(f'{s}.txt' for s in required)}"
                                ", test.txt is optional)")
            continue
        lines = [ln.strip() for ln in path.read_text().splitlines()]
        stems[split] = [Path(ln).stem for ln in lines if ln and not ln.startswith("#")]
    if not stems:
        raise DataError(f"{folder}: no split files (expected train.txt, val.txt or test.txt)")
    return stems


def from_files(folder: Path, stems: list[str], image_stems: set[str],
               required: tuple[str, ...] = REQUIRED) -> tuple[dict[str, str], list[Problem]]:
    """Split of each of `stems` as the split files say; problems for any mismatch.

    `image_stems` holds every image found in the source (good or bad): a listed stem outside it
    has no image at all, which is always an error, with or without --skip-bad.
    """
    listed = read_split_files(folder, required)
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
    files = [f"{s}.txt" for s in listed]
    where_not = {1: f"not in {files[0]}", 2: f"in neither {' nor '.join(files)}"}.get(
        len(files), f"in none of {', '.join(files)}")
    for stem in stems:
        if stem not in where:
            problems.append(Problem(folder, f"'{stem}' is {where_not}"))
    return {s: where[s] for s in stems if s in where}, problems


def check_fracs(val_frac: float, test_frac: float = 0.0) -> None:
    """Both shares in [0, 1) and together below 1: a random split always keeps some training images."""
    for flag, frac in (("--val-frac", val_frac), ("--test-frac", test_frac)):
        if not 0 <= frac < 1:
            raise DataError(f"{flag} must be in [0, 1) (got {frac})" + (f"; {EVAL_HINT}" if frac >= 1 else ""))
    if val_frac + test_frac >= 1:
        raise DataError(f"--val-frac {val_frac} + --test-frac {test_frac} leaves no training images "
                        f"(their sum must be below 1); {EVAL_HINT}")


def test_count(n: int, n_val: int, test_frac: float) -> int:
    """round(n * test_frac), at least 1 when test_frac > 0, never taking the last training image."""
    room = n - n_val - 1  # images test may take while train keeps one
    n_test = int(round(n * test_frac))
    if test_frac > 0 and room >= 1:
        n_test = max(n_test, 1)
    return max(min(n_test, room), 0)


def random_split(stems: list[str], val_frac: float, seed: int, test_frac: float = 0.0) -> dict[str, str]:
    """A seeded shuffle of the sorted stems: val takes the first round(n * val_frac), at least 1 of
    n >= 2; test the next round(n * test_frac), at least 1 when there is room; train the rest.

    Val is drawn exactly as before test existed, so a split without test is unchanged.
    """
    check_fracs(val_frac, test_frac)
    order = sorted(stems)
    random.Random(seed).shuffle(order)
    n_val = int(round(len(order) * val_frac))
    if len(order) >= 2 and val_frac > 0:
        n_val = min(max(n_val, 1), len(order) - 1)
    n_test = test_count(len(order), n_val, test_frac)
    where = dict.fromkeys(order[:n_val], "val") | dict.fromkeys(order[n_val:n_val + n_test], "test")
    return {s: where.get(s, "train") for s in stems}
