"""Letterbox and postprocessing match ultralytics on the same ONNX model and images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import IMGSZ, NAMES, make_frame

from d3n.boxes import nms, scale_boxes
from d3n.runtime.backends import open_backend
from d3n.runtime.postprocess import Detections, class_thresholds, decode_nms, postprocess
from d3n.runtime.preprocess import letterbox, prepare
from d3n.runtime.roi import RoiMask

NEU = Path(__file__).resolve().parents[2].parent / "shared" / "datasets" / "NEU-DET"


def _ul():
    from d3n.offline import ultralytics

    return ultralytics()


@pytest.mark.parametrize("hw", [(150, 200), (260, 150), (127, 333), (128, 128), (64, 48), (601, 1003)])
def test_letterbox_matches_ultralytics(hw):
    _ul()
    from ultralytics.data.augment import LetterBox

    img = np.random.default_rng(hw[0]).integers(0, 255, (*hw, 3), dtype=np.uint8)
    for shape in ((IMGSZ, IMGSZ), (96, 160)):
        ours, lb = letterbox(img, shape)
        theirs = LetterBox(new_shape=shape, auto=False)(image=img)
        assert ours.shape == theirs.shape
        assert np.array_equal(ours, theirs)
        assert lb.input_shape == shape and lb.orig_shape == hw


def test_scale_boxes_matches_ultralytics():
    _ul()
    import torch
    from ultralytics.utils.ops import scale_boxes as ul_scale

    rng = np.random.default_rng(0)
    for hw in ((150, 200), (127, 333), (601, 1003)):
        _, lb = letterbox(np.zeros((*hw, 3), np.uint8), (IMGSZ, IMGSZ))
        boxes = np.sort(rng.uniform(0, IMGSZ, (20, 4)).astype(np.float32).reshape(20, 2, 2), 1).reshape(20, 4)
        boxes = boxes[:, [0, 2, 1, 3]]
        ours = scale_boxes(boxes, lb)
        theirs = ul_scale((IMGSZ, IMGSZ), torch.from_numpy(boxes.copy()), hw).numpy()
        np.testing.assert_allclose(ours, theirs, atol=1e-3)


def test_nms_matches_torchvision():
    import torch
    import torchvision

    rng = np.random.default_rng(1)
    xy = rng.uniform(0, 100, (300, 2))
    wh = rng.uniform(5, 40, (300, 2))
    boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
    scores = rng.uniform(0, 1, 300).astype(np.float32)
    for iou in (0.3, 0.5, 0.7):
        ours = nms(boxes, scores, iou)
        theirs = torchvision.ops.nms(torch.from_numpy(boxes), torch.from_numpy(scores), iou).numpy()
        assert ours.tolist() == theirs.tolist()


def _match(ours: Detections, ul_boxes, ul_scores, ul_cls, tol_px=1.0):
    """Every ultralytics detection has one of ours with the same class, box within tol, close score."""
    assert len(ours) == len(ul_scores)
    used = np.zeros(len(ours), bool)
    for box, score, cls in zip(ul_boxes, ul_scores, ul_cls, strict=True):
        err = np.abs(ours.xyxy - box).max(1)
        cand = np.where(~used & (ours.class_ids == int(cls)) & (err <= tol_px)
                        & (np.abs(ours.scores - score) < 1e-3))[0]
        assert cand.size, f"no match for {box} cls {cls} score {score}"
        used[cand[0]] = True


def _test_images():
    imgs = [make_frame(3, 200, 150), make_frame(9, 150, 260), make_frame(5, 333, 127)]
    if NEU.exists():
        import cv2

        first = sorted((NEU / "IMAGES").glob("*.jpg"))[:2]
        imgs += [cv2.imread(str(p)) for p in first]
    return imgs


def test_detections_match_ultralytics_predictor(tiny_onnx):
    ul = _ul()
    backend = open_backend(tiny_onnx, device="cpu")
    predictor = ul.YOLO(str(tiny_onnx), task="detect")
    total = 0
    for img in _test_images():
        for conf in (0.25, 0.5):
            blob, lb = prepare(img, backend.input_shape[2:], backend.sidecar.preprocess)
            det = postprocess(backend.infer(blob), lb, class_thresholds(len(NAMES), conf), iou=0.7)
            r = predictor.predict(img, imgsz=IMGSZ, conf=conf, iou=0.7, verbose=False)[0].boxes
            _match(det, r.xyxy.numpy(), r.conf.numpy(), r.cls.numpy())
            total += len(det)
    assert total > 50  # the comparison covered many boxes, not empty results


def test_class_thresholds_and_max_det():
    # Two anchors, class 0 at 0.5 and class 1 at 0.5; thresholds decide which survive.
    out = np.zeros((1, 4 + 2, 3), np.float32)
    out[0, :4, 0] = [50, 50, 20, 20]
    out[0, :4, 1] = [10, 10, 8, 8]
    out[0, :4, 2] = [52, 50, 20, 20]  # overlaps anchor 0, same class, lower score
    out[0, 4, 0], out[0, 5, 1], out[0, 4, 2] = 0.5, 0.5, 0.45
    _, lb = letterbox(np.zeros((100, 100, 3), np.uint8), (100, 100))
    both = postprocess(out, lb, class_thresholds(2, 0.25))
    assert sorted(both.class_ids.tolist()) == [0, 1]  # anchor 2 suppressed by NMS
    only_cls1 = postprocess(out, lb, class_thresholds(2, 0.25, {0: 0.6}))
    assert only_cls1.class_ids.tolist() == [1]
    assert len(postprocess(out, lb, class_thresholds(2, 0.25), iou=0.95)) == 3  # looser NMS keeps all
    assert len(postprocess(out, lb, class_thresholds(2, 0.25), max_det=1)) == 1


def test_decode_nms_output():
    rows = np.array([[[1, 2, 30, 40, 0.9, 1], [5, 5, 9, 9, 0.2, 0], [0, 0, 0, 0, 0.0, -1]]], np.float32)
    det = decode_nms(rows, class_thresholds(2, 0.25))
    assert det.class_ids.tolist() == [1] and det.xyxy[0].tolist() == [1, 2, 30, 40]


def test_roi_mask_filters_by_box_centre():
    mask = np.zeros((10, 20), np.uint8)
    mask[:, :10] = 255  # left half of the frame
    roi = RoiMask(mask)
    det = Detections(np.array([[10, 10, 30, 30], [150, 10, 170, 30]], np.float32),
                     np.array([0.9, 0.8], np.float32), np.array([0, 1]))
    kept = roi.filter(det, (100, 200, 3))  # mask is resized to the 100x200 frame
    assert kept.class_ids.tolist() == [0]
