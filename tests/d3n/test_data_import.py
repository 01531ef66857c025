"""`d3n data import`: NEU-DET with its splits, every bad-input case, --skip-bad, COCO and YOLO sources,
the held-out test split (--splits test.txt, the source's own, --test-frac) and --eval-only."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from d3n.cli import main
from d3n.data.importer import import_dataset
from d3n.data.layout import DatasetLayout
from d3n.errors import DataError

NEU = Path(__file__).resolve().parents[2].parent / "shared" / "datasets" / "NEU-DET"


# ---------------------------------------------------------------- tiny sources built in tmp_path

def _jpeg(path: Path, w: int = 40, h: int = 30, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 255, (h, w), dtype=np.uint8)
    Image.fromarray(arr, "L").save(path, "JPEG", quality=90)
    return path


def _xml(path: Path, objects: list[tuple], w: int = 40, h: int = 30) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    objs = "".join(f"<object><name>{n}</name><bndbox><xmin>{a}</xmin><ymin>{b}</ymin><xmax>{c}</xmax>"
                   f"<ymax>{d}</ymax></bndbox></object>" for n, a, b, c, d in objects)
    path.write_text(f"<annotation><filename>{path.stem}.jpg</filename><size><width>{w}</width>"
                    f"<height>{h}</height><depth>1</depth></size>{objs}</annotation>")
    return path


def voc(root: Path, n: int = 6) -> Path:
    """A valid VOC folder: n images, classes 'dent' and 'crack' (so sorted order differs from first-seen)."""
    for i in range(n):
        _jpeg(root / "IMAGES" / f"im{i}.jpg", seed=i)
        _xml(root / "ANNOTATIONS" / f"im{i}.xml", [("dent", 2, 3, 20, 25), ("crack", 10, 5, 39, 29)][: 1 + i % 2])
    return root


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _fails(src: Path, tmp_path: Path, *names: Path | str, **kw) -> str:
    out = tmp_path / "out"
    with pytest.raises(DataError) as exc:
        import_dataset(src, out, progress=False, **kw)
    msg = str(exc.value)
    for name in names:
        assert str(name) in msg, msg
    assert not out.exists()  # a failed import leaves nothing that looks like a dataset
    assert not list(tmp_path.glob(".out.*"))  # nor its temporary folder
    return msg


# ---------------------------------------------------------------- NEU-DET

@pytest.fixture(scope="module")
def neu(tmp_path_factory):
    if not (NEU / "ANNOTATIONS").is_dir():
        pytest.skip(f"NEU-DET not found at {NEU}")
    out = tmp_path_factory.mktemp("neu") / "data"
    report = import_dataset(NEU, out, splits=NEU / "splits", progress=False)
    return out, report


def test_neu_det_import_with_splits(neu):
    out, report = neu
    layout = DatasetLayout.open(out)
    assert layout.names == tuple(sorted(layout.names)) and layout.nc == 6
    assert len(layout.images("train")) == 1200 and len(layout.images("val")) == 300
    xml_objects = sum(len(re.findall(r"<object>", p.read_text())) for p in (NEU / "ANNOTATIONS").glob("*.xml"))
    boxes = sum(len(layout.labels(p)) for s in ("train", "val") for p in layout.images(s))
    assert boxes == xml_objects
    assert report["counts"]["train"]["boxes"] + report["counts"]["val"]["boxes"] == xml_objects
    val_stems = {ln.strip() for ln in (NEU / "splits" / "val.txt").read_text().split()}
    assert {p.stem for p in layout.images("val")} == val_stems
    first = layout.images("train")[0]
    assert first.read_bytes() == (NEU / "IMAGES" / first.name).read_bytes()  # original bytes kept
    assert report["skipped_count"] == 0 and not report["problems"]


@pytest.fixture(scope="module")
def neu3(tmp_path_factory):
    if not (NEU / "ANNOTATIONS").is_dir() or not (NEU / "splits3" / "test.txt").is_file():
        pytest.skip(f"NEU-DET with splits3/ not found at {NEU} (CI has ../shared beside the checkout)")
    out = tmp_path_factory.mktemp("neu3") / "data"
    report = import_dataset(NEU, out, splits=NEU / "splits3", progress=False)
    return out, report


def test_neu_det_splits3_keeps_the_test_split(neu3):
    """splits3 is the split numbers are reported on: its 150 test images must land in test."""
    out, report = neu3
    layout = DatasetLayout.open(out)
    assert {s: len(layout.images(s)) for s in ("train", "val", "test")} == {"train": 1200, "val": 150, "test": 150}
    assert {s: c["images"] for s, c in report["counts"].items()} == {"train": 1200, "val": 150, "test": 150}
    assert yaml.safe_load((out / "data.yaml").read_text())["test"] == "images/test"
    for split in ("val", "test"):
        listed = set((NEU / "splits3" / f"{split}.txt").read_text().split())
        assert {p.stem for p in layout.images(split)} == listed
    assert report["skipped_count"] == 0 and report["split"] == f"files in {NEU / 'splits3'}"


def test_neu_det_without_test_has_no_test_key(neu):
    out, _ = neu
    layout = DatasetLayout.open(out)
    assert "test" not in yaml.safe_load((out / "data.yaml").read_text())
    assert layout.has("train") and layout.has("val") and not layout.has("test")


# ---------------------------------------------------------------- the good paths

def test_voc_random_split_sorted_names(tmp_path):
    report = import_dataset(voc(tmp_path / "src", n=10), tmp_path / "out", val_frac=0.3, seed=1, progress=False)
    layout = DatasetLayout.open(tmp_path / "out")
    assert layout.names == ("crack", "dent")
    assert len(layout.images("train")) == 7 and len(layout.images("val")) == 3
    (im1,) = [p for s in ("train", "val") for p in layout.images(s) if p.stem == "im1"]
    lab = layout.labels(im1)
    np.testing.assert_allclose(lab[0], [1, 11 / 40, 14 / 30, 18 / 40, 22 / 30], atol=1e-5)  # dent -> 1
    assert json.loads((tmp_path / "out" / "import_report.json").read_text())["format"] == "voc"
    assert report["skipped_count"] == 0


def test_coco_skip_bad_counts_images_not_json_files(tmp_path):
    src = tmp_path / "coco"
    for i in range(3):
        _jpeg(src / f"c{i}.jpg", seed=i)
    spec = {"images": [{"id": i, "file_name": f"c{i}.jpg"} for i in range(3)] + [{"id": 9, "file_name": "gone.jpg"}],
            "annotations": [{"id": 1, "image_id": 0, "category_id": 1, "bbox": [4, 5, 10, 10]},
                            {"id": 2, "image_id": 1, "category_id": 2, "bbox": [4, 5, 10, 10]},
                            {"id": 3, "image_id": 2, "category_id": 1, "bbox": [4, 5, 0, 10]}],
            "categories": [{"id": 1, "name": "a"}]}
    (src / "ann.json").write_text(json.dumps(spec))
    msg = _fails(src, tmp_path, src / "ann.json")
    assert "unknown category_id 2" in msg and "empty box" in msg and "'gone.jpg' not found" in msg
    report = import_dataset(src, tmp_path / "out", skip_bad=True, progress=False)
    assert report["skipped_count"] == 3
    assert report["skipped_files"] == sorted([str(src / "c1.jpg"), str(src / "c2.jpg"), f"{src / 'ann.json'}:gone"])


def test_coco_import(tmp_path):
    src = tmp_path / "coco"
    for i in range(4):
        _jpeg(src / "images" / f"c{i}.jpg", seed=i)
    spec = {
        "images": [{"id": i + 1, "file_name": f"c{i}.jpg", "width": 40, "height": 30} for i in range(4)],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [4, 5, 10, 10]},
                        {"id": 2, "image_id": 2, "category_id": 3, "bbox": [0, 0, 40, 30]},
                        {"id": 3, "image_id": 3, "category_id": 7, "bbox": [1, 1, 2, 2]}],
        "categories": [{"id": 7, "name": "zeta"}, {"id": 3, "name": "alpha"}],
    }
    (src / "annotations").mkdir()
    (src / "annotations" / "instances.json").write_text(json.dumps(spec))
    import_dataset(src, tmp_path / "out", val_frac=0.25, progress=False)
    layout = DatasetLayout.open(tmp_path / "out")
    assert layout.names == ("alpha", "zeta")  # category order by id
    rows = {p.stem: layout.labels(p) for s in ("train", "val") for p in layout.images(s)}
    assert sorted(rows) == ["c0", "c1", "c2", "c3"] and len(rows["c3"]) == 0  # listed, no boxes: empty image
    np.testing.assert_allclose(rows["c0"][0], [1, 9 / 40, 10 / 30, 10 / 40, 10 / 30], atol=1e-5)
    np.testing.assert_allclose(rows["c1"][0], [0, 0.5, 0.5, 1, 1], atol=1e-5)


def _yolo(root: Path) -> Path:
    for split, n in (("train", 3), ("val", 2)):
        for i in range(n):
            _jpeg(root / "images" / split / f"{split}{i}.jpg", seed=i)
            lab = root / "labels" / split / f"{split}{i}.txt"
            lab.parent.mkdir(parents=True, exist_ok=True)
            lab.write_text("1 0.5 0.5 0.2 0.4\n0 0.25 0.25 0.1 0.1\n")
    (root / "data.yaml").write_text(yaml.safe_dump({"names": ["b", "a"], "train": "images/train",
                                                    "val": "images/val"}))
    return root


def test_yolo_import_keeps_names_and_splits(tmp_path):
    import_dataset(_yolo(tmp_path / "y"), tmp_path / "out", progress=False)
    layout = DatasetLayout.open(tmp_path / "out")
    assert layout.names == ("b", "a")  # as given
    assert [p.stem for p in layout.images("val")] == ["val0", "val1"]
    np.testing.assert_allclose(layout.labels(layout.images("train")[0]),
                               [[1, 0.5, 0.5, 0.2, 0.4], [0, 0.25, 0.25, 0.1, 0.1]], atol=1e-5)


# ---------------------------------------------------------------- the held-out test split

def _split_files(folder: Path, **lists: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split, stems in lists.items():
        (folder / f"{split}.txt").write_text("".join(f"{s}\n" for s in stems))
    return folder


def _stems(out: Path) -> dict[str, set[str]]:
    layout = DatasetLayout.open(out)
    return {s: {p.stem for p in layout.images(s)} for s in layout.splits}


def test_voc_split_files_with_test(tmp_path):
    src = voc(tmp_path / "src", n=6)
    splits = _split_files(tmp_path / "splits", train=["im0", "im1", "im2"], val=["im3"], test=["im4", "im5"])
    report = import_dataset(src, tmp_path / "out", splits=splits, progress=False)
    assert _stems(tmp_path / "out") == {"train": {"im0", "im1", "im2"}, "val": {"im3"}, "test": {"im4", "im5"}}
    spec = yaml.safe_load((tmp_path / "out" / "data.yaml").read_text())
    assert (spec["train"], spec["val"], spec["test"]) == ("images/train", "images/val", "images/test")
    assert list(report["counts"]) == ["train", "val", "test"] and report["counts"]["test"]["images"] == 2
    assert report["counts"]["test"]["boxes"] == 1 + 2  # im4: one box, im5: two
    layout = DatasetLayout.open(tmp_path / "out")
    assert [len(layout.labels(p)) for p in layout.images("test")] == [1, 2]


def test_split_files_stem_in_two_files_or_in_none(tmp_path):
    src = voc(tmp_path / "src", n=4)
    splits = _split_files(tmp_path / "splits", train=["im0", "im1"], val=["im2"], test=["im1"])
    msg = _fails(src, tmp_path, splits / "test.txt", splits=splits)
    assert "'im1' is listed in both train.txt and test.txt" in msg
    assert "'im3' is in none of train.txt, val.txt, test.txt" in msg


def test_split_files_need_train_and_val_unless_eval_only(tmp_path):
    src = voc(tmp_path / "src", n=3)
    splits = _split_files(tmp_path / "splits", test=["im0", "im1", "im2"])
    _fails(src, tmp_path, splits / "train.txt", "split file missing", splits=splits)
    import_dataset(src, tmp_path / "out", splits=splits, eval_only=True, progress=False)
    assert _stems(tmp_path / "out") == {"train": set(), "val": set(), "test": {"im0", "im1", "im2"}}


def _yolo_test(root: Path, key: bool) -> Path:
    _yolo(root)
    for i in range(2):
        _jpeg(root / "images" / "test" / f"test{i}.jpg", seed=10 + i)
        (root / "labels" / "test").mkdir(parents=True, exist_ok=True)
        (root / "labels" / "test" / f"test{i}.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    if key:
        spec = yaml.safe_load((root / "data.yaml").read_text()) | {"test": "images/test"}
        (root / "data.yaml").write_text(yaml.safe_dump(spec))
    return root


@pytest.mark.parametrize("key", [True, False], ids=["test-key", "images-test-folder"])
def test_yolo_keeps_its_test_split(tmp_path, key):
    report = import_dataset(_yolo_test(tmp_path / "y", key), tmp_path / "out", progress=False)
    assert _stems(tmp_path / "out") == {"train": {"train0", "train1", "train2"}, "val": {"val0", "val1"},
                                        "test": {"test0", "test1"}}
    assert report["split"] == "the source's own train/val/test"
    layout = DatasetLayout.open(tmp_path / "out")
    np.testing.assert_allclose(layout.labels(layout.images("test")[0]), [[0, 0.5, 0.5, 0.2, 0.2]])


def test_yolo_own_test_kept_when_val_is_redrawn(tmp_path):
    import_dataset(_yolo_test(tmp_path / "y", True), tmp_path / "out", val_frac=0.4, seed=3, progress=False)
    stems = _stems(tmp_path / "out")
    assert stems["test"] == {"test0", "test1"} and len(stems["val"]) == 2 and len(stems["train"]) == 3


def _coco_split(src: Path, split: str, n: int, cats: list[dict] | None = None) -> None:
    folder = src / f"{split}2017"
    for i in range(n):
        _jpeg(folder / f"{split}{i}.jpg", seed=i)
    spec = {"images": [{"id": i, "file_name": f"{split}{i}.jpg"} for i in range(n)],
            "annotations": [{"id": i, "image_id": i, "category_id": 1, "bbox": [4, 5, 10, 10]} for i in range(n)],
            "categories": cats or [{"id": 1, "name": "dent"}]}
    (src / "annotations").mkdir(parents=True, exist_ok=True)
    (src / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(spec))


def test_coco_json_per_split_keeps_test(tmp_path):
    src = tmp_path / "coco"
    for split, n in (("train", 3), ("val", 2), ("test", 2)):
        _coco_split(src, split, n)
    report = import_dataset(src, tmp_path / "out", progress=False)
    assert _stems(tmp_path / "out") == {"train": {"train0", "train1", "train2"}, "val": {"val0", "val1"},
                                        "test": {"test0", "test1"}}
    assert report["counts"]["test"]["boxes"] == 2 and report["names"] == ["dent"]


def test_coco_json_per_split_must_agree_on_categories(tmp_path):
    src = tmp_path / "coco"
    _coco_split(src, "train", 2)
    _coco_split(src, "test", 1, cats=[{"id": 1, "name": "crack"}])
    _fails(src, tmp_path, src / "annotations" / "instances_train2017.json", "categories differ")


def test_coco_several_jsons_without_split_names(tmp_path):
    src = tmp_path / "coco"
    _coco_split(src, "train", 2)
    (src / "annotations" / "instances_train2017.json").rename(src / "annotations" / "a.json")
    _coco_split(src, "val", 1)
    (src / "annotations" / "instances_val2017.json").rename(src / "annotations" / "b.json")
    _fails(src, tmp_path, "a.json", "b.json", "one per split")


def test_test_frac_gives_disjoint_seeded_splits(tmp_path):
    src = voc(tmp_path / "src", n=20)
    kw = {"val_frac": 0.2, "test_frac": 0.25, "progress": False}
    report = import_dataset(src, tmp_path / "a", seed=7, **kw)
    import_dataset(src, tmp_path / "b", seed=7, **kw)
    import_dataset(src, tmp_path / "c", seed=8, **kw)
    a, b, c = (_stems(tmp_path / n) for n in "abc")
    assert a == b and a != c  # seeded
    assert {s: len(v) for s, v in a.items()} == {"train": 11, "val": 4, "test": 5}
    assert not (a["val"] & a["test"]) and set().union(*a.values()) == {f"im{i}" for i in range(20)}
    assert report["split"] == "random, val_frac 0.2, test_frac 0.25, seed 7"
    # val is drawn exactly as without --test-frac: test takes only from what was train
    import_dataset(src, tmp_path / "d", seed=7, val_frac=0.2, progress=False)
    assert _stems(tmp_path / "d")["val"] == a["val"] and not DatasetLayout.open(tmp_path / "d").has("test")


def test_test_frac_zero_is_the_split_without_it(tmp_path):
    src = voc(tmp_path / "src", n=10)
    import_dataset(src, tmp_path / "a", seed=1, progress=False)
    import_dataset(src, tmp_path / "b", seed=1, test_frac=0.0, progress=False)
    assert _stems(tmp_path / "a") == _stems(tmp_path / "b")
    assert (tmp_path / "a" / "data.yaml").read_text() == (tmp_path / "b" / "data.yaml").read_text()


def test_eval_only_puts_everything_in_test(tmp_path):
    src = voc(tmp_path / "src", n=5)
    report = import_dataset(src, tmp_path / "out", eval_only=True, progress=False)
    layout = DatasetLayout.open(tmp_path / "out")
    assert _stems(tmp_path / "out") == {"train": set(), "val": set(), "test": {f"im{i}" for i in range(5)}}
    assert layout.has("train") and layout.has("test")  # empty train/val folders: ultralytics needs the keys
    assert list(report["counts"]) == ["test"] and report["split"] == "evaluation only: every image in test"


def test_empty_train_without_eval_only_says_how(tmp_path):
    src = voc(tmp_path / "src", n=4)
    assert "--eval-only" in _fails(src, tmp_path, "--val-frac", val_frac=1.0)
    assert "--eval-only" in _fails(src, tmp_path, "--test-frac", val_frac=0.5, test_frac=0.5)
    splits = _split_files(tmp_path / "splits", train=[], val=[], test=["im0", "im1", "im2", "im3"])
    assert "--eval-only" in _fails(src, tmp_path, src, "the train split is empty", splits=splits)
    import_dataset(src, tmp_path / "ok", splits=splits, eval_only=True, progress=False)
    assert len(DatasetLayout.open(tmp_path / "ok").images("test")) == 4


def test_yolo_test_only_source_needs_eval_only(tmp_path):
    src = _yolo_test(tmp_path / "y", True)
    spec = yaml.safe_load((src / "data.yaml").read_text())
    (src / "data.yaml").write_text(yaml.safe_dump({"names": spec["names"], "test": "images/test"}))
    assert "--eval-only" in _fails(src, tmp_path, "the train split is empty")
    import_dataset(src, tmp_path / "out", eval_only=True, progress=False)
    assert _stems(tmp_path / "out")["test"] == {"test0", "test1"}


def test_eval_only_refuses_shares(tmp_path):
    _fails(voc(tmp_path / "src", n=2), tmp_path, "--eval-only", eval_only=True, val_frac=0.5)


# ---------------------------------------------------------------- every bad input names the file

def test_truncated_image(tmp_path):
    src = voc(tmp_path / "src")
    _truncate(src / "IMAGES" / "im2.jpg")
    assert "truncated" in _fails(src, tmp_path, src / "IMAGES" / "im2.jpg")


def test_unreadable_image(tmp_path):
    src = voc(tmp_path / "src")
    (src / "IMAGES" / "im3.jpg").write_bytes(b"not an image at all")
    _fails(src, tmp_path, src / "IMAGES" / "im3.jpg")


def test_annotation_without_image(tmp_path):
    src = voc(tmp_path / "src")
    (src / "IMAGES" / "im1.jpg").unlink()
    assert "annotation without image" in _fails(src, tmp_path, src / "ANNOTATIONS" / "im1.xml")


def test_image_without_annotation(tmp_path):
    src = voc(tmp_path / "src")
    (src / "ANNOTATIONS" / "im4.xml").unlink()
    assert "image without annotation" in _fails(src, tmp_path, src / "IMAGES" / "im4.jpg")


def test_box_out_of_bounds(tmp_path):
    src = voc(tmp_path / "src")
    _xml(src / "ANNOTATIONS" / "im0.xml", [("dent", 2, 3, 45, 25)])  # image is 40 wide
    assert "outside the 40x30 image" in _fails(src, tmp_path, src / "ANNOTATIONS" / "im0.xml")


def test_box_within_one_pixel_is_clipped_and_counted(tmp_path):
    src = voc(tmp_path / "src")
    _xml(src / "ANNOTATIONS" / "im0.xml", [("dent", 0, 0, 40.6, 30)])
    report = import_dataset(src, tmp_path / "out", progress=False)
    assert report["clipped_boxes"] == 1


def test_declared_size_differs_from_image(tmp_path):
    src = voc(tmp_path / "src")
    _xml(src / "ANNOTATIONS" / "im1.xml", [("dent", 2, 3, 20, 25)], w=50, h=50)
    assert "declares size 50x50 but im1.jpg is 40x30" in _fails(src, tmp_path, src / "ANNOTATIONS" / "im1.xml")


def _turned(path: Path, orientation: int, w: int = 40, h: int = 30) -> Path:
    """An image stored w x h whose EXIF orientation tag says how to turn it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8))
    exif = im.getexif()
    exif[0x0112] = orientation
    im.save(path, exif=exif.tobytes())
    return path


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_image_size_is_what_opencv_reads(tmp_path, suffix, orientation):
    # every stage decodes with OpenCV, which applies the EXIF orientation: sizes checked at import,
    # masks and augmentation must be those of the turned image, or boxes land on the wrong pixels
    import cv2

    from d3n.data.validate import check_image, image_size

    path = _turned(tmp_path / f"im{suffix}", orientation)
    h, w = cv2.imread(str(path), cv2.IMREAD_COLOR).shape[:2]
    assert check_image(path) == image_size(path) == (w, h)
    assert (w, h) == ((30, 40) if orientation >= 5 else (40, 30))


