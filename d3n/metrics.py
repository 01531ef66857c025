"""Detection metrics (NumPy only): matching at IoU 0.50:0.95, AP and mAP, one set of keys.

Every d3n path that reports accuracy (training, `d3n val`, the INT8 export check) goes through
here, so their numbers compare. They follow ultralytics' validator, so they also compare with
what ultralytics reports for the same detections:

- matching: detections in descending confidence each claim the unclaimed ground-truth box of
  their class with the highest IoU, if that IoU reaches the threshold (per threshold);
- AP: the precision envelope sampled at 101 recall points and integrated (trapezoid rule);
  mAP is the mean over the classes that have ground truth;
- precision / recall: per class at the one confidence where the mean F1 over classes
  (smoothed) is highest, then averaged over those classes.

`summary` returns fractions in [0, 1] under KEYS; the pipeline report and the README read them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from d3n.boxes import box_iou

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
KEYS = ("mAP50", "mAP50-95", "precision", "recall", "recall@0.25", "per_class_AP50")
MATCH_IOU = 0.5  # image level: a defect counts as found when a kept detection overlaps a true box this much
OPERATING_CONF = 0.25  # the runtime's default --conf: what a line's operator actually gets
RECALL_POINTS = np.linspace(0.0, 1.0, 101)  # COCO's 101-point recall grid
CONF_POINTS = np.linspace(0.0, 1.0, 1000)  # where precision, recall and F1 are compared
F1_SMOOTHING = 0.1  # box-filter width, as a fraction of CONF_POINTS
EPS = 1e-16


def match_predictions(pred_cls: np.ndarray, true_cls: np.ndarray, iou: np.ndarray,
                      thresholds: np.ndarray = IOU_THRESHOLDS) -> np.ndarray:
    """(D, T) bool: is detection j a true positive at threshold t.

    pred_cls (D,) must be in descending confidence; true_cls (M,); iou (M, D) ground truth x
    detections. Each ground-truth box is claimed at most once per threshold.
    """
    correct = np.zeros((len(pred_cls), len(thresholds)), bool)
    if not len(true_cls) or not len(pred_cls):
        return correct
    iou = iou * (true_cls[:, None] == pred_cls[None, :])  # another class never matches
    claimed = np.zeros((len(true_cls), len(thresholds)), bool)
    cols = np.arange(len(thresholds))
    for j in np.flatnonzero((iou >= thresholds.min()).any(0)):  # the others match nothing
        free = np.where(claimed, 0.0, iou[:, j, None])
        best = free.argmax(0)
        correct[j] = free[best, cols] >= thresholds
        claimed[best, cols] |= correct[j]
    return correct


def average_precision(recall: np.ndarray, precision: np.ndarray) -> float:
    """Area under one precision-recall curve (points in descending confidence).

    The curve starts at precision 1 and drops to 0 just after the last recall reached; each
    point takes the best precision at its recall or beyond (the envelope), and the envelope,
    linearly interpolated, is sampled at 101 recall points and integrated with the trapezoid
    rule. So a perfect detector scores 0.995, not 1: the last step falls over the last 0.01.
    """
    last = recall[-1] if len(recall) else 1.0
    r = np.concatenate(([0.0], recall, [last, 1.0]))
    p = np.concatenate(([1.0], precision, [0.0, 0.0]))
    envelope = np.maximum.accumulate(p[::-1])[::-1]
    y = np.interp(RECALL_POINTS, r, envelope)
    return float(np.sum((y[1:] + y[:-1]) / 2 * np.diff(RECALL_POINTS)))


def _smooth(y: np.ndarray, frac: float) -> np.ndarray:
    """Centred box filter over about `frac` of the points (odd width), edges held constant."""
    width = round(len(y) * frac * 2) // 2 + 1
    pad = width // 2
    padded = np.concatenate([np.full(pad, y[0]), y, np.full(pad, y[-1])])
    return np.convolve(padded, np.ones(width) / width, mode="valid")


@dataclass
class ClassAP:
    """AP per class with ground truth (`classes`, ascending): ap (nc, T) and the precision and
    recall (nc,) at the confidence with the best smoothed mean F1."""

    classes: np.ndarray
    ap: np.ndarray
    precision: np.ndarray
    recall: np.ndarray


def _class_curves(tp: np.ndarray, conf: np.ndarray, n_true: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One class's detections (descending confidence) -> AP per threshold, and precision and
    recall at IoU 0.5 over CONF_POINTS."""
    tpc = tp.cumsum(0)
    fpc = (1 - tp).cumsum(0)
    recall = tpc / (n_true + EPS)
    precision = tpc / (tpc + fpc)
    ap = np.array([average_precision(recall[:, t], precision[:, t]) for t in range(tp.shape[1])])
    # np.interp wants rising x; confidence falls along the detections, so both are negated.
    # Above the top confidence nothing is detected: recall 0, precision 1.
    r_conf = np.interp(-CONF_POINTS, -conf, recall[:, 0], left=0)
    p_conf = np.interp(-CONF_POINTS, -conf, precision[:, 0], left=1)
    return ap, p_conf, r_conf


