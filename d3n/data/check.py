"""`d3n data check`: per-class counts per split (test too, if listed), every bad file of a d3n dataset."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from d3n.data.layout import IMAGE_SUFFIXES, DatasetLayout, label_path_for
from d3n.data.validate import FileProblem, Problem, check_image, parse_yolo_label


def count(items: Iterable[tuple[str, list[int]]], names: list[str] | tuple[str, ...]) -> dict:
    """{split: {images, boxes, classes: {name: {images, boxes}}}} from (split, class ids per image)."""
    out: dict[str, dict] = {}
    for split, classes in items:
        s = out.setdefault(split, {"images": 0, "boxes": 0,
                                   "classes": {n: {"images": 0, "boxes": 0} for n in names}})
        s["images"] += 1
        s["boxes"] += len(classes)
        for c in classes:
            s["classes"][names[int(c)]]["boxes"] += 1
        for c in set(int(c) for c in classes):
            s["classes"][names[c]]["images"] += 1
    order = {"train": 0, "val": 1, "test": 2}
    return dict(sorted(out.items(), key=lambda kv: (order.get(kv[0], 2), kv[0])))


def _check_split(layout: DatasetLayout, split: str, folder: Path, problems: list[Problem],
                 items: list, progress: bool) -> None:
    from tqdm import tqdm

    if not folder.is_dir():
        problems.append(Problem(folder, f"split folder for '{split}' missing"))
        return
    stems: dict[str, Path] = {}
    for f in sorted(folder.iterdir()):
        if f.is_file() and not f.name.startswith(".") and f.suffix.lower() not in IMAGE_SUFFIXES:
            problems.append(Problem(f, f"not an image type training reads ({', '.join(IMAGE_SUFFIXES)})"))
    for img in tqdm(layout.images(split), desc=f"check {split}", unit="img", disable=not progress):
        if img.stem in stems:
            problems.append(Problem(img, f"shares its label file with {stems[img.stem].name}"))
        stems.setdefault(img.stem, img)
        try:
            check_image(img)
        except FileProblem as exc:
            problems.append(exc.problem)
        label = label_path_for(img)
        if not label.exists():
            problems.append(Problem(img, f"image without label file (expected {label})"))
            continue
        rows, bad = parse_yolo_label(label, layout.nc)
        problems += bad
        items.append((split, rows[:, 0].astype(int).tolist()))
    labels_dir = label_path_for(folder / "x.jpg").parent
    if labels_dir.is_dir():
        for txt in sorted(labels_dir.glob("*.txt")):
            if txt.stem not in stems:
                problems.append(Problem(txt, f"label without image (no {txt.stem}.* in {folder})"))


def check_dataset(data: str | Path, progress: bool = True) -> tuple[DatasetLayout, dict, list[Problem]]:
    """(layout, counts as in `count`, problems) for the dataset at `data`."""
    layout = DatasetLayout.open(data)
    problems: list[Problem] = []
    items: list[tuple[str, list[int]]] = []
    for split, folder in layout.splits.items():
        _check_split(layout, split, folder, problems, items, progress)
    return layout, count(items, layout.names), sorted(problems, key=lambda p: (str(p.path), p.reason))


def format_counts(counts: dict, names: list[str] | tuple[str, ...]) -> str:
    """A plain table: one row per class, images/boxes per split."""
    splits = list(counts)
    width = max([len("class"), len("all")] + [len(n) for n in names])
    head = f"{'class':<{width}}" + "".join(f"  {s + ' images':>14}{s + ' boxes':>12}" for s in splits)
    lines = [head, "-" * len(head)]
    for n in names:
        lines.append(f"{n:<{width}}" + "".join(
            f"  {counts[s]['classes'][n]['images']:>14}{counts[s]['classes'][n]['boxes']:>12}" for s in splits))
    lines.append(f"{'all':<{width}}" + "".join(f"  {counts[s]['images']:>14}{counts[s]['boxes']:>12}"
                                               for s in splits))
    return "\n".join(lines)
