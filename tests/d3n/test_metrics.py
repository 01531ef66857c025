"""d3n.metrics: matching and AP on hand-worked cases, and agreement with ultralytics' validator."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from d3n.boxes import box_iou
from d3n.metrics import (
    IOU_THRESHOLDS,
    KEYS,
    DetectionStats,
    ap_per_class,
    average_precision,
    detection_metrics,
    match_predictions,
)

# one class, 2 ground-truth boxes, 3 detections ranked TP, FP, TP: recall 0.5, 0.5, 1.0 and
# precision 1, 1/2, 2/3. The envelope is 1 up to recall 0.5, then 2/3 up to recall 1, where
# it drops to 0. Sampled at 0, 0.01, ..., 1 and integrated with trapezoids:
#   49 steps at 1, the step 0.49 -> 0.5 from 1 to 2/3, 49 steps at 2/3, the last step 2/3 -> 0.
TP_FP_TP_AP = 0.49 + 0.01 * (1 + 2 / 3) / 2 + 0.49 * 2 / 3 + 0.01 * (2 / 3) / 2


def _tp(*rows) -> np.ndarray:
    """(D, 10) correctness, one bool per detection at every threshold."""
    return np.repeat(np.array(rows, bool)[:, None], len(IOU_THRESHOLDS), 1)


def test_average_precision_known_values():
    assert average_precision(np.array([1.0]), np.array([1.0])) == pytest.approx(0.995)  # last step halved
    assert average_precision(np.array([0.5, 0.5, 1.0]), np.array([1.0, 0.5, 2 / 3])) == pytest.approx(TP_FP_TP_AP)
    assert TP_FP_TP_AP == pytest.approx(0.8283333, abs=1e-7)
    assert average_precision(np.array([0.0, 0.0]), np.array([0.0, 0.0])) == pytest.approx(0.0, abs=1e-3)


def test_match_each_ground_truth_once_in_confidence_order():
    true_cls = np.array([0, 0])
    pred_cls = np.array([0, 0, 0])
    iou = np.array([[0.9, 0.9, 0.0],    # ground truth 0: detections 0 and 1 both overlap it
                    [0.0, 0.0, 0.6]])   # ground truth 1: only detection 2, at IoU 0.6
    correct = match_predictions(pred_cls, true_cls, iou)
    assert correct.shape == (3, 10)
    assert correct[0].tolist() == [t <= 0.9 + 1e-9 for t in IOU_THRESHOLDS]
    assert not correct[1].any()  # a duplicate: its ground truth is claimed by the more confident one
    assert correct[2].tolist() == [t <= 0.6 + 1e-9 for t in IOU_THRESHOLDS]


def test_match_takes_the_next_free_ground_truth_and_respects_classes():
    # detection 0 claims ground truth 0 (IoU 0.8); detection 1 then takes ground truth 1 (0.7)
    iou = np.array([[0.8, 0.85], [0.7, 0.7]])
    correct = match_predictions(np.array([0, 0]), np.array([0, 0]), iou)
    assert correct[:, 0].tolist() == [True, True]
    # at 0.75 and 0.8 ground truth 1 is out of reach for detection 1, and ground truth 0 is taken
    assert correct[1, list(IOU_THRESHOLDS).index(0.75)] == np.False_
    # at 0.85 detection 0 misses, so ground truth 0 is free for detection 1
    assert correct[:, list(np.round(IOU_THRESHOLDS, 2)).index(0.85)].tolist() == [False, True]
    assert not match_predictions(np.array([1, 1]), np.array([0, 0]), iou).any()  # wrong class
    assert match_predictions(np.array([0]), np.array([]), np.zeros((0, 1))).shape == (1, 10)


def test_tp_fp_tp_scores_the_hand_worked_ap():
    m = detection_metrics(_tp(True, False, True), np.array([0.9, 0.8, 0.7]), np.zeros(3), np.zeros(2), ["a"])
    assert set(m) == set(KEYS)
    assert m["mAP50"] == pytest.approx(TP_FP_TP_AP, abs=1e-5)
    assert m["mAP50-95"] == pytest.approx(TP_FP_TP_AP, abs=1e-5)  # every match holds at all thresholds
    # the best F1 (0.8) is below the last detection: all 3 kept, 2 right, both boxes found
    assert m["precision"] == pytest.approx(2 / 3, abs=1e-5) and m["recall"] == pytest.approx(1.0)
    assert m["per_class_AP50"] == {"a": pytest.approx(TP_FP_TP_AP, abs=1e-5)}


def test_map_averages_only_classes_with_ground_truth():
    # class 0: one perfect detection; class 1: ground truth, no detection; class 2: a detection, no ground truth
    m = detection_metrics(_tp(True, False), np.array([0.9, 0.5]), np.array([0, 2]), np.array([0, 1]),
                          ["a", "b", "c"])
    assert m["per_class_AP50"] == {"a": 0.995, "b": 0.0, "c": 0.0}
    assert m["mAP50"] == pytest.approx(0.995 / 2)
    empty = detection_metrics(np.zeros((0, 10), bool), np.zeros(0), np.zeros(0), np.array([0]), ["a"])
    assert empty == {"mAP50": 0.0, "mAP50-95": 0.0, "precision": 0.0, "recall": 0.0, "recall@0.25": 0.0,
                     "per_class_AP50": {"a": 0.0}}


def test_recall_at_the_operating_threshold():
    """Class 0: 2 ground truths, found at conf 0.9 and 0.1 -> 1/2 kept at 0.25; class 1: 1 of 1 at 0.3;
    a false positive at 0.95 changes nothing: recall@0.25 = mean(0.5, 1.0)."""
    tp = _tp(True, True, True, False)
    m = detection_metrics(tp, np.array([0.9, 0.1, 0.3, 0.95]), np.array([0, 0, 1, 1]), np.array([0, 0, 1]), ["a", "b"])
    assert m["recall@0.25"] == pytest.approx(0.75)


def test_detection_stats_from_boxes():
    stats = DetectionStats()
    gt = np.array([[0, 0, 10, 10], [20, 20, 40, 40]], np.float32)
    # image 1: both found, listed out of confidence order; the confident box covers 88 % of its
    # ground truth (IoU 0.88), so it matches at 0.50..0.85 and misses at 0.90 and 0.95
    stats.add(np.array([[20, 20, 40, 40], [0, 0, 10, 8.8]], np.float32), np.array([0.6, 0.9]), np.array([0, 0]),
              gt, np.array([0, 0]))
    stats.add(np.zeros((0, 4), np.float32), np.zeros(0), np.zeros(0), np.zeros((0, 4), np.float32), np.zeros(0))
    m = stats.summary(["a"])
    assert (m["images"], m["instances"]) == (2, 2)
    assert m["mAP50"] == pytest.approx(0.995)
    # at 0.90 and 0.95 the ranking is FP, TP: precision 0.5 up to recall 0.5, sampled 0 .. 0.49
    # and half a step to 0 at 0.5 -> 0.49 * 0.5 + 0.01 * 0.25
    ap_high = 0.49 * 0.5 + 0.01 * 0.25
    assert average_precision(np.array([0.0, 0.5]), np.array([0.0, 0.5])) == pytest.approx(ap_high)
    assert m["mAP50-95"] == pytest.approx((8 * 0.995 + 2 * ap_high) / 10, abs=1e-5)


def _random_dataset(seed: int, n_images: int = 40, nc: int = 3):
    """Ground truth and detections per image: jittered copies of the ground truth (some with the
    wrong class or badly placed), plus clutter; detections in descending confidence."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_images):
        n = int(rng.integers(0, 7))
        xy = rng.uniform(0, 300, (n, 2))
        gt = np.concatenate([xy, xy + rng.uniform(10, 80, (n, 2))], 1)
        gt_cls = rng.integers(0, nc, n)
        keep = rng.random(n) < 0.8
        jitter = rng.normal(0, rng.uniform(1, 12, (n, 1)), (n, 4))
        pred = np.concatenate([(gt + jitter)[keep], gt[keep][:2] + rng.normal(0, 3, (min(2, keep.sum()), 4))])
        cls = np.concatenate([gt_cls[keep], gt_cls[keep][:2]])
        cls = np.where(rng.random(len(cls)) < 0.1, rng.integers(0, nc, len(cls)), cls)
        m = int(rng.integers(0, 5))
        xy = rng.uniform(0, 300, (m, 2))
        pred = np.concatenate([pred, np.concatenate([xy, xy + rng.uniform(10, 80, (m, 2))], 1)])
        cls = np.concatenate([cls, rng.integers(0, nc, m)])
        conf = rng.uniform(0.001, 1, len(pred))
        order = np.argsort(-conf)
        out.append((gt.astype(np.float32), gt_cls, pred[order].astype(np.float32), cls[order], conf[order]))
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_agrees_with_ultralytics(seed):
    from d3n.offline import configure_ultralytics

    configure_ultralytics()
    import torch
    from ultralytics.engine.validator import BaseValidator
    from ultralytics.utils.metrics import ap_per_class as ul_ap_per_class
    from ultralytics.utils.metrics import box_iou as ul_box_iou

    validator = SimpleNamespace(iouv=torch.tensor(IOU_THRESHOLDS, dtype=torch.float32))
    ours, theirs, conf, pred_cls, target_cls = [], [], [], [], []
    for gt, gt_cls, pred, cls, score in _random_dataset(seed):
        iou = box_iou(gt, pred)
        ul_iou = ul_box_iou(torch.from_numpy(gt), torch.from_numpy(pred))
        np.testing.assert_allclose(iou, ul_iou.numpy(), atol=1e-5)
        ours.append(match_predictions(cls, gt_cls, iou))
        theirs.append(BaseValidator.match_predictions(validator, torch.from_numpy(cls), torch.from_numpy(gt_cls),
                                                      ul_iou).numpy())
        conf.append(score)
        pred_cls.append(cls)
        target_cls.append(gt_cls)
    tp, conf, pred_cls, target_cls = (np.concatenate(v) for v in (ours, conf, pred_cls, target_cls))
    assert np.array_equal(tp, np.concatenate(theirs))
    assert 0.2 < tp[:, 0].mean() < 0.9  # a mix of hits and misses, not a trivial case
    res = ap_per_class(tp, conf, pred_cls, target_cls)
    ul = ul_ap_per_class(tp, conf, pred_cls, target_cls)
    assert res.classes.tolist() == ul[6].tolist()
    np.testing.assert_allclose(res.ap, ul[5], atol=1e-3)
    np.testing.assert_allclose(res.precision, ul[2], atol=1e-3)
    np.testing.assert_allclose(res.recall, ul[3], atol=1e-3)
    m = detection_metrics(tp, conf, pred_cls, target_cls, ["a", "b", "c"])
    assert m["mAP50"] == pytest.approx(ul[5][:, 0].mean(), abs=1e-3)
    assert m["mAP50-95"] == pytest.approx(ul[5].mean(), abs=1e-3)