def test_voc_size_of_the_stored_pixels_of_a_turned_image_says_so(tmp_path):
    src = voc(tmp_path / "src")
    _turned(src / "IMAGES" / "im1.jpg", 6)  # stored 40x30, read 30x40; the XML says 40x30
    msg = _fails(src, tmp_path, src / "ANNOTATIONS" / "im1.xml")
    assert "declares size 40x30 but im1.jpg is 30x40 once its EXIF orientation (6) is applied" in msg


def test_unsupported_image_type(tmp_path):
    src = voc(tmp_path / "src")
    (src / "IMAGES" / "im2.jpg").rename(src / "IMAGES" / "im2.tif")
    assert "im2.tif: unsupported image type" in _fails(src, tmp_path, src / "ANNOTATIONS" / "im2.xml")


def test_empty_box(tmp_path):
    src = voc(tmp_path / "src")
    _xml(src / "ANNOTATIONS" / "im5.xml", [("dent", 10, 3, 10, 25)])
    assert "empty box" in _fails(src, tmp_path, src / "ANNOTATIONS" / "im5.xml")


def test_unknown_class_with_names(tmp_path):
    src = voc(tmp_path / "src")
    _xml(src / "ANNOTATIONS" / "im2.xml", [("rust", 2, 3, 20, 25)])
    msg = _fails(src, tmp_path, src / "ANNOTATIONS" / "im2.xml", names=["crack", "dent"])
    assert "unknown class 'rust'" in msg


