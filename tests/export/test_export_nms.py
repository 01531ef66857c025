"""--nms: the in-graph ONNX NMS gives the same detections as the numpy reference, and the numpy
reference is ultralytics' non_max_suppression."""

from __future__ import annotations

import numpy as np
import pytest

from d3n import sidecar
from d3n.export.exporter import ExportOptions, export_model
from d3n.export.nms_graph import NMSSettings
from d3n.export.parity import nms_numpy

S = NMSSettings(conf=0.2, iou=0.5, max_det=40)


def _raw_head(rng, nc=3, n=400, size=128.0):
    xy = rng.uniform(0, size, (2, n))
    wh = rng.uniform(4, 40, (2, n))
    # clusters of overlapping boxes so NMS has work to do
    xy[:, n // 2:] = xy[:, : n - n // 2] + rng.normal(0, 2, (2, n - n // 2))
    return np.concatenate([xy, wh, rng.uniform(0, 0.5, (nc, n))]).astype(np.float32)


def test_numpy_nms_matches_ultralytics():
    import torch

    from d3n.offline import ultralytics

    ultralytics()
    from ultralytics.utils.nms import non_max_suppression

    rng = np.random.default_rng(0)
    for _ in range(3):
        raw = _raw_head(rng)
        ref = non_max_suppression(torch.from_numpy(raw[None]), S.conf, S.iou, max_det=S.max_det)[0].numpy()
        ours = nms_numpy(raw, S)
        assert len(ours) > 5 and ours.shape == ref.shape
        np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-4)


@pytest.fixture(scope="module")
def nms_model(tiny_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("nms")
    raw = export_model(ExportOptions(model=tiny_ckpt, imgsz=(128, 128), out=out / "raw.onnx",
                                     parity=False)).model
    nms = export_model(ExportOptions(model=tiny_ckpt, imgsz=(128, 128), nms=True, nms_settings=S,
                                     out=out / "nms.onnx")).model
    return raw, nms


def test_graph_nms_equals_numpy_nms(nms_model):
    import onnxruntime as ort

    from d3n.export.calib import batches, synthetic_images

    raw_s, nms_s = (ort.InferenceSession(str(p)) for p in nms_model)
    total = 0
    for x in batches(synthetic_images(4, seed=1), (128, 128)):
        want = nms_numpy(raw_s.run(None, {"images": x})[0][0], S)
        got = nms_s.run(None, {"images": x})[0]
        assert got.shape == (1, S.max_det, 6)
        rows = got[0][got[0, :, 4] > 0]
        assert np.all(got[0, len(rows):] == 0)  # zero padding after the detections
        np.testing.assert_allclose(rows, want, rtol=1e-5, atol=1e-3)
        total += len(rows)
    assert total > 0


def test_nms_sidecar(nms_model):
    sc = sidecar.load(nms_model[1])
    assert sc.output.kind == "nms" and sc.output.box_format == "xyxy"
    assert sc.output.shape == [1, S.max_det, 6]
    assert sc.extra["nms"]["max_det"] == S.max_det and sc.extra["nms"]["iou"] == S.iou
    assert sc.extra["nms_parity"]["passed"] is True


def test_nms_with_dynamic_batch_is_refused(tiny_ckpt, tmp_path):
    from d3n.errors import D3NError

    with pytest.raises(D3NError, match="batch-1"):
        export_model(ExportOptions(model=tiny_ckpt, nms=True, dynamic=True, out=tmp_path))


def test_matching_tells_threshold_flips_from_real_differences():
    from d3n.export.parity import match_detections

    s = NMSSettings(conf=0.25, iou=0.7, max_det=10)
    a = np.array([[0, 0, 10, 10, 0.9, 0], [50, 50, 60, 60, 0.8, 1]], np.float32)
    same = match_detections(a, a.copy(), s, band=1e-4)
    assert (same.matched, same.flips, same.unmatched) == (2, 0, 0)
    # the second side also keeps a box overlapping the first at IoU ~0.7: an NMS decision flip
    flip = np.concatenate([a, [[0, 0, 10, 14.3, 0.85, 0]]]).astype(np.float32)
    m = match_detections(a, flip, s, band=1e-4)
    assert (m.matched, m.flips, m.unmatched) == (2, 1, 0)
    # a confident box far from everything on one side only: a real difference
    extra = np.concatenate([a, [[100, 100, 120, 120, 0.9, 2]]]).astype(np.float32)
    assert match_detections(a, extra, s, band=1e-4).unmatched == 1
    # a different class for the same box is not a match either
    other = a.copy()
    other[1, 5] = 3
    assert match_detections(a, other, s, band=1e-4).unmatched == 2


def test_max_det_cut_and_score_ties_are_flips():
    from d3n.export.parity import match_detections

    s = NMSSettings(conf=0.25, iou=0.7, max_det=2)
    a = np.array([[0, 0, 10, 10, 0.9, 0], [50, 50, 60, 60, 0.5, 1]], np.float32)
    b = np.array([[0, 0, 10, 10, 0.9, 0], [80, 80, 90, 90, 0.5, 1]], np.float32)  # tie at the cut
    assert match_detections(a, b, s, band=1e-4).unmatched == 0
    b[1, 4] = 0.6  # b's second box outranks the cut: it has no counterpart in a
    m = match_detections(a, b, s, band=1e-4)
    assert (m.flips, m.unmatched) == (1, 1)  # a's 0.5 box fell below b's cut; b's 0.6 box is real
    s = NMSSettings(conf=0.25, iou=0.5, max_det=10)
    a = np.array([[0, 0, 10, 10, 1.0, 0]], np.float32)
    b = np.array([[0, 0, 10, 11, 1.0, 0]], np.float32)  # tied scores: NMS kept the other box
    m = match_detections(a, b, s, band=1e-4)
    assert (m.matched, m.flips, m.unmatched) == (0, 2, 0)
    b[0, 4] = 0.8  # not a tie: one box really replaced the other
    assert match_detections(a, b, s, band=1e-4).unmatched == 2


def test_class_choice_tie_is_a_flip_only_when_tied():
    from d3n.export.parity import match_detections

    s = NMSSettings()
    a = np.array([[0, 0, 10, 10, 1.0, 2]], np.float32)
    b = np.array([[0, 0, 10, 10, 1.0, 4]], np.float32)
    tied = match_detections(a, b, s, band=1e-4, class_margin=np.array([0.0]))
    assert (tied.matched, tied.flips, tied.unmatched) == (0, 1, 0)
    clear = match_detections(a, b, s, band=1e-4, class_margin=np.array([0.3]))
    assert clear.unmatched == 2


def test_compare_single_class_model():
    from d3n.export.parity import compare

    rng = np.random.default_rng(1)
    raw = _raw_head(rng, nc=1)
    rep = compare([raw], [raw.copy()], "fp32", NMSSettings(conf=0.005, iou=0.5))
    assert rep.passed and rep.detections_ref > 1 and rep.detections_matched == rep.detections_ref
