"""Decode model outputs into detections in original-image pixels (numpy only).

Raw head (sidecar output.kind == "raw"): (1, 4 + nc, N), xywh in input pixels then per-class
sigmoid scores, no objectness (ultralytics' anchor-free YOLOv5 "v5u" head). Decoding follows
ultralytics' `non_max_suppression`: best class per anchor, strict `score > conf`, at most 30000
candidates by score, class-aware greedy NMS (boxes offset per class), `max_det` kept.
NMS in the graph (kind == "nms"): (1, max_det, 6) rows of x1, y1, x2, y2, score, class.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from d3n.runtime.preprocess import Letterbox

MAX_NMS = 30000  # candidates kept before NMS, as ultralytics
MAX_WH = 7680  # per-class box offset for class-aware NMS, as ultralytics


@dataclass
class Detections:
    """Detections of one frame: xyxy (n, 4) float32 pixels, scores (n,), class ids (n,) int."""

    xyxy: np.ndarray
    scores: np.ndarray
    class_ids: np.ndarray

    @classmethod
    def empty(cls) -> Detections:
        return cls(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64))

    def __len__(self) -> int:
        return len(self.scores)

    def select(self, keep: np.ndarray) -> Detections:
        return Detections(self.xyxy[keep], self.scores[keep], self.class_ids[keep])

    def to_list(self, names: list[str]) -> list[dict]:
        """JSON-ready rows: class name and id, score, xyxy (rounded to 0.01 px)."""
        return [
            {"class_id": int(c), "class": names[int(c)] if 0 <= c < len(names) else str(int(c)),
             "score": round(float(s), 5), "xyxy": [round(float(v), 2) for v in box]}
            for box, s, c in zip(self.xyxy, self.scores, self.class_ids, strict=False)
        ]


def xywh2xyxy(b: np.ndarray) -> np.ndarray:
    out = np.empty_like(b)
    half_w, half_h = b[:, 2] / 2, b[:, 3] / 2
    out[:, 0] = b[:, 0] - half_w
    out[:, 1] = b[:, 1] - half_h
    out[:, 2] = b[:, 0] + half_w
    out[:, 3] = b[:, 1] + half_h
    return out


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of xyxy boxes: (n, 4) x (m, 4) -> (n, m)."""
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    w = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    h = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = w * h
    return inter / (area_a[:, None] + area_b[None, :] - inter + 1e-12)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_thres: float, block: int = 2048) -> np.ndarray:
    """Greedy NMS; returns indices of kept boxes in descending score order.

    A box is suppressed when its IoU with a kept, higher-scoring box is > `iou_thres`
    (torchvision's rule). Up to `block` boxes the IoU matrix is computed once, so the greedy
    loop is one cheap row lookup per box; beyond that, rows are computed on demand.
    """
    order = np.argsort(-scores, kind="stable")
    b = boxes[order].astype(np.float32)
    n = len(b)
    iou = box_iou(b, b) if n <= block else None
    suppressed = np.zeros(n, dtype=bool)
    keep = []
    for i in range(n):
        if suppressed[i]:
            continue
        keep.append(i)
        row = iou[i, i + 1:] if iou is not None else box_iou(b[i:i + 1], b[i + 1:])[0]
        suppressed[i + 1:] |= row > iou_thres
    return order[np.asarray(keep, dtype=np.int64)]


def class_thresholds(nc: int, conf: float, class_conf: dict[int, float] | None = None) -> np.ndarray:
    """Per-class score thresholds: `conf` everywhere, overridden per class id."""
    thr = np.full(nc, conf, dtype=np.float32)
    for cid, value in (class_conf or {}).items():
        thr[cid] = value
    return thr


def decode_raw(output: np.ndarray, thresholds: np.ndarray, iou: float = 0.7,
               max_det: int = 300, box_format: str = "xywh") -> Detections:
    """(1, 4 + nc, N) raw head output -> detections in input pixels after class-aware NMS.

    `thresholds` holds one score threshold per class (see `class_thresholds`); a candidate is
    kept when its best class score is > that class's threshold.
    """
    pred = np.asarray(output, dtype=np.float32)
    pred = pred[0] if pred.ndim == 3 else pred
    cls_scores = pred[4:]
    best = cls_scores.argmax(0)
    score = cls_scores[best, np.arange(cls_scores.shape[1])]
    keep = score > thresholds[best]
    if not keep.any():
        return Detections.empty()
    boxes = pred[:4, keep].T
    boxes = xywh2xyxy(boxes) if box_format == "xywh" else boxes.copy()
    score, best = score[keep], best[keep]
    if len(score) > MAX_NMS:
        top = np.argsort(-score, kind="stable")[:MAX_NMS]
        boxes, score, best = boxes[top], score[top], best[top]
    kept = nms(boxes + best[:, None].astype(np.float32) * MAX_WH, score, iou)[:max_det]
    return Detections(boxes[kept], score[kept], best[kept].astype(np.int64))


def decode_nms(output: np.ndarray, thresholds: np.ndarray, max_det: int = 300) -> Detections:
    """(1, max_det, 6) in-graph NMS output -> detections in input pixels (score filter only)."""
    rows = np.asarray(output, dtype=np.float32)
    rows = rows[0] if rows.ndim == 3 else rows
    cls = rows[:, 5].astype(np.int64)
    valid = (cls >= 0) & (cls < len(thresholds))
    keep = valid & (rows[:, 4] > thresholds[np.clip(cls, 0, len(thresholds) - 1)])
    rows, cls = rows[keep][:max_det], cls[keep][:max_det]
    return Detections(rows[:, :4].copy(), rows[:, 4].copy(), cls)


def scale_boxes(boxes: np.ndarray, lb: Letterbox) -> np.ndarray:
    """Input-pixel xyxy -> original-frame xyxy (undo padding and gain, clip to the frame)."""
    out = boxes.astype(np.float32, copy=True)
    out[:, [0, 2]] = (out[:, [0, 2]] - lb.pad_x) / lb.gain_x
    out[:, [1, 3]] = (out[:, [1, 3]] - lb.pad_y) / lb.gain_y
    h, w = lb.orig_shape
    out[:, [0, 2]] = out[:, [0, 2]].clip(0, w)
    out[:, [1, 3]] = out[:, [1, 3]].clip(0, h)
    return out


def postprocess(output: np.ndarray, lb: Letterbox, thresholds: np.ndarray, kind: str = "raw",
                iou: float = 0.7, max_det: int = 300, box_format: str = "xywh") -> Detections:
    """Model output -> detections in original-frame pixels.

    `kind` and `box_format` come from the sidecar's `output` block ("raw"/"nms", and for a
    raw head "xywh"/"xyxy"); `thresholds` is one score threshold per class
    (`class_thresholds(nc, conf, class_conf)`).
    """
    if kind == "nms":
        det = decode_nms(output, thresholds, max_det)
    else:
        det = decode_raw(output, thresholds, iou, max_det, box_format)
    if len(det):
        det.xyxy = scale_boxes(det.xyxy, lb)
    return det