def test_malformed_xml(tmp_path):
    src = voc(tmp_path / "src")
    (src / "ANNOTATIONS" / "im3.xml").write_text("<annotation><object><name>dent</name>")
    assert "malformed XML" in _fails(src, tmp_path, src / "ANNOTATIONS" / "im3.xml")


def test_malformed_json(tmp_path):
    src = tmp_path / "coco"
    _jpeg(src / "images" / "a.jpg")
    (src / "ann.json").write_text('{"images": [], "annotations": [')
    assert "malformed JSON" in _fails(src / "ann.json", tmp_path, src / "ann.json")


def test_empty_dataset(tmp_path):
    src = tmp_path / "src"
    (src / "IMAGES").mkdir(parents=True)
    (src / "ANNOTATIONS").mkdir()
    assert "empty dataset" in _fails(src, tmp_path, src)


def test_yolo_bad_rows_and_unknown_class_id(tmp_path):
    src = _yolo(tmp_path / "y")
    bad = src / "labels" / "train" / "train1.txt"
    bad.write_text("0 0.5 0.5 0.2\n5 0.5 0.5 0.2 0.2\n0 0.9 0.5 0.4 0.2\n")
    msg = _fails(src, tmp_path, bad)
    assert "line 1: expected 5 values" in msg and "line 2: unknown class id 5" in msg
    assert "line 3: box" in msg and "outside" in msg


