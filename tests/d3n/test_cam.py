"""GradCAM++ heat maps (paper Fig. 14): bounded, deterministic maps that tell two models apart, one
PNG grid of the expected size, and the report's pick of seed, checkpoints and split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pytorch_grad_cam")
torch = pytest.importorskip("torch")

from d3n.data.layout import DatasetLayout  # noqa: E402
from d3n.data.synth import generate  # noqa: E402
from d3n.experiment import cam  # noqa: E402
from d3n.export.calib import read_image  # noqa: E402
from d3n.train.detector import model as detector  # noqa: E402

IMGSZ = 96


@pytest.fixture(scope="module")
def cell(tmp_path_factory) -> Path:
    """An experiment cell without training: two differently initialised YOLOv5s checkpoints as the
    baseline and the student, and the cell's synthetic dataset (with a test split)."""
    root = tmp_path_factory.mktemp("cell")
    data = generate(root / "data" / "dataset", images=4, size=IMGSZ, seed=0, test_frac=0.25, progress=False)
    names = list(DatasetLayout.open(data).names)
    for seed, stage in enumerate(("baseline", "distill")):
        torch.manual_seed(seed)
        detector.save(detector.build(len(names), names), root / stage / "best.pt", {}, {})
    return root


def _images(cell: Path, split: str = "train") -> list[Path]:
    return DatasetLayout.open(cell / "data" / "dataset").images(split)


def test_maps_are_bounded_deterministic_and_differ_between_models(cell):
    a, b = (detector.load(cell / s / "best.pt") for s in ("baseline", "distill"))
    x, _ = cam._input(read_image(_images(cell)[0]), IMGSZ, a)
    flags = [p.requires_grad for p in a.parameters()]
    maps = [cam.gradcam_map(a, x), cam.gradcam_map(b, x), cam.gradcam_map(a, x)]
    for m in maps:
        assert m.shape == (IMGSZ, IMGSZ) and m.dtype == np.float32
        assert np.isfinite(m).all() and m.min() >= 0 and m.max() <= 1 and m.max() > 0
    assert np.array_equal(maps[0], maps[2])  # deterministic
    assert np.abs(maps[0] - maps[1]).mean() > 1e-3  # two models, two heat maps
    assert [p.requires_grad for p in a.parameters()] == flags  # the model is left as it was


def test_target_layers_are_the_detect_inputs(cell):
    m = detector.load(cell / "baseline" / "best.pt")
    assert [layer.i for layer in cam.target_layers(m)] == [17, 20, 23]


def test_figure_is_one_grid_and_nothing_without_inputs(cell, tmp_path):
    from PIL import Image

    models = {"baseline": cell / "baseline" / "best.pt", "student": cell / "distill" / "best.pt"}
    images = _images(cell)[:2]
    assert cam.cam_figure({}, images, IMGSZ, tmp_path / "none.png") is None
    assert cam.cam_figure(models, [], IMGSZ, tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()
    out = cam.cam_figure(models, images, IMGSZ, tmp_path / "fig14.png")
    assert out == tmp_path / "fig14.png"
    w, h = Image.open(out).size
    panel = cam.PANEL_INCH * cam.DPI  # 2 rows (images) x 3 columns (image, 2 models)
    assert abs(w - 3 * panel) <= 2 and abs(h - 2 * panel) <= 2
    assert [p.name for p in tmp_path.iterdir()] == ["fig14.png"]  # written atomically, no leftovers


def test_report_figure_uses_the_first_seed_with_both_checkpoints_and_the_test_split(cell, tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(cam, "cam_figure", lambda models, images, imgsz, out: seen.update(
        models=models, images=images, imgsz=imgsz) or out)
    rows = {"baseline": {"folders": {1: tmp_path / "missing", 2: cell / "baseline"}, "seeds": {2: {"imgsz": 64}}},
            "d3n student": {"folders": {1: cell / "distill", 2: cell / "distill"}, "seeds": {2: {"imgsz": IMGSZ}}}}
    assert cam.report_figure(rows, "d3n student", tmp_path / "f.png") == tmp_path / "f.png"
    assert seen["models"] == {"baseline": cell / "baseline" / "best.pt", "d3n student": cell / "distill" / "best.pt"}
    assert seen["images"] and seen["images"] == _images(cell, "test")[:4] and seen["imgsz"] == IMGSZ
    assert cam.report_figure({"baseline": rows["baseline"]}, "d3n student", tmp_path / "g.png") is None
