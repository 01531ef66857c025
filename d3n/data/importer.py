"""`d3n data import`: a VOC / YOLO / COCO dataset into the d3n YOLO layout (see layout.py).

Every image is decoded fully and every box checked against the decoded size before anything is
written. Problems are collected across the whole source: without `skip_bad` the import fails
listing all of them; with it the bad images are left out and listed in DATA/import_report.json.
The dataset is built in a hidden sibling folder and renamed into place when complete.

Splits are train, val and an optional held-out test, from --splits files, the source's own
split folders / files, or a seeded random draw (--val-frac, --test-frac). An empty train split
is refused unless the import is declared evaluation-only: training would otherwise fail later.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from d3n.data.source import Record, Source, detect_format
from d3n.data.splits import EVAL_HINT, REQUIRED, SPLIT_NAMES, check_fracs, from_files, random_split
from d3n.data.validate import FileProblem, Problem, check_box_px, check_image, fail_with, turn_hint
from d3n.errors import DataError

log = logging.getLogger(__name__)
FORMATS = ("voc", "yolo", "coco", "masks")
REPORT = "import_report.json"


@dataclass
class Good:
    rec: Record
    rows: list[tuple[int, float, float, float, float]]  # cls cx cy w h, normalised
    split: str = ""


@dataclass
class Checked:
    good: list[Good] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # each left-out image (or annotation, if no image)
    clipped: int = 0


def read_source(src: Path, fmt: str | None) -> Source:
    from d3n.data.coco import read_coco
    from d3n.data.masks import read_masks
    from d3n.data.voc import read_voc
    from d3n.data.yolo_source import read_yolo

    fmt = fmt or detect_format(src)
    if fmt not in FORMATS:
        raise DataError(f"--format must be one of {', '.join(FORMATS)} (got {fmt})")
    return {"voc": read_voc, "yolo": read_yolo, "coco": read_coco, "masks": read_masks}[fmt](src)


def parse_names(value: str | None) -> list[str] | None:
    """--names: a comma-separated list, or a text file with one class name per line."""
    if not value:
        return None
    path = Path(value)
    names = path.read_text().splitlines() if path.is_file() else value.split(",")
    names = [n.strip() for n in names if n.strip()]
    if len(set(names)) != len(names):
        raise DataError(f"--names: duplicate class names in {value}")
    return names


def _check_record(rec: Record, index: dict[str, int], out: Checked) -> None:
    problems = list(rec.problems)
    rows = []
    if rec.image is not None:  # decoded even when the annotation is bad: report both at once
        try:
            w, h = check_image(rec.image)
        except FileProblem as exc:
            problems.append(exc.problem)
        else:
            if rec.size and rec.size != (w, h):
                problems.append(Problem(rec.ann, f"declares size {rec.size[0]}x{rec.size[1]} but {rec.image.name} "
                                                 f"is {w}x{h}{turn_hint(rec.image, rec.size, (w, h))}"))
            for k, (name, *box) in enumerate(rec.boxes, 1):
                label = f"{rec.image.name} box {k} ({name})"
                if name not in index:
                    problems.append(Problem(rec.ann, f"{label}: unknown class '{name}'"))
                    continue
                if rec.normalised:
                    box = [box[0] * w, box[1] * h, box[2] * w, box[3] * h]
                try:
                    (x0, y0, x1, y1), clipped = check_box_px(tuple(box), w, h, rec.ann, label)
                except FileProblem as exc:
                    problems.append(exc.problem)
                    continue
                out.clipped += clipped
                rows.append((index[name], (x0 + x1) / 2 / w, (y0 + y1) / 2 / h, (x1 - x0) / w, (y1 - y0) / h))
    if problems:
        out.problems += problems
        out.skipped.append(rec.item())
    else:
        out.good.append(Good(rec, rows))


def check_source(source: Source, names: list[str], progress: bool = True) -> Checked:
    from tqdm import tqdm

    index = {n: i for i, n in enumerate(names)}
    out = Checked(problems=list(source.problems), skipped=[str(p.path) for p in source.problems])
    for rec in tqdm(source.records, desc="check", unit="img", disable=not progress):
        _check_record(rec, index, out)
    return out


def _own_split(good: list[Good], val_frac: float | None, seed: int) -> tuple[dict[str, str], str] | None:
    """The source's own split, if it has one and no --val-frac / --test-frac overrides it.

    Its test images stay test; its train/val is kept when it has both, else the rest is split at
    random (a source with train and test folders still gets a val split).
    """
    own = {g.rec.stem: g.rec.split for g in good}
    if not all(own.values()):
        return None
    rest = [s for s, split in own.items() if split != "test"]
    if val_frac is None and {own[s] for s in rest} == {"train", "val"}:
        present = [s for s in SPLIT_NAMES if s in own.values()]
        return dict(own), f"the source's own {'/'.join(present)}"
    if len(rest) == len(own):
        return None  # no test split of its own: the random split below, as before test existed
    frac = 0.2 if val_frac is None else val_frac
    where = {s: "test" for s, split in own.items() if split == "test"} | random_split(rest, frac, seed)
    return where, f"the source's own test; random train/val of the rest, val_frac {frac}, seed {seed}"


def assign_splits(source: Source, good: list[Good], splits_dir: Path | None, val_frac: float | None,
                  seed: int, test_frac: float | None = None, eval_only: bool = False) -> str:
    """Set each good record's split; returns how the split was chosen (for the report)."""
    stems = [g.rec.stem for g in good]
    if splits_dir is not None:
        # an evaluation set may come with test.txt alone: train.txt / val.txt are then optional
        where, problems = from_files(Path(splits_dir), stems, source.image_stems, () if eval_only else REQUIRED)
        fail_with(problems, f"split files in {splits_dir}")
        policy = f"files in {splits_dir}"
    elif eval_only:
        where, policy = dict.fromkeys(stems, "test"), "evaluation only: every image in test"
    elif not test_frac and (own := _own_split(good, val_frac, seed)) is not None:
        where, policy = own  # a --test-frac draws every split at random, over the source's own
    else:
        frac = 0.2 if val_frac is None else val_frac
        where = random_split(stems, frac, seed, test_frac or 0.0)
        policy = f"random, val_frac {frac}{f', test_frac {test_frac}' if test_frac else ''}, seed {seed}"
    for g in good:
        g.split = where[g.rec.stem]
    return policy


