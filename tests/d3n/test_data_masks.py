"""Mask datasets (`--format masks`) and defect-free images: import into boxes and empty labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from d3n.data.importer import import_dataset
from d3n.data.layout import DatasetLayout
from d3n.errors import DataError

W, H = 40, 30


def _png(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8), "L").save(path)
    return path


def _image(path: Path, seed: int = 0, w: int = W, h: int = H) -> Path:
    return _png(path, np.random.default_rng(seed).integers(0, 255, (h, w)))


def _mask(path: Path, rects: list[tuple[int, int, int, int, int]], w: int = W, h: int = H) -> Path:
    """rects: (x0, y0, x1, y1, value), pixels x0..x1-1, y0..y1-1."""
    m = np.zeros((h, w), np.uint8)
    for x0, y0, x1, y1, v in rects:
        m[y0:y1, x0:x1] = v
    return _png(path, m)


def _boxes(data: Path) -> dict[str, list[tuple]]:
    layout = DatasetLayout.open(data)
    out = {}
    for split in layout.splits:
        for img in layout.images(split):
            rows = layout.labels(img)
            out[img.stem] = sorted((layout.names[int(c)], round(cx * W - w * W / 2, 3), round(cy * H - h * H / 2, 3),
                                    round(cx * W + w * W / 2, 3), round(cy * H + h * H / 2, 3))
                                   for c, cx, cy, w, h in rows)
    return out


def mvtec(root: Path) -> Path:
    for i in range(3):
        _image(root / "train" / "good" / f"00{i}.png", seed=i)
    _image(root / "test" / "good" / "000.png", seed=9)
    for t, rects in (("scratch", [(2, 3, 10, 6, 255), (20, 10, 30, 20, 255)]), ("hole", [(5, 5, 9, 9, 255)])):
        _image(root / "test" / t / "000.png", seed=len(t))
        _mask(root / "ground_truth" / t / "000_mask.png", rects)
    return root


def test_mvtec_layout_regions_become_boxes_and_good_images_empty_labels(tmp_path):
    report = import_dataset(mvtec(tmp_path / "src"), tmp_path / "out", val_frac=0.2, progress=False)
    assert report["format"] == "masks" and report["names"] == ["hole", "scratch"]
    boxes = _boxes(tmp_path / "out")
    assert boxes["test_scratch_000"] == [("scratch", 2, 3, 10, 6), ("scratch", 20, 10, 30, 20)]
    assert boxes["test_hole_000"] == [("hole", 5, 5, 9, 9)]
    assert all(boxes[s] == [] for s in ("train_good_000", "train_good_001", "train_good_002", "test_good_000"))


def test_ksdd2_layout_keeps_its_test_split_and_defect_free_images(tmp_path):
    src = tmp_path / "src"
    for i in range(4):
        _image(src / "train" / f"1000{i}.png", seed=i)
        _mask(src / "train" / f"1000{i}_GT.png", [(1, 1, 6, 4, 255)] if i % 2 else [])
    _image(src / "test" / "20000.png")
    _mask(src / "test" / "20000_GT.png", [(0, 0, W, H, 1)])  # the whole image; any non-zero value
    report = import_dataset(src, tmp_path / "out", progress=False)
    assert report["names"] == ["defect"]
    layout = DatasetLayout.open(tmp_path / "out")
    assert [p.stem for p in layout.images("test")] == ["20000"]
    boxes = _boxes(tmp_path / "out")
    assert boxes["20000"] == [("defect", 0, 0, W, H)]
    assert boxes["10000"] == [] and boxes["10001"] == [("defect", 1, 1, 6, 4)]


def test_plain_layout_with_label_masks_and_classes(tmp_path):
    src = tmp_path / "src"
    (src / "classes.txt").parent.mkdir(parents=True)
    (src / "classes.txt").write_text("crack\nstain\n")
    for i in range(4):
        _image(src / "images" / f"a{i}.png", seed=i)
        _mask(src / "masks" / f"a{i}.png", [(0, 0, 4, 4, 1), (10, 10, 20, 12, 2)] if i else [])
    import_dataset(src, tmp_path / "out", val_frac=0.25, progress=False)
    boxes = _boxes(tmp_path / "out")
    assert boxes["a1"] == [("crack", 0, 0, 4, 4), ("stain", 10, 10, 20, 12)] and boxes["a0"] == []


def test_mask_problems_name_the_files(tmp_path):
    src = tmp_path / "src"
    (src / "classes.txt").parent.mkdir(parents=True)
    (src / "classes.txt").write_text("crack\n")
    _image(src / "images" / "ok.png")
    _mask(src / "masks" / "ok.png", [(0, 0, 4, 4, 1)])
    _image(src / "images" / "big.png")
    _mask(src / "masks" / "big.png", [(0, 0, 4, 4, 1)], w=W * 2)  # wrong size
    _image(src / "images" / "nomask.png")
    _mask(src / "masks" / "orphan.png", [])
    _image(src / "images" / "badval.png")
    _mask(src / "masks" / "badval.png", [(0, 0, 4, 4, 3)])
    with pytest.raises(DataError) as exc:
        import_dataset(src, tmp_path / "out", progress=False)
    msg = str(exc.value)
    assert "big.png" in msg and f"{W * 2}x{H}" in msg and f"is {W}x{H}" in msg  # both files, both sizes
    assert "nomask.png" in msg and "without its mask" in msg
    assert "orphan.png" in msg and "mask without image" in msg
    assert "badval.png" in msg and "[3]" in msg
    assert not (tmp_path / "out").exists()


def test_voc_image_without_objects_is_a_defect_free_image(tmp_path):
    from test_data_import import _jpeg, _xml

    src = tmp_path / "src"
    for i in range(4):
        _jpeg(src / "IMAGES" / f"im{i}.jpg", seed=i)
        _xml(src / "ANNOTATIONS" / f"im{i}.xml", [("dent", 2, 3, 20, 25)] if i else [])
    import_dataset(src, tmp_path / "out", val_frac=0.25, progress=False)
    assert _boxes(tmp_path / "out")["im0"] == []


def test_rgba_masks_use_colour_not_alpha(tmp_path):
    src = tmp_path / "src"
    for i in range(4):
        _image(src / "images" / f"b{i}.png", seed=i)
        rgba = np.zeros((H, W, 4), np.uint8)
        rgba[..., 3] = 255  # opaque everywhere: alpha must not read as defect
        if i:
            rgba[2:7, 3:9, :3] = 255
        (src / "masks").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgba, "RGBA").save(src / "masks" / f"b{i}.png")
    import_dataset(src, tmp_path / "out", val_frac=0.25, progress=False)
    boxes = _boxes(tmp_path / "out")
    assert boxes["b0"] == [] and boxes["b1"] == [("defect", 3, 2, 9, 7)]