def ap_per_class(tp: np.ndarray, conf: np.ndarray, pred_cls: np.ndarray, target_cls: np.ndarray) -> ClassAP:
    """AP of every class that has ground truth, from all detections of a dataset.

    tp (D, T) from `match_predictions`; conf, pred_cls (D,); target_cls (M,) one per ground-truth box.
    """
    order = np.argsort(-conf, kind="stable")  # ties keep their image / NMS order
    tp, conf, pred_cls = tp[order].astype(np.float64), conf[order], pred_cls[order]
    classes, counts = np.unique(target_cls, return_counts=True)
    ap = np.zeros((len(classes), tp.shape[1]))
    p_conf, r_conf = np.zeros((len(classes), len(CONF_POINTS))), np.zeros((len(classes), len(CONF_POINTS)))
    for k, (c, n_true) in enumerate(zip(classes, counts, strict=True)):
        sel = pred_cls == c
        if sel.any():  # no detections: AP, precision and recall stay 0
            ap[k], p_conf[k], r_conf[k] = _class_curves(tp[sel], conf[sel], n_true)
    f1 = 2 * p_conf * r_conf / (p_conf + r_conf + EPS)
    best = int(_smooth(f1.mean(0), F1_SMOOTHING).argmax()) if len(classes) else 0
    return ClassAP(classes.astype(int), ap, p_conf[:, best], r_conf[:, best])


def detection_metrics(tp: np.ndarray, conf: np.ndarray, pred_cls: np.ndarray, target_cls: np.ndarray,
                      names: list[str]) -> dict:
    """The KEYS, as fractions rounded to 5 decimals; classes without ground truth get AP50 0."""
    per_class = {n: 0.0 for n in names}
    if not len(conf) or not len(target_cls):
        return {"mAP50": 0.0, "mAP50-95": 0.0, "precision": 0.0, "recall": 0.0, "recall@0.25": 0.0,
                "per_class_AP50": per_class}
    res = ap_per_class(tp, conf, pred_cls, target_cls)
    for c, ap in zip(res.classes, res.ap[:, 0], strict=True):
        per_class[names[c]] = round(float(ap), 5)
    return {"mAP50": round(float(res.ap[:, 0].mean()), 5), "mAP50-95": round(float(res.ap.mean()), 5),
            "precision": round(float(res.precision.mean()), 5), "recall": round(float(res.recall.mean()), 5),
            "recall@0.25": round(operating_recall(tp, conf, pred_cls, target_cls), 5), "per_class_AP50": per_class}


def operating_recall(tp: np.ndarray, conf: np.ndarray, pred_cls: np.ndarray, target_cls: np.ndarray,
                     threshold: float = OPERATING_CONF) -> float:
    """Recall at IoU 0.5 of the detections kept at `threshold`, averaged over the classes with ground
    truth (`recall` above is at the best-F1 confidence, which the line does not run at)."""
    kept = (conf >= threshold) & tp[:, 0]
    per = [kept[pred_cls == c].sum() / (target_cls == c).sum() for c in np.unique(target_cls)]
    return float(np.mean(per)) if per else 0.0


@dataclass
class DetectionStats:
    """Collects detections and ground truth image by image; `summary` scores them all.

    Boxes of one image must share one frame (input or original pixels): IoU is compared there.
    """

    tp: list = field(default_factory=list)
    conf: list = field(default_factory=list)
    pred_cls: list = field(default_factory=list)
    target_cls: list = field(default_factory=list)
    images: int = 0
    # image level, at the line's threshold: the question a line asks is "defect or not"
    defect_images: int = 0  # with at least one true box
    clean_images: int = 0  # defect-free
    missed_images: int = 0  # defect images with no detection >= OPERATING_CONF on any true box (IoU 0.5)
    overkill_images: int = 0  # defect-free images with any detection >= OPERATING_CONF

    def add(self, pred_xyxy: np.ndarray, scores: np.ndarray, pred_cls: np.ndarray,
            true_xyxy: np.ndarray, true_cls: np.ndarray) -> None:
        order = np.argsort(-np.asarray(scores), kind="stable")  # matching wants confidence order
        pred_xyxy, scores, pred_cls = pred_xyxy[order], np.asarray(scores)[order], np.asarray(pred_cls)[order]
        self.tp.append(match_predictions(pred_cls, np.asarray(true_cls), box_iou(true_xyxy, pred_xyxy)))
        self.conf.append(scores)
        self.pred_cls.append(pred_cls)
        self.target_cls.append(np.asarray(true_cls))
        self.images += 1
        kept = pred_xyxy[scores >= OPERATING_CONF]
        if len(true_xyxy):  # class-agnostic: any kept detection on any true box finds the defect
            self.defect_images += 1
            self.missed_images += not (len(kept) and (box_iou(true_xyxy, kept) >= MATCH_IOU).any())
        else:
            self.clean_images += 1
            self.overkill_images += bool(len(kept))

    def summary(self, names: list[str]) -> dict:
        """The KEYS, plus `images`, `instances` (ground-truth boxes) and the image-level counts and
        rates: `miss_rate` (defect images missed), `overkill_rate` (defect-free images flagged),
        None where the split has no image of that kind."""
        cat = [np.concatenate(v) if v else np.zeros(0) for v in (self.conf, self.pred_cls, self.target_cls)]
        tp = np.concatenate(self.tp) if self.tp else np.zeros((0, len(IOU_THRESHOLDS)), bool)
        d, c = self.defect_images, self.clean_images
        return {**detection_metrics(tp, *cat, names), "images": self.images, "instances": int(len(cat[2])),
                "defect_images": d, "clean_images": c, "missed_images": self.missed_images,
                "overkill_images": self.overkill_images,
                "miss_rate": round(self.missed_images / d, 5) if d else None,
                "overkill_rate": round(self.overkill_images / c, 5) if c else None}