def _write(tmp: Path, good: list[Good], names: list[str], progress: bool) -> None:
    from tqdm import tqdm

    from d3n.data.layout import write_data_yaml

    has_test = any(g.split == "test" for g in good)
    for split in ("train", "val", "test") if has_test else ("train", "val"):  # train/val exist even empty
        (tmp / "images" / split).mkdir(parents=True, exist_ok=True)
        (tmp / "labels" / split).mkdir(parents=True, exist_ok=True)
    for g in tqdm(good, desc="copy", unit="img", disable=not progress):
        assert g.rec.image is not None
        shutil.copyfile(g.rec.image, tmp / "images" / g.split / (g.rec.stem + g.rec.image.suffix.lower()))
        lines = "".join(f"{c} {x:.6f} {y:.6f} {w:.6f} {h:.6f}\n" for c, x, y, w, h in g.rows)
        (tmp / "labels" / g.split / f"{g.rec.stem}.txt").write_text(lines)
    write_data_yaml(tmp, names, test=has_test)


def _check_options(splits: Path | None, val_frac: float | None, test_frac: float | None,
                   eval_only: bool) -> None:
    """Option clashes and bad shares, before the (slow) decoding of every image."""
    if eval_only and (val_frac is not None or test_frac is not None):
        raise DataError("--eval-only puts every image in test (or where --splits says): "
                        "drop --val-frac / --test-frac")
    if splits is None and not eval_only:  # with --splits the shares are not used (as before test existed)
        check_fracs(0.2 if val_frac is None else val_frac, test_frac or 0.0)


def _prepare_out(out: Path, force: bool) -> None:
    if out.exists() and not (out.is_dir() and not any(out.iterdir())) and not force:
        raise DataError(f"{out}: already exists and is not empty; pick another --out or pass --force")


def import_dataset(src: str | Path, out: str | Path, fmt: str | None = None, splits: str | Path | None = None,
                   val_frac: float | None = None, seed: int = 0, skip_bad: bool = False,
                   names: list[str] | None = None, force: bool = False, progress: bool = True,
                   test_frac: float | None = None, eval_only: bool = False) -> dict:
    """Import `src` into `out`; returns the report that is also written to OUT/import_report.json.

    Splits are train, val and an optional held-out test. `eval_only` allows an empty train split
    (an evaluation set): without `splits` every image goes to test. Without it an empty train
    split is an error, since training on the dataset would fail much later.
    """
    from d3n.artifacts import atomic_dir, write_json
    from d3n.data.check import count

    src, out = Path(src), Path(out)
    splits = Path(splits) if splits else None
    _check_options(splits, val_frac, test_frac, eval_only)
    if not src.exists():
        raise DataError(f"{src}: no such file or folder")
    _prepare_out(out, force)
    source = read_source(src, fmt)
    names = names or source.names
    checked = check_source(source, names, progress)
    if not skip_bad:
        fail_with(checked.problems, f"import of {src} failed (pass --skip-bad to leave bad images out)")
    if not checked.good:
        raise DataError(f"{src}: empty dataset: no usable images"
                        + (f" ({len(checked.problems)} skipped as bad)" if checked.problems else ""))
    policy = assign_splits(source, checked.good, splits, val_frac, seed, test_frac, eval_only)
    if not eval_only and not any(g.split == "train" for g in checked.good):
        raise DataError(f"{src}: the train split is empty ({policy}); {EVAL_HINT}")
    skipped = sorted(checked.problems, key=lambda p: (str(p.path), p.reason))
    report = {
        "source": str(src), "format": source.format, "names": names, "split": policy,
        "counts": count([(g.split, [r[0] for r in g.rows]) for g in checked.good], names),
        "clipped_boxes": checked.clipped,
        "skipped_count": len(set(checked.skipped)),
        "skipped_files": sorted(set(checked.skipped)),
        "problems": [p.as_dict() for p in skipped],
    }
    with atomic_dir(out) as tmp:
        _write(tmp, checked.good, names, progress)
        write_json(tmp / REPORT, report)
    return report
