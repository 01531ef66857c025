"""ONNX export: parity with torch, the sidecar's contents, and clear failures."""

from __future__ import annotations

import json

import numpy as np
import pytest

from d3n import sidecar
from d3n.artifacts import sha256_file
from d3n.cli import main
from d3n.data.layout import DatasetLayout
from d3n.errors import ArtifactError


@pytest.fixture(scope="module")
def exported(tiny_ckpt, synth_small, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    rc = main(["export", str(tiny_ckpt), "--imgsz", "128", "--calib", str(synth_small), "--out", str(out)])
    assert rc == 0
    return out


def test_parity_with_torch(exported):
    parity = json.loads(exported.with_suffix(".json").read_text())["extra"]["parity"]
    assert parity["passed"] is True
    assert parity["images"] == 8
    assert parity["max_rel_diff_box"] < 1e-3 and parity["max_abs_diff_score"] < 1e-3
    assert parity["detections_ref"] > 20 and parity["detections_unmatched"] == 0
    # one-sided detections are rare rounding flips at a threshold, not model differences
    assert parity["detections_flipped"] <= 0.05 * parity["detections_ref"]
    assert parity["detections_matched"] + parity["detections_flipped"] >= parity["detections_ref"]
    assert parity["min_match_iou"] > 0.99


def test_sidecar_contents(exported, tiny_ckpt, synth_small):
    sc = sidecar.load(exported)  # checks the model hash
    assert sc.format == "onnx" and sc.model_file == "model.onnx"
    assert sc.model_sha256 == sha256_file(exported)
    assert sc.names == list(DatasetLayout.open(synth_small).names)
    assert sc.imgsz == [128, 128] and sc.strides == [8, 16, 32] and sc.batch == 1
    assert sc.precision == "fp32" and sc.preprocess.letterbox and sc.preprocess.pad_value == 114
    n_anchors = 16 * 16 + 8 * 8 + 4 * 4
    assert sc.output.kind == "raw" and sc.output.shape == [1, 4 + len(sc.names), n_anchors]
    assert sc.source_sha256 == sha256_file(tiny_ckpt) and sc.source_checkpoint == str(tiny_ckpt)
    assert sc.d3n_version and sc.extra["opset"] >= 17

    import onnx
    import onnxruntime as ort

    model = onnx.load(str(exported))
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    out = ort.InferenceSession(str(exported)).run(None, {"images": np.zeros((1, 3, 128, 128), np.float32)})[0]
    assert list(out.shape) == sc.output.shape


def test_tampered_model_is_refused(exported, tmp_path):
    bad = tmp_path / "model.onnx"
    data = bytearray(exported.read_bytes())
    data[-10] ^= 0xFF
    bad.write_bytes(bytes(data))
    (tmp_path / "model.json").write_text(exported.with_suffix(".json").read_text())
    with pytest.raises(ArtifactError, match="sha256"):
        sidecar.load(bad)


def test_parity_check_catches_a_different_model(exported, tiny_ckpt):
    import torch

    from d3n.export.calib import batches, synthetic_images
    from d3n.export.checkpoint import load_checkpoint
    from d3n.export.nms_graph import NMSSettings
    from d3n.export.parity import check_parity

    model = load_checkpoint(tiny_ckpt).torch_model()
    with torch.no_grad():
        model.model[-1].cv3[0][-1].bias.add_(2.0)  # class logits of the stride-8 level
    inputs = list(batches(synthetic_images(2), (128, 128)))
    with pytest.raises(ArtifactError, match="does not match its checkpoint"):
        check_parity(model, exported, inputs, "fp32", NMSSettings())


def test_cli_errors_are_clear(tmp_path, tiny_ckpt, capsys):
    assert main(["export", str(tmp_path / "missing.pt")]) == 1
    assert "missing.pt: model not found" in capsys.readouterr().err
    assert main(["export", str(tiny_ckpt), "--format", "onnx-int8", "--out", str(tmp_path)]) == 1
    assert "needs --calib DATA" in capsys.readouterr().err
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    assert main(["export", str(junk), "--out", str(tmp_path)]) == 1
    assert "junk.pt: not a loadable ultralytics checkpoint" in capsys.readouterr().err
    assert main(["export", str(tiny_ckpt), "--calib", str(tmp_path / "nodata"), "--out", str(tmp_path)]) == 1
    assert "no data.yaml" in capsys.readouterr().err


def test_dynamic_batch_export(tiny_ckpt, tmp_path):
    import onnxruntime as ort

    from d3n.export.exporter import ExportOptions, export_model

    res = export_model(ExportOptions(model=tiny_ckpt, imgsz=(128, 128), dynamic=True, parity_images=2,
                                     out=tmp_path / "dyn.onnx"))
    sc = sidecar.load(res.model)
    assert sc.batch == "dynamic" and sc.output.shape[0] == "dynamic"
    assert res.extra["parity"]["passed"]
    out = ort.InferenceSession(str(res.model)).run(None, {"images": np.zeros((3, 3, 128, 128), np.float32)})[0]
    assert out.shape == (3, *sc.output.shape[1:])
