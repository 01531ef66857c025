"""`d3n promote`: the gate passes a model against itself, refuses a worse one, and refuses to
compare on the wrong data or across different class names."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from d3n import sidecar
from d3n.artifacts import sha256_file
from d3n.cli import main
from d3n.data.layout import DatasetLayout
from d3n.errors import ConfigError
from d3n.export.promote import GATES, REFUSED, metric_rows, parse_tolerance

IMGSZ = (128, 128)


@pytest.fixture(scope="module")
def exported(tiny_ckpt, synth_small, tmp_path_factory) -> Path:
    from d3n.export.exporter import ExportOptions, export_model

    out = tmp_path_factory.mktemp("promote_onnx") / "model.onnx"
    return export_model(ExportOptions(model=tiny_ckpt, imgsz=IMGSZ, calib=synth_small, out=out)).model


def _pseudo_label(model: Path, data: Path) -> None:
    """Relabel the test split with the model's own top-3 detections (the last image left without
    boxes), so the untrained model scores well above zero and a model that detects nothing is
    clearly worse: a live gate without training a detector in the test."""
    from d3n.export.calib import read_image
    from d3n.export.parity import ort_run, ort_session
    from d3n.runtime.postprocess import class_thresholds, postprocess
    from d3n.runtime.preprocess import prepare

    layout = DatasetLayout.open(data)
    session = ort_session(model)
    images = layout.images("test")
    for i, path in enumerate(images):
        img = read_image(path)
        h, w = img.shape[:2]
        blob, lb = prepare(img, IMGSZ)
        det = postprocess(ort_run(session, [blob])[0], lb, class_thresholds(layout.nc, 0.001), max_det=3)
        rows = [] if i == len(images) - 1 else zip(det.xyxy, det.class_ids, strict=True)
        lines = [f"{c} {(x1 + x2) / 2 / w:.6f} {(y1 + y2) / 2 / h:.6f} {(x2 - x1) / w:.6f} {(y2 - y1) / h:.6f}"
                 for (x1, y1, x2, y2), c in rows]
        layout.label_path(path).write_text("".join(f"{line}\n" for line in lines))


@pytest.fixture(scope="module")
def gate_data(exported, tmp_path_factory) -> Path:
    """16 synthetic images with an 8-image test split, labelled by the exported model."""
    from d3n.data.synth import generate

    data = generate(tmp_path_factory.mktemp("promote_data") / "data", images=16, size=128, seed=3,
                    test_frac=0.5, progress=False)
    _pseudo_label(exported, data)
    return data


@pytest.fixture(scope="module")
def worse_ckpt(tiny_ckpt, tmp_path_factory) -> Path:
    """The same detector with its class head silenced: every score sigmoid(-20), nothing detected."""
    from d3n.offline import ultralytics

    yolo = ultralytics().YOLO(str(tiny_ckpt))
    for branch in yolo.model.model[-1].cv3:
        branch[-1].weight.data.zero_()
        branch[-1].bias.data.fill_(-20.0)
    path = tmp_path_factory.mktemp("worse") / "worse.pt"
    yolo.save(str(path))
    return path


def _promote(*args) -> int:
    return main(["promote", *map(str, args)])


def test_model_against_itself_is_promoted(exported, gate_data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the default release folder is releases/<sha256[:12]> here
    assert _promote(exported, "--against", exported, "--data", gate_data) == 0
    sha = sha256_file(exported)
    release = tmp_path / "releases" / sha[:12]
    assert sorted(p.name for p in release.iterdir()) == ["model.json", "model.onnx", "promotion.json",
                                                        "promotion.md"]
    assert sidecar.load(release / "model.onnx").model_sha256 == sha  # the copy matches its sidecar
    assert not list((tmp_path / "releases").glob(".*"))  # no temporary folder left behind

    report = json.loads((release / "promotion.json").read_text())
    assert report["decision"] == "promoted" and report["failed"] == []
    assert report["split"] == "test" and report["images"] == 8
    assert report["candidate"]["sha256"] == report["deployed"]["sha256"] == sha
    assert "same model" in " ".join(report["notes"])
    rows = {r["metric"]: r for r in report["metrics"]}
    assert rows["mAP50"]["deployed"] > 0.1  # the pseudo-labels make the gate live
    assert all(r["delta"] == 0 for r in rows.values())
    assert all(rows[k]["pass"] is True and rows[k]["tolerance"] == GATES[k] for k in GATES)
    assert rows["precision"]["pass"] is None  # reported, not gated
    assert all(r["delta"] == 0 for r in report["per_class_AP50"])
    rates = report["image_rates"]["candidate"]
    assert report["defect_images"] == 7 and report["clean_images"] == 1
    assert 0 <= rates["miss_rate"] <= 1 and rates["overkill_rate"] in (0.0, 1.0)
    out = capsys.readouterr().out
    assert "# Promotion: PROMOTED" in out and "miss_rate (lower is better)" in out

    # a release folder stands for the model it holds
    assert _promote(exported, "--against", release, "--data", gate_data, "--release", tmp_path / "r2") == 0
    again = json.loads((tmp_path / "r2" / "promotion.json").read_text())
    assert again["deployed"]["model_file"] == "model.onnx" and again["deployed"]["sha256"] == sha


def test_worse_checkpoint_is_refused(worse_ckpt, exported, gate_data, tmp_path, capsys):
    release = tmp_path / "rel"
    assert _promote(worse_ckpt, "--against", exported, "--data", gate_data, "--release", release) == REFUSED
    assert not release.exists()
    report = json.loads((tmp_path / "rel.refused.json").read_text())
    assert report["decision"] == "refused" and report["release"] is None
    assert {"mAP50", "mAP50-95", "recall@0.25"} <= set(report["failed"])
    assert report["candidate"]["exported_here"] and report["candidate"]["imgsz"] == list(IMGSZ)
    rows = {r["metric"]: r for r in report["metrics"]}
    assert rows["mAP50"]["candidate"] == 0 and rows["mAP50"]["pass"] is False
    assert report["image_rates"]["candidate"]["miss_rate"] == 1.0  # it detects nothing
    out = capsys.readouterr().out
    assert "REFUSED: mAP50" in out and "**FAIL**" in out and (tmp_path / "rel.refused.md").exists()


def test_dataset_without_test_split_is_refused(exported, synth_small, tmp_path, capsys):
    release = tmp_path / "rel"
    assert _promote(exported, "--against", exported, "--data", synth_small, "--release", release) == 1
    err = capsys.readouterr().err
    assert "data.yaml: no test split" in err
    assert "d3n data import" in err and "--splits" in err and "--test-frac" in err and "--split val" in err
    assert not release.exists()

    # val, only when asked for, and the report says what it is
    assert _promote(exported, "--against", exported, "--data", synth_small, "--split", "val",
                    "--release", release) == 0
    report = json.loads((release / "promotion.json").read_text())
    assert report["split"] == "val" and "chose the checkpoints" in " ".join(report["notes"])


def test_mismatched_class_names_name_both_sidecars(exported, gate_data, tmp_path, capsys):
    other = tmp_path / "other" / "model.onnx"
    other.parent.mkdir()
    shutil.copy2(exported, other)
    sc = json.loads(exported.with_suffix(".json").read_text())
    sc["names"] = [f"x_{n}" for n in sc["names"]]
    other.with_suffix(".json").write_text(json.dumps(sc))
    assert _promote(other, "--against", exported, "--data", gate_data, "--release", tmp_path / "rel") == 1
    err = capsys.readouterr().err
    assert "class names differ" in err
    assert str(other.with_suffix(".json")) in err and str(exported.with_suffix(".json")) in err
    assert not (tmp_path / "rel").exists()

    missing = tmp_path / "nope.onnx"
    assert _promote(missing, "--against", exported, "--data", gate_data) == 1
    assert f"{missing}: candidate model not found" in capsys.readouterr().err


def test_tolerance_option():
    assert parse_tolerance(None) == GATES
    tol = parse_tolerance("mAP50=0.01, miss_rate=0.02,mAP50-95=off")
    assert tol == {"mAP50": 0.01, "recall@0.25": 0.01, "miss_rate": 0.02}
    for bad in ("f1=0.1", "mAP50", "mAP50=abc", "mAP50=nan"):
        with pytest.raises(ConfigError, match="--tolerance"):
            parse_tolerance(bad)


def test_rates_gate_lower_is_better():
    dep = {"mAP50": 0.5, "miss_rate": 0.10, "overkill_rate": None}
    cand = {"mAP50": 0.496, "miss_rate": 0.13, "overkill_rate": None}
    rows = {r["metric"]: r for r in metric_rows(dep, cand, {"mAP50": 0.005, "miss_rate": 0.02})}
    assert rows["mAP50"]["pass"] is True  # a drop of 0.004 is within 0.005
    assert rows["miss_rate"]["pass"] is False and rows["miss_rate"]["delta"] == 0.03  # more misses
    assert rows["overkill_rate"]["pass"] is None  # not measurable, not gated