def test_split_file_stem_without_image(tmp_path):
    src = voc(tmp_path / "src", n=4)
    splits = tmp_path / "splits"
    splits.mkdir()
    (splits / "train.txt").write_text("im0\nim1\nim2\n")
    (splits / "val.txt").write_text("im3\nghost\n")
    assert "'ghost' has no image" in _fails(src, tmp_path, splits / "val.txt", splits=splits)


def test_all_problems_listed_together(tmp_path):
    src = voc(tmp_path / "src", n=8)
    _truncate(src / "IMAGES" / "im0.jpg")
    (src / "IMAGES" / "im1.jpg").unlink()
    _xml(src / "ANNOTATIONS" / "im2.xml", [("dent", 2, 3, 99, 25)])
    (src / "ANNOTATIONS" / "im3.xml").write_text("<oops")
    _truncate(src / "IMAGES" / "im3.jpg")  # bad annotation and bad image: both reported
    msg = _fails(src, tmp_path, "im0.jpg", "im1.xml", "im2.xml", "im3.xml", "im3.jpg")
    assert "5 problem(s)" in msg


def test_skip_bad_imports_the_rest_and_reports(tmp_path):
    src = voc(tmp_path / "src", n=8)
    _truncate(src / "IMAGES" / "im0.jpg")
    (src / "ANNOTATIONS" / "im5.xml").write_text("<oops")
    report = import_dataset(src, tmp_path / "out", skip_bad=True, progress=False)
    layout = DatasetLayout.open(tmp_path / "out")
    kept = {p.stem for s in ("train", "val") for p in layout.images(s)}
    assert kept == {f"im{i}" for i in (1, 2, 3, 4, 6, 7)}
    on_disk = json.loads((tmp_path / "out" / "import_report.json").read_text())
    assert on_disk["skipped_count"] == report["skipped_count"] == 2
    assert on_disk["skipped_files"] == [str(src / "IMAGES" / "im0.jpg"), str(src / "IMAGES" / "im5.jpg")]
    files = {item["file"] for item in on_disk["problems"]}
    assert files == {str(src / "IMAGES" / "im0.jpg"), str(src / "ANNOTATIONS" / "im5.xml")}


