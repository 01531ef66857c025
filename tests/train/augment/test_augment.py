"""`d3n augment`: four methods and a control, one interface; train split only; exact outside the mask; resumable."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from d3n.artifacts import read_json
from d3n.cli import main
from d3n.data.layout import DatasetLayout
from d3n.errors import ConfigError, DataError
from d3n.train.augment import methods
from d3n.train.augment.augment import PLAN, augment, plan_counts
from d3n.train.augment.params import Params

FAST = Params(steps=5)


def _files(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _rgb(path: Path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


def _user_mask(two_class: Path, tmp_path: Path) -> tuple[Path, Path, np.ndarray]:
    """A mask folder with one ellipse on a defect-free train image."""
    layout = DatasetLayout.open(two_class)
    target = next(p for p in layout.images("train") if not len(layout.labels(p)))
    mask = np.zeros((64, 64), np.uint8)
    cv2.ellipse(mask, ((30, 26), (18, 12), 0), 255, -1)
    folder = tmp_path / "masks"
    folder.mkdir()
    cv2.imwrite(str(folder / f"{target.stem}.png"), mask)
    return folder, target, mask > 0


def test_paste_writes_train_only_is_deterministic_and_sheets_for_review(two_class, tmp_path):
    kw = {"masks": "random", "seed": 3, "progress": False}
    a = augment(two_class, tmp_path / "a", "paste", {"bright": 2, "dark": 1}, **kw)
    augment(two_class, tmp_path / "b", "paste", {"bright": 2, "dark": 1}, **kw)
    assert a["kept"] == 3 and a["per_class"] == {"bright": 2, "dark": 1}
    assert _files(tmp_path / "a" / "images" / "train") == _files(tmp_path / "b" / "images" / "train")
    for split in ("val", "test"):  # untouched: a generated image never chooses or reports
        assert _files(tmp_path / "a" / "images" / split) == _files(two_class / "images" / split)
        assert _files(tmp_path / "a" / "labels" / split) == _files(two_class / "labels" / split)
    state = read_json(tmp_path / "a" / PLAN)
    for item in state["items"]:
        rows = np.loadtxt(tmp_path / "a" / "labels" / "train" / item["image"].replace(".png", ".txt"), ndmin=2)
        x0, y0, x1, y1 = item["box"]
        assert [int(rows[-1][0])] == [["bright", "dark"].index(item["class"])]
        assert rows[-1][1:] == pytest.approx([(x0 + x1) / 128, (y0 + y1) / 128, (x1 - x0) / 64, (y1 - y0) / 64], abs=1e-5)
    assert read_json(tmp_path / "a" / "versions.json")["versions"][-1]["added"]["train"] == \
        [it["image"].removesuffix(".png") for it in state["items"]]
    for name in ("bright", "dark"):
        sheet = cv2.imread(str(tmp_path / "a" / "contact_sheets" / f"{name}.png"))
        assert sheet is not None and sheet.shape[0] >= 128  # real row + generated row


def test_each_region_of_a_user_mask_is_a_place_with_its_own_box(two_class, tmp_path):
    """Two blobs in one mask are two places (one box each, never one box around both); a blob on
    the image border loses its outermost pixel ring and still pastes (Poisson cloning needs a border)."""
    folder, target, _ = _user_mask(two_class, tmp_path)
    mask = np.zeros((64, 64), np.uint8)
    mask[8:16, 8:20] = 255
    mask[0:10, 50:64] = 255  # touches the top and right borders
    mask[40, 40] = 255  # a stray pixel: a speck, not a place
    cv2.imwrite(str(folder / f"{target.stem}.png"), mask)
    r = augment(two_class, tmp_path / "out", "paste", {"bright": 6}, masks=str(folder), seed=0, progress=False)
    assert r["kept"] == 6
    boxes = {tuple(it["box"]) for it in read_json(tmp_path / "out" / PLAN)["items"]}
    assert boxes == {(8, 8, 20, 16), (50, 1, 63, 10)}
    edge = np.zeros((64, 64), np.uint8)
    edge[0, :] = 255
    cv2.imwrite(str(folder / f"{target.stem}.png"), edge)
    with pytest.raises(DataError, match=rf"{target.stem}\.png: no region of the mask is 4 x 4 pixels"):
        augment(two_class, tmp_path / "o2", "paste", {"bright": 1}, masks=str(folder), progress=False)
    assert not (tmp_path / "o2").exists()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["inpaint", "blend"])
def test_generated_region_only_changes(method, two_class, generator_run, tmp_path):
    folder, target, mask = _user_mask(two_class, tmp_path)
    augment(two_class, tmp_path / "out", method, {"dark": 1}, masks=str(folder), generator=generator_run,
            params=FAST, progress=False)
    item = read_json(tmp_path / "out" / PLAN)["items"][0]
    new, old = _rgb(tmp_path / "out" / "images" / "train" / item["image"]), _rgb(target)
    ys, xs = np.nonzero(mask)
    assert item["box"] == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]  # the box is the mask's box
    if method == "inpaint":
        outside = ~mask
    else:  # blend: the transition band around the mask may change too, nothing beyond it
        band = int(np.ceil(max(2.0, 0.25 * min(np.ptp(xs) + 1, np.ptp(ys) + 1)))) + 1
        outside = cv2.dilate(mask.astype(np.uint8), np.ones((2 * band + 1,) * 2, np.uint8)) == 0
    assert np.array_equal(new[outside], old[outside])  # bit for bit
    assert not np.array_equal(new[mask], old[mask])


@pytest.mark.slow
def test_sdedit_redraws_a_real_defect_in_its_box(two_class, generator_run, tmp_path):
    r = augment(two_class, tmp_path / "out", "sdedit", {"bright": 2}, masks="boxes", generator=generator_run,
                params=FAST, progress=False)
    assert r["kept"] == 2
    for item in read_json(tmp_path / "out" / PLAN)["items"]:
        rows = np.loadtxt(tmp_path / "out" / "labels" / "train" / item["image"].replace(".png", ".txt"), ndmin=2)
        assert len(rows) == 1  # the real box it redrew, not a second one
        # only the box changes: the rest of the generator's window (a neighbour's defect) is the original's
        new, old = _rgb(tmp_path / "out" / "images" / "train" / item["image"]), _rgb(two_class / "images" / "train" / item["from"])
        x0, y0, x1, y1 = item["box"]
        outside = np.ones(new.shape[:2], bool)
        outside[y0:y1, x0:x1] = False
        assert np.array_equal(new[outside], old[outside]) and not np.array_equal(new[~outside], old[~outside])


def test_noise_control_needs_no_generator_and_changes_only_the_box(two_class, tmp_path):
    """The control for the generator's methods: colour noise of the image's own statistics in the box."""
    r = augment(two_class, tmp_path / "out", "noise", {"bright": 2}, masks="boxes", seed=1, progress=False)
    augment(two_class, tmp_path / "again", "noise", {"bright": 2}, masks="boxes", seed=1, progress=False)
    assert r["kept"] == 2
    assert _files(tmp_path / "out" / "images" / "train") == _files(tmp_path / "again" / "images" / "train")
    for item in read_json(tmp_path / "out" / PLAN)["items"]:
        new, old = _rgb(tmp_path / "out" / "images" / "train" / item["image"]), _rgb(two_class / "images" / "train" / item["from"])
        x0, y0, x1, y1 = item["box"]
        outside = np.ones(new.shape[:2], bool)
        outside[y0:y1, x0:x1] = False
        assert np.array_equal(new[outside], old[outside])
        centre = new[(y0 + y1) // 2 - 1:(y0 + y1) // 2 + 2, (x0 + x1) // 2 - 1:(x0 + x1) // 2 + 2].astype(float)
        assert centre.std() > 5  # noise, not the defect that was there


def test_boxes_mode_redraws_a_box_of_the_class(two_class, tmp_path):
    """Where the image also has a defect of another class, that one keeps its box and label."""
    data = tmp_path / "two"
    shutil.copytree(two_class, data)
    other = "0 0.150000 0.150000 0.150000 0.150000\n"  # a 'bright' box in the corner of every 'dark' image
    for label in (data / "labels" / "train").glob("*.txt"):
        if label.read_text().startswith("1 "):
            label.write_text(label.read_text() + other)
    augment(data, tmp_path / "out", "paste", {"dark": 4}, masks="boxes", seed=0, progress=False)
    for item in read_json(tmp_path / "out" / PLAN)["items"]:
        rows = (tmp_path / "out" / "labels" / "train" / item["image"].replace(".png", ".txt")).read_text()
        assert other in rows and sorted(r.split()[0] for r in rows.splitlines()) == ["0", "1"]
        x0, y0, x1, y1 = item["box"]
        assert x1 > 0.225 * 64 or y1 > 0.225 * 64  # not the corner box


def test_balance_tops_each_class_up(two_class, tmp_path):
    layout = DatasetLayout.open(two_class)
    counts = plan_counts(layout, None, None, 14)
    assert counts == {"bright": 2, "dark": 2}  # 12 real boxes each
    augment(two_class, tmp_path / "out", "paste", counts, progress=False)
    boxes = [row[0] for p in DatasetLayout.open(tmp_path / "out").images("train")
             for row in DatasetLayout.open(tmp_path / "out").labels(p).tolist()]
    assert boxes.count(0) == 14 and boxes.count(1) == 14


def test_random_places_search_crowded_images_and_a_full_split_is_named(two_class, tmp_path):
    """Without defect-free images and with large boxes (as NEU-DET) a random spot is mostly taken:
    the placement then searches whole images for a clear one; where none fits, the error names
    the class and the way out, and nothing is written."""
    data = tmp_path / "crowded"
    shutil.copytree(two_class, data)
    s = 64  # every train image: two 'bright' boxes leave only the corner x, y >= 50 free; one 10 x 10 'dark'
    rows = [(0, 0, 0, 64, 50), (0, 0, 50, 50, 64), (1, 5, 5, 15, 15)]
    text = "".join(f"{c} {(x0 + x1) / 2 / s:.6f} {(y0 + y1) / 2 / s:.6f} {(x1 - x0) / s:.6f} {(y1 - y0) / s:.6f}\n"
                   for c, x0, y0, x1, y1 in rows)
    for label in (data / "labels" / "train").glob("*.txt"):
        label.write_text(text)
    augment(data, tmp_path / "out", "paste", {"dark": 3}, masks="random", seed=0, progress=False)
    items = read_json(tmp_path / "out" / PLAN)["items"]
    assert len(items) == 3 and any("searched" in it["mask"] for it in items)
    for it in items:  # in the free corner, a pixel from the border
        x0, y0, x1, y1 = it["box"]
        assert x0 >= 50 and y0 >= 50 and x1 <= 63 and y1 <= 63
    with pytest.raises(DataError, match=r"no free place for a 'bright' defect.*0 defect-free.*--masks boxes"):
        augment(data, tmp_path / "full", "paste", {"bright": 1}, masks="random", seed=0, progress=False)
    assert not (tmp_path / "full").exists()


def test_killed_run_resumes_to_the_same_images(two_class, tmp_path, monkeypatch):
    whole = tmp_path / "whole"
    augment(two_class, whole, "paste", {"bright": 3}, progress=False)
    real, calls = methods.paste, []

    def dies_on_the_second(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    killed = tmp_path / "killed"
    monkeypatch.setattr(methods, "paste", dies_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        augment(two_class, killed, "paste", {"bright": 3}, progress=False)
    assert len(read_json(killed / PLAN)["items"]) == 1
    monkeypatch.setattr(methods, "paste", real)
    augment(two_class, killed, "paste", {"bright": 3}, progress=False)
    assert _files(killed / "images" / "train") == _files(whole / "images" / "train")
    with pytest.raises(DataError, match="other settings .*seed"):
        augment(two_class, killed, "paste", {"bright": 3}, seed=1, progress=False)


def test_quality_check_rejects_what_the_detector_does_not_see(two_class, tmp_path):
    from d3n.train.detector import model as detector

    untrained = detector.build(2, ["bright", "dark"])
    detector.save(untrained, tmp_path / "blind.pt", {"imgsz": 64}, {})
    r = augment(two_class, tmp_path / "out", "paste", {"dark": 2}, check_model=tmp_path / "blind.pt", progress=False)
    assert r["rejected"] == 2 and r["kept"] == 0
    items = read_json(tmp_path / "out" / PLAN)["items"]
    assert all(not it["kept"] and it["check"]["reason"] for it in items)
    assert sorted(p.name for p in (tmp_path / "out" / "rejected").glob("*.png")) == [it["image"] for it in items]
    assert not list((tmp_path / "out" / "images" / "train").glob("aug_*"))


def test_bad_input_is_named_and_nothing_is_written(two_class, generator_run, tmp_path, capsys):
    layout = DatasetLayout.open(two_class)
    with pytest.raises(ConfigError, match=r"unknown class\(es\) \['rust'\]"):
        plan_counts(layout, ["rust"], 2, None)
    no_dark = tmp_path / "no_dark"
    shutil.copytree(two_class, no_dark)
    for lbl in (no_dark / "labels" / "train").glob("*.txt"):
        lbl.write_text("".join(line + "\n" for line in lbl.read_text().splitlines() if not line.startswith("1 ")))
    with pytest.raises(DataError, match=r"no train box of class\(es\) \['dark'\]"):
        plan_counts(DatasetLayout.open(no_dark), None, None, 20)
    folder, target, _ = _user_mask(two_class, tmp_path)
    big = np.zeros((64, 80), np.uint8)
    big[10:20, 10:20] = 255
    cv2.imwrite(str(folder / f"{target.stem}.png"), big)
    with pytest.raises(DataError, match=rf"{target.stem}\.png: mask is 80x64 but .*{target.name} is 64x64"):
        augment(two_class, tmp_path / "out", "inpaint", {"dark": 1}, masks=str(folder), generator=generator_run,
                progress=False)
    assert not (tmp_path / "out").exists()
    assert main(["augment", str(two_class), "--out", str(tmp_path / "o2"), "--method", "sdedit", "--count", "1"]) != 0
    assert "--generator" in capsys.readouterr().err and not (tmp_path / "o2").exists()


def test_a_mask_longer_than_the_generators_window_is_cut_to_it():
    """The window is a square no larger than the image's shorter side: on a 40 x 100 image a
    90-pixel-tall mask is cut to the 40-pixel window, and the label is the box of what is drawn."""
    from types import SimpleNamespace

    from d3n.train.augment.placement import Target, mask_box

    mask = np.zeros((100, 40), bool)
    mask[5:95, 10:20] = True
    gen = SimpleNamespace(config={"context": 1.5, "min_side": 16})
    cut = methods.fit_window(gen, Target(Path("x.png"), mask, mask_box(mask), "test"), 100, 40)
    assert cut.box == (10, 30, 20, 70) and cut.mask.sum() == 10 * 40 and "cut" in cut.source
    small = np.zeros((100, 40), bool)
    small[40:50, 10:20] = True
    same = Target(Path("x.png"), small, mask_box(small), "test")
    assert methods.fit_window(gen, same, 100, 40) is same
