"""The synthetic steel-defect generator: determinism, valid exact boxes, class coverage, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from d3n.cli import main
from d3n.data.layout import DatasetLayout
from d3n.data.synth import generate
from d3n.data.synth_shapes import CLASSES
from d3n.errors import DataError


def _files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_bytes(tmp_path):
    a = generate(tmp_path / "a", images=12, size=96, seed=3, progress=False)
    b = generate(tmp_path / "b", images=12, size=96, seed=3, progress=False)
    c = generate(tmp_path / "c", images=12, size=96, seed=4, progress=False)
    fa, fb = _files(a), _files(b)
    assert fa.keys() == fb.keys() and len(fa) >= 2 * 12
    assert all(fa[k] == fb[k] for k in fa)
    assert any(fa[k] != v for k, v in _files(c).items() if k.suffix == ".jpg")


def test_layout_labels_and_class_coverage(tmp_path):
    data = generate(tmp_path / "d", images=30, size=128, seed=0, val_frac=0.2, progress=False)
    layout = DatasetLayout.open(data)
    assert layout.names == CLASSES
    train, val = layout.images("train"), layout.images("val")
    assert len(train) == 24 and len(val) == 6
    seen = set()
    for img in train + val:
        with Image.open(img) as im:
            assert im.size == (128, 128)
        lab = layout.labels(img)
        assert 1 <= len(lab) <= 4
        cls, cx, cy, w, h = lab.T
        assert np.all((cls >= 0) & (cls < 6) & (w > 0) & (h > 0))
        assert np.all(cx - w / 2 >= -1e-6) and np.all(cx + w / 2 <= 1 + 1e-6)
        assert np.all(cy - h / 2 >= -1e-6) and np.all(cy + h / 2 <= 1 + 1e-6)
        seen |= set(cls.astype(int).tolist())
    assert seen == set(range(6))
    assert (data / "preview.png").stat().st_size > 0


def test_boxes_are_tight_around_the_drawn_defect():
    """Each box edge touches a pixel the defect changed: the box is no larger than what was drawn.

    Boxes that intersect another are left out: where a bright and a dark defect overlap their
    contrasts add up and may cancel, so the plain-texture difference says nothing there.
    """
    from d3n.data.synth import DRAWN, render, surface

    size, checked = 128, 0
    for seed in range(8):
        img, boxes = render(size, np.random.default_rng(seed), first_class=seed % 6)
        plain = surface(size, np.random.default_rng(seed))  # the texture's draws come first
        diff = np.abs(img.astype(np.float32) - np.clip(np.rint(plain), 0, 255))
        changed = diff >= DRAWN * 45 - 1  # a drawn pixel carries >= DRAWN of >= 45 grey levels
        for k, (_, x0, y0, x1, y1) in enumerate(boxes):
            if any(min(x1, b[3]) > max(x0, b[1]) and min(y1, b[4]) > max(y0, b[2])
                   for j, b in enumerate(boxes) if j != k):
                continue
            inside = changed[y0:y1, x0:x1]
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
            # just outside the box (and outside other boxes) coverage is < DRAWN: at most DRAWN * 90
            ring = np.zeros_like(changed)
            ring[max(0, y0 - 1):y1 + 1, max(0, x0 - 1):x1 + 1] = True
            ring[y0:y1, x0:x1] = False
            for j, b in enumerate(boxes):
                ring[b[2]:b[4], b[1]:b[3]] &= j == k
            assert not (ring & (diff > DRAWN * 90 + 1)).any()
            checked += 1
    assert checked >= 10


def test_no_test_split_by_default_and_test_frac_adds_one(tmp_path):
    plain = generate(tmp_path / "p", images=10, size=64, seed=2, progress=False)
    assert "test" not in yaml.safe_load((plain / "data.yaml").read_text())
    assert "test_frac" not in json.loads((plain / "synth.json").read_text())  # old datasets still reused
    assert not DatasetLayout.open(plain).has("test") and not (plain / "images" / "test").exists()
    split = generate(tmp_path / "s", images=10, size=64, seed=2, test_frac=0.2, progress=False)
    layout = DatasetLayout.open(split)
    assert yaml.safe_load((split / "data.yaml").read_text())["test"] == "images/test"
    sizes = {s: len(layout.images(s)) for s in ("train", "val", "test")}
    assert sizes == {"train": 6, "val": 2, "test": 2}
    # val is the same images with or without a test split; test takes from train
    assert [p.name for p in layout.images("val")] == [p.name for p in DatasetLayout.open(plain).images("val")]
    with pytest.raises(DataError, match="--test-frac"):
        generate(tmp_path / "x", images=10, size=64, val_frac=0.5, test_frac=0.5, progress=False)


def test_existing_folder_is_reused_or_refused(tmp_path):
    out = generate(tmp_path / "d", images=4, size=64, progress=False)
    stamp = (out / "data.yaml").stat().st_mtime_ns
    assert generate(out, images=4, size=64, progress=False) == out
    assert (out / "data.yaml").stat().st_mtime_ns == stamp  # reused, not rewritten
    with pytest.raises(DataError, match=str(out)):
        generate(out, images=5, size=64, progress=False)
    generate(out, images=5, size=64, overwrite=True, progress=False)
    assert len(DatasetLayout.open(out).images("train")) + len(DatasetLayout.open(out).images("val")) == 5


def test_cli_synth_exit_codes(tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["data", "synth", "--out", str(out), "--images", "6", "--size", "64"]) == 0
    assert DatasetLayout.open(out).nc == 6
    assert main(["data", "synth", "--out", str(out), "--images", "7", "--size", "64"]) == 1
    assert str(out) in capsys.readouterr().err
    assert main(["data", "synth", "--out", str(tmp_path / "t"), "--size", "8"]) == 1
    assert main(["data", "synth", "--out", str(tmp_path / "u"), "--images", "6", "--size", "64",
                 "--test-frac", "0.2"]) == 0
    assert len(DatasetLayout.open(tmp_path / "u").images("test")) == 1


@settings(max_examples=25, deadline=None)
@given(size=st.integers(32, 160), seed=st.integers(0, 2**31 - 1), first=st.integers(0, 5))
def test_render_boxes_inside_image_for_any_size_and_seed(size, seed, first):
    from d3n.data.synth import render

    img, boxes = render(size, np.random.default_rng(seed), first_class=first)
    assert img.shape == (size, size) and img.dtype == np.uint8
    assert 1 <= len(boxes) <= 4 and boxes[0][0] == first
    for cls, x0, y0, x1, y1 in boxes:
        assert 0 <= cls < 6 and 0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size