# ---------------------------------------------------------------- CLI

def test_cli_import_exit_codes(tmp_path, capsys):
    src = voc(tmp_path / "src", n=6)
    assert main(["data", "import", str(src), "--out", str(tmp_path / "a"), "--seed", "2"]) == 0
    assert main(["data", "import", str(src), "--out", str(tmp_path / "a")]) == 1  # exists, no --force
    assert main(["data", "import", str(src), "--out", str(tmp_path / "a"), "--force", "--names", "dent,crack,rust"]) == 0
    assert DatasetLayout.open(tmp_path / "a").names == ("dent", "crack", "rust")  # --names order kept
    assert main(["data", "import", str(src), "--out", str(tmp_path / "c"), "--names", "dent"]) == 1
    assert "unknown class 'crack'" in capsys.readouterr().err
    _truncate(src / "IMAGES" / "im4.jpg")
    assert main(["data", "import", str(src), "--out", str(tmp_path / "b"), "--format", "voc"]) == 1
    assert str(src / "IMAGES" / "im4.jpg") in capsys.readouterr().err
    assert main(["data", "import", str(src), "--out", str(tmp_path / "b"), "--skip-bad"]) == 0
    out = capsys.readouterr().out
    assert "skipped 1 bad image(s)" in out and str(src / "IMAGES" / "im4.jpg") in out


def test_cli_import_test_frac_and_eval_only(tmp_path, capsys):
    src = voc(tmp_path / "src", n=10)
    assert main(["data", "import", str(src), "--out", str(tmp_path / "a"), "--test-frac", "0.2"]) == 0
    assert "test images" in capsys.readouterr().out  # the counts table has a test column
    assert len(DatasetLayout.open(tmp_path / "a").images("test")) == 2
    assert main(["data", "import", str(src), "--out", str(tmp_path / "b"), "--val-frac", "1.0"]) == 1
    assert "--eval-only" in capsys.readouterr().err
    assert main(["data", "import", str(src), "--out", str(tmp_path / "b"), "--eval-only"]) == 0
    assert len(DatasetLayout.open(tmp_path / "b").images("test")) == 10


def test_cli_offers_every_format_the_importer_reads():
    from d3n.data.cli import FORMATS as OFFERED
    from d3n.data.importer import FORMATS as READ

    assert OFFERED == READ
