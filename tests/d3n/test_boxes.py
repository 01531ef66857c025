"""d3n.boxes: IoU, NMS, letterbox geometry and box scaling on hand-computed cases."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from d3n.boxes import (
    MAX_WH,
    batched_nms,
    box_iou,
    letterbox_geometry,
    nms,
    scale_boxes,
    xywh2xyxy,
)


def _b(*rows) -> np.ndarray:
    return np.array(rows, np.float32).reshape(-1, 4)


def test_core_imports_only_numpy():
    # the edge runtime imports d3n.boxes; neither module may pull in torch, cv2 or ultralytics
    code = ("import sys, d3n.boxes, d3n.metrics\n"
            "heavy = {'torch', 'torchvision', 'ultralytics', 'cv2', 'scipy', 'onnxruntime'}\n"
            "print(sorted(heavy & {m.split('.')[0] for m in sys.modules}))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr


def test_box_iou_known_values():
    a = _b([0, 0, 2, 2], [0, 0, 4, 4])
    b = _b([1, 1, 3, 3], [0, 0, 2, 2], [5, 5, 6, 6])
    iou = box_iou(a, b)
    assert iou.shape == (2, 3)
    # overlap 1 px^2, union 4 + 4 - 1; identical boxes; disjoint boxes
    np.testing.assert_allclose(iou[0], [1 / 7, 1.0, 0.0], atol=1e-6)
    # a box inside another: its area over the outer one's
    np.testing.assert_allclose(iou[1], [4 / 16, 4 / 16, 0.0], atol=1e-6)
    assert box_iou(_b(), b).shape == (0, 3)


def test_xywh2xyxy():
    np.testing.assert_array_equal(xywh2xyxy(_b([5, 5, 4, 2])), _b([3, 4, 7, 6]))


def test_nms_keeps_the_best_and_suppresses_overlaps():
    boxes = _b([0, 0, 10, 10], [1, 0, 11, 10], [20, 20, 30, 30])  # IoU(0, 1) = 90 / 110
    scores = np.array([0.8, 0.9, 0.7], np.float32)
    assert nms(boxes, scores, 0.5).tolist() == [1, 2]  # box 1 outranks box 0 and suppresses it
    assert nms(boxes, scores, 0.9).tolist() == [1, 0, 2]  # 0.82 <= 0.9: both kept, score order
    assert nms(boxes, scores, 0.9, max_det=2).tolist() == [1, 0]
    assert nms(_b(), np.zeros(0, np.float32), 0.5).tolist() == []


def test_nms_suppresses_only_above_the_threshold():
    boxes = _b([0, 0, 10, 10], [0, 0, 10, 5])  # IoU exactly 0.5
    scores = np.array([0.9, 0.8], np.float32)
    assert nms(boxes, scores, 0.5).tolist() == [0, 1]
    assert nms(boxes, scores, 0.49).tolist() == [0]


def test_nms_row_by_row_equals_whole_matrix():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 100, (200, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(5, 40, (200, 2))], 1).astype(np.float32)
    scores = rng.uniform(0, 1, 200).astype(np.float32)
    whole = nms(boxes, scores, 0.5)
    assert 10 < len(whole) < 200
    assert nms(boxes, scores, 0.5, block=8).tolist() == whole.tolist()


def test_batched_nms_is_class_aware():
    boxes = _b([0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10])
    scores = np.array([0.9, 0.8, 0.7], np.float32)
    assert batched_nms(boxes, scores, np.array([0, 1, 0]), 0.5).tolist() == [0, 1]
    assert batched_nms(boxes, scores, np.array([0, 0, 0]), 0.5).tolist() == [0]
    assert MAX_WH >= 7680  # larger than any image side, so classes never overlap


@pytest.mark.parametrize("orig, new, gains, pads, padding", [
    ((100, 200), (128, 128), (0.64, 0.64), (0, 32), (32, 32, 0, 0)),  # wide: bars top and bottom
    ((4, 8), (9, 16), (2.0, 2.0), (0, 0), (0, 1, 0, 0)),  # odd padding: the extra row goes after
    ((50, 50), (96, 160), (1.92, 1.92), (32, 0), (0, 0, 32, 32)),  # up-scaled, bars left and right
])
def test_letterbox_geometry_known_values(orig, new, gains, pads, padding):
    lb = letterbox_geometry(orig, new)
    assert (lb.gain_x, lb.gain_y) == pytest.approx(gains)
    assert (lb.pad_x, lb.pad_y) == pads and lb.padding == padding
    assert lb.orig_shape == orig and lb.input_shape == new
    nh, nw = lb.resized
    assert nh + padding[0] + padding[1] == new[0] and nw + padding[2] + padding[3] == new[1]


def test_letterbox_gains_come_from_the_rounded_size():
    lb = letterbox_geometry((100, 201), 128)  # 201 * 128 / 201 = 128, 100 * 0.6368 = 63.68 -> 64
    assert lb.resized == (64, 128)
    assert lb.gain_x == 128 / 201 and lb.gain_y == 64 / 100


@pytest.mark.parametrize("orig", [(100, 200), (127, 333), (601, 1003), (64, 48)])
def test_scale_boxes_undoes_the_letterbox(orig):
    rng = np.random.default_rng(orig[0])
    h, w = orig
    xy = rng.uniform(0, [w / 2, h / 2], (30, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(1, [w / 2, h / 2], (30, 2))], 1).astype(np.float32)
    lb = letterbox_geometry(orig, (128, 160))
    # forward by hand: scale, then shift by the top-left padding
    into = boxes * np.array([lb.gain_x, lb.gain_y] * 2, np.float32) + np.array([lb.pad_x, lb.pad_y] * 2, np.float32)
    np.testing.assert_allclose(scale_boxes(into, lb), boxes, atol=1e-3 * max(orig))


def test_scale_boxes_clips_to_the_frame():
    lb = letterbox_geometry((100, 200), 128)  # pad_y 32, gain 0.64
    out = scale_boxes(_b([-10, 0, 140, 128]), lb)
    np.testing.assert_allclose(out, _b([0, 0, 200, 100]))  # the box reached into the padding
    assert out.dtype == np.float32
