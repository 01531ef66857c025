"""`d3n data check`: counts per class and split, and every bad file of a YOLO-layout dataset."""

from __future__ import annotations

import pytest

from d3n.cli import main
from d3n.data.check import check_dataset
from d3n.data.layout import DatasetLayout
from d3n.data.synth import generate


@pytest.fixture
def data(tmp_path):
    return generate(tmp_path / "d", images=12, size=64, seed=5, val_frac=0.25, progress=False)


def test_clean_dataset_counts(data):
    layout, counts, problems = check_dataset(data, progress=False)
    assert problems == []
    total = sum(len(layout.labels(p)) for s in ("train", "val") for p in layout.images(s))
    assert counts["train"]["images"] == 9 and counts["val"]["images"] == 3
    assert counts["train"]["boxes"] + counts["val"]["boxes"] == total
    per_class = sum(c["boxes"] for s in counts.values() for c in s["classes"].values())
    assert per_class == total


def test_test_split_is_counted_and_checked(tmp_path):
    data = generate(tmp_path / "t", images=20, size=64, seed=1, val_frac=0.2, test_frac=0.25, progress=False)
    layout, counts, problems = check_dataset(data, progress=False)
    assert problems == [] and layout.has("test")
    assert list(counts) == ["train", "val", "test"]
    assert {s: c["images"] for s, c in counts.items()} == {"train": 11, "val": 4, "test": 5}
    bad = layout.label_path(layout.images("test")[0])
    bad.write_text("7 0.5 0.5 0.1 0.1\n")
    _, _, problems = check_dataset(data, progress=False)
    assert [p.path for p in problems] == [bad] and "unknown class id 7" in problems[0].reason


def test_listed_test_folder_missing_is_a_problem(tmp_path):
    data = generate(tmp_path / "t", images=6, size=64, seed=1, test_frac=0.2, progress=False)
    (data / "images" / "test").rename(data / "gone")
    _, _, problems = check_dataset(data, progress=False)
    assert any("split folder for 'test' missing" in p.reason for p in problems)


def test_finds_corrupt_label_truncated_image_and_orphan_label(data):
    layout = DatasetLayout.open(data)
    img_bad, img_trunc = layout.images("train")[:2]
    label = layout.label_path(img_bad)
    label.write_text("0 0.5 0.5 0.1 0.1\n3 0.5 abc 0.1 0.1\n9 0.5 0.5 0.1 0.1\n")
    raw = img_trunc.read_bytes()
    img_trunc.write_bytes(raw[: len(raw) // 2])
    orphan = data / "labels" / "val" / "nobody.txt"
    orphan.write_text("0 0.5 0.5 0.1 0.1\n")
    _, _, problems = check_dataset(data, progress=False)
    text = [str(p) for p in problems]
    assert any(str(label) in t and "line 2: not numeric" in t for t in text)
    assert any(str(label) in t and "line 3: unknown class id 9" in t for t in text)
    assert any(str(img_trunc) in t and "truncated" in t for t in text)
    assert any(str(orphan) in t and "label without image" in t for t in text)
    assert len(problems) == 4


def test_image_without_label(data):
    layout = DatasetLayout.open(data)
    img = layout.images("val")[0]
    layout.label_path(img).unlink()
    _, _, problems = check_dataset(data, progress=False)
    assert [p.path for p in problems] == [img] and "without label" in problems[0].reason


def test_cli_check_exit_codes(data, capsys):
    assert main(["data", "check", str(data)]) == 0
    out = capsys.readouterr().out
    assert "crazing" in out and "no problems found" in out and "test images" not in out
    label = DatasetLayout.open(data).label_path(DatasetLayout.open(data).images("train")[0])
    label.write_text("0 1.5 0.5 0.2 0.2\n")
    assert main(["data", "check", str(data)]) == 1
    out = capsys.readouterr().out
    assert str(label) in out and "outside [0, 1]" in out
    assert main(["data", "check", str(data.parent / "missing")]) == 1  # no data.yaml: DataError
