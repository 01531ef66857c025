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

from d3n.boxes import Letterbox, batched_nms, scale_boxes, xywh2xyxy

MAX_NMS = 30000  # candidates kept before NMS, as ultralytics


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
    return decode_raw_indexed(output, thresholds, iou, max_det, box_format)[0]


def decode_raw_indexed(output: np.ndarray, thresholds: np.ndarray, iou: float = 0.7,
                       max_det: int = 300, box_format: str = "xywh") -> tuple[Detections, np.ndarray]:
    """`decode_raw`, plus the anchor (column of `output`) each detection came from.

    The export parity check needs the anchors to look at the class scores behind a detection.
    """
    pred = np.asarray(output, dtype=np.float32)
    pred = pred[0] if pred.ndim == 3 else pred
    cls_scores = pred[4:]
    best = cls_scores.argmax(0)
    score = cls_scores[best, np.arange(cls_scores.shape[1])]
    anchors = np.flatnonzero(score > thresholds[best])
    if not len(anchors):
        return Detections.empty(), anchors
    boxes = pred[:4, anchors].T
    boxes = xywh2xyxy(boxes) if box_format == "xywh" else boxes.copy()
    score, best = score[anchors], best[anchors]
    if len(score) > MAX_NMS:
        top = np.argsort(-score, kind="stable")[:MAX_NMS]
        boxes, score, best, anchors = boxes[top], score[top], best[top], anchors[top]
    kept = batched_nms(boxes, score, best, iou, max_det)
    return Detections(boxes[kept], score[kept], best[kept].astype(np.int64)), anchors[kept]


def decode_nms(output: np.ndarray, thresholds: np.ndarray, max_det: int = 300) -> Detections:
    """(1, max_det, 6) in-graph NMS output -> detections in input pixels (score filter only)."""
    rows = np.asarray(output, dtype=np.float32)
    rows = rows[0] if rows.ndim == 3 else rows
    cls = rows[:, 5].astype(np.int64)
    valid = (cls >= 0) & (cls < len(thresholds))
    keep = valid & (rows[:, 4] > thresholds[np.clip(cls, 0, len(thresholds) - 1)])
    rows, cls = rows[keep][:max_det], cls[keep][:max_det]
    return Detections(rows[:, :4].copy(), rows[:, 4].copy(), cls)


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