def test_image_level_miss_and_overkill_rates_at_the_operating_threshold():
    """A defect image is found when a detection >= 0.25 overlaps any true box (IoU >= 0.5, any
    class); a defect-free image is overkill when any detection >= 0.25 is on it."""
    box = np.array([[10, 10, 50, 50]], np.float32)
    s = DetectionStats()
    s.add(box, np.array([0.9]), np.array([1]), box, np.array([0]))  # found (the class does not matter)
    s.add(box, np.array([0.2]), np.array([0]), box, np.array([0]))  # missed: below the threshold
    s.add(box + 100, np.array([0.9]), np.array([0]), box, np.array([0]))  # missed: elsewhere
    s.add(box, np.array([0.3]), np.array([0]), np.zeros((0, 4)), np.zeros(0))  # overkill
    s.add(box, np.array([0.1]), np.array([0]), np.zeros((0, 4)), np.zeros(0))  # clean, fine
    m = s.summary(["a", "b"])
    assert (m["defect_images"], m["missed_images"], m["clean_images"], m["overkill_images"]) == (3, 2, 2, 1)
    assert m["miss_rate"] == pytest.approx(2 / 3, abs=1e-5) and m["overkill_rate"] == 0.5
    only_defects = DetectionStats()
    only_defects.add(box, np.array([0.9]), np.array([0]), box, np.array([0]))
    assert only_defects.summary(["a"])["overkill_rate"] is None  # not measurable: no defect-free image
