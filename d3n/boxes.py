"""Box geometry shared by the runtime, the export checks and evaluation (NumPy only, never torch).

The edge runtime imports this module, so it must stay importable with only NumPy installed.
Conventions follow ultralytics, because the models are trained and validated there:

- boxes are xyxy pixels unless a name says otherwise;
- NMS suppresses a box whose IoU with a kept, higher-scoring box is > the threshold
  (torchvision's rule); class-aware NMS offsets each class's boxes by `MAX_WH` pixels;
- letterbox: fit (up-scaling allowed), centre, pad; the gains come from the rounded resized size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_WH = 7680  # per-class box offset for class-aware NMS: larger than any image side
NMS_BLOCK = 2048  # up to this many boxes NMS computes the whole IoU matrix at once


def xywh2xyxy(b: np.ndarray) -> np.ndarray:
    """(n, 4) centre x, centre y, width, height -> x1, y1, x2, y2 (same dtype)."""
    out = np.empty_like(b)
    half_w, half_h = b[:, 2] / 2, b[:, 3] / 2
    out[:, 0] = b[:, 0] - half_w
    out[:, 1] = b[:, 1] - half_h
    out[:, 2] = b[:, 0] + half_w
    out[:, 3] = b[:, 1] + half_h
    return out


def box_area(b: np.ndarray) -> np.ndarray:
    """(n, 4) xyxy -> (n,) areas; an inverted box has area 0."""
    return np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of xyxy boxes: (n, 4) x (m, 4) -> (n, m)."""
    w = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    h = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = w * h
    # the epsilon only guards two empty boxes; it is far below float32 resolution for real ones
    return inter / (box_area(a)[:, None] + box_area(b)[None, :] - inter + 1e-12)


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float, max_det: int | None = None,
        block: int = NMS_BLOCK) -> np.ndarray:
    """Greedy NMS; indices of the kept boxes in descending score order (ties: input order).

    Up to `block` boxes the IoU matrix is computed once, so the greedy loop is one cheap row
    lookup per box; beyond that, rows are computed on demand to bound memory.
    """
    order = np.argsort(-scores, kind="stable")
    b = boxes[order].astype(np.float32)
    n = len(b)
    matrix = box_iou(b, b) if n <= block else None
    suppressed = np.zeros(n, dtype=bool)
    keep: list[int] = []
    for i in range(n):
        if suppressed[i]:
            continue
        keep.append(i)
        if max_det is not None and len(keep) >= max_det:
            break  # the rest can only be dropped by the cut
        row = matrix[i, i + 1:] if matrix is not None else box_iou(b[i:i + 1], b[i + 1:])[0]
        suppressed[i + 1:] |= row > iou
    return order[np.asarray(keep, dtype=np.int64)]


def batched_nms(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, iou: float,
                max_det: int | None = None) -> np.ndarray:
    """Class-aware NMS: boxes of different classes never suppress each other.

    One NMS call over boxes shifted by class * MAX_WH, so they cannot overlap across classes;
    ultralytics and the in-graph NMS of `d3n export --nms` use the same shift.
    """
    shifted = boxes + classes[:, None].astype(np.float32) * MAX_WH
    return nms(shifted, scores, iou, max_det)


@dataclass(frozen=True)
class Letterbox:
    """How a frame was mapped into the model input: per-axis gain and the top/left padding."""

    gain_x: float
    gain_y: float
    pad_x: int
    pad_y: int
    orig_shape: tuple[int, int]  # (h, w) of the original frame
    input_shape: tuple[int, int]  # (h, w) of the model input

    @property
    def resized(self) -> tuple[int, int]:
        """(h, w) of the frame once resized, before padding (exact: the gains are size ratios)."""
        h, w = self.orig_shape
        return round(h * self.gain_y), round(w * self.gain_x)

    @property
    def padding(self) -> tuple[int, int, int, int]:
        """(top, bottom, left, right) pixels of padding."""
        nh, nw = self.resized
        return (self.pad_y, self.input_shape[0] - nh - self.pad_y,
                self.pad_x, self.input_shape[1] - nw - self.pad_x)


def letterbox_geometry(orig_shape: tuple[int, int], new_shape: tuple[int, int] | int) -> Letterbox:
    """Where a (h, w) frame lands in a `new_shape` input: ultralytics' LetterBox at inference.

    One scale (the smaller ratio, up-scaling allowed), the resized size rounded, the padding split
    `round(d/2 - 0.1)` before and the rest after. The gains are taken from the rounded size, as
    ultralytics' scale_boxes does, so boxes map back to the pixel they came from.
    """
    if isinstance(new_shape, int):
        new_shape = (new_shape, new_shape)
    h, w = orig_shape
    r = min(new_shape[0] / h, new_shape[1] / w)
    new_w, new_h = max(round(w * r), 1), max(round(h * r), 1)
    left = round((new_shape[1] - new_w) / 2 - 0.1)
    top = round((new_shape[0] - new_h) / 2 - 0.1)
    return Letterbox(gain_x=new_w / w, gain_y=new_h / h, pad_x=left, pad_y=top,
                     orig_shape=(h, w), input_shape=(int(new_shape[0]), int(new_shape[1])))


def scale_boxes(boxes: np.ndarray, lb: Letterbox) -> np.ndarray:
    """Input-pixel xyxy -> original-frame xyxy float32 (undo padding and gain, clip to the frame)."""
    out = boxes.astype(np.float32, copy=True)
    out[:, [0, 2]] = (out[:, [0, 2]] - lb.pad_x) / lb.gain_x
    out[:, [1, 3]] = (out[:, [1, 3]] - lb.pad_y) / lb.gain_y
    h, w = lb.orig_shape
    out[:, [0, 2]] = out[:, [0, 2]].clip(0, w)
    out[:, [1, 3]] = out[:, [1, 3]].clip(0, h)
    return out
