"""Parity of an exported model with the torch checkpoint it came from.

Both run on the same letterboxed frames. Reported: the max difference of the raw head outputs
(boxes relative to the largest box value, class scores absolute), and whether the detections after NMS
match (same classes, IoU > 0.99 pair by pair). A detection present on one side only counts as a
threshold flip, not a mismatch, when rounding explains it: a score within a few times the
measured score difference of the confidence threshold (or of the max_det cut), an overlap within
0.01 of the NMS IoU threshold, a tie in NMS order or in the choice of class, or suppression by
another such flip. Out of tolerance -> ArtifactError.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from d3n.boxes import box_iou
from d3n.errors import ArtifactError
from d3n.export.nms_graph import NMSSettings
from d3n.runtime.postprocess import decode_raw_indexed

TOLERANCE = {  # (boxes: max |diff| / max |box|, per image; scores: max |diff|)
    "fp32": (1e-3, 2e-3),
    "fp16": (1e-2, 2e-2),
}
MATCH_IOU = 0.99


def nms_numpy(raw: np.ndarray, s: NMSSettings, return_index: bool = False):
    """One raw head output (4 + nc, N) through the runtime's own decode and NMS -> (k, 6) rows of
    xyxy, score, class (and the anchor index of each row when return_index), so parity judges the
    detections the deployed runtime would report."""
    nc = raw.shape[0] - 4
    det, anchors = decode_raw_indexed(raw, np.full(nc, s.conf, np.float32), s.iou, s.max_det)
    rows = np.concatenate([det.xyxy, det.scores[:, None], det.class_ids[:, None].astype(np.float32)], 1)
    return (rows, anchors) if return_index else rows


@dataclass
class DetectionMatch:
    n_ref: int = 0
    n_test: int = 0
    matched: int = 0
    flips: int = 0  # one-sided, but explained by a threshold decision (see _borderline)
    unmatched: int = 0  # one-sided and not explained: a real difference
    min_iou: float = 1.0


IOU_FLIP = 0.01  # an overlap this close to the NMS IoU threshold can go either way


def _borderline(a: np.ndarray, lone_a: set, b: np.ndarray, lone_b: set, s: NMSSettings, band: float
                ) -> tuple[set, set]:
    """One-sided detections that tiny numeric differences explain: a score within `band` of the
    confidence threshold or of the other side's lowest score when it hit max_det; an overlap within
    IOU_FLIP of the IoU threshold with a detection of the other side that scores about as high or
    higher; suppression by a detection with a tied score (NMS order) or by a flipped one."""

    def at_threshold(x: np.ndarray, i: int, y: np.ndarray) -> bool:
        capped = len(y) >= s.max_det and x[i, 4] <= y[:, 4].min() + band
        return bool(x[i, 4] <= s.conf + band or capped)

    ok_a = {i for i in lone_a if at_threshold(a, i, b)}
    ok_b = {j for j in lone_b if at_threshold(b, j, a)}
    changed = True
    while changed:
        changed = False
        for x, lone, ok, y, ok_other in ((a, lone_a, ok_a, b, ok_b), (b, lone_b, ok_b, a, ok_a)):
            for i in lone - ok:
                sup = np.where((y[:, 5] == x[i, 5]) & (y[:, 4] >= x[i, 4] - band))[0]
                if not len(sup):
                    continue
                ious = box_iou(x[i:i + 1, :4], y[sup, :4])[0]
                near = np.abs(ious - s.iou) <= IOU_FLIP
                by_flip = (ious > s.iou) & np.isin(sup, list(ok_other))
                by_tie = (ious > s.iou) & (np.abs(y[sup, 4] - x[i, 4]) <= band)
                if near.any() or by_flip.any() or by_tie.any():
                    ok.add(i)
                    changed = True
    return ok_a, ok_b


def match_detections(ref: np.ndarray, test: np.ndarray, s: NMSSettings, band: float,
                     box_px: float = 0.0, class_margin: np.ndarray | None = None) -> DetectionMatch:
    """Pair detections of the same class with IoU > 0.99, or, for boxes of a few pixels where
    IoU is that sensitive, with every coordinate within `box_px` (the raw-output tolerance).
    class_margin: per ref row, its best minus second-best class score; a pair whose classes differ
    where that margin is within `band` is a tie in the class choice (a flip)."""
    m = DetectionMatch(n_ref=len(ref), n_test=len(test))
    used = np.zeros(len(test), bool)
    ious = box_iou(ref[:, :4], test[:, :4]) if len(ref) and len(test) else np.zeros((len(ref), len(test)))
    lone_ref = set()
    for i, r in enumerate(ref):
        close = (ious[i] > MATCH_IOU) | (np.abs(test[:, :4] - r[:4]).max(1) <= box_px) if len(test) else []
        cand = np.where(~used & (test[:, 5] == r[5]) & close)[0] if len(test) else []
        if len(cand):
            j = cand[np.argmax(ious[i, cand])]
            used[j] = True
            m.matched += 1
            m.min_iou = min(m.min_iou, float(ious[i, j]))
        elif class_margin is not None and class_margin[i] <= band and len(test) and (
                tie := np.where(~used & close & (np.abs(test[:, 4] - r[4]) <= band))[0]).size:
            used[tie[0]] = True
            m.flips += 1
        else:
            lone_ref.add(i)
    lone_test = set(np.where(~used)[0].tolist())
    ok_ref, ok_test = _borderline(ref, lone_ref, test, lone_test, s, band)
    m.flips += len(ok_ref) + len(ok_test)
    m.unmatched = len(lone_ref) + len(lone_test) - len(ok_ref) - len(ok_test)
    return m


@dataclass
class ParityReport:
    images: int
    precision: str
    max_rel_diff_box: float
    max_abs_diff_score: float
    tolerance_box: float
    tolerance_score: float
    detections_ref: int
    detections_test: int
    detections_matched: int
    detections_flipped: int
    detections_unmatched: int
    min_match_iou: float
    nms: dict = field(default_factory=dict)
    passed: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        return (f"parity ({self.images} images, {self.precision}): max rel. diff boxes {self.max_rel_diff_box:.3g} "
                f"(tol {self.tolerance_box:g}), scores {self.max_abs_diff_score:.3g} (tol {self.tolerance_score:g}); "
                f"detections {self.detections_matched}/{self.detections_ref} matched, "
                f"{self.detections_flipped} threshold flips, {self.detections_unmatched} unmatched -> {'PASS' if self.passed else 'FAIL'}")


def torch_raw(model, inputs: list[np.ndarray]) -> list[np.ndarray]:
    import torch

    outs = []
    with torch.inference_mode():
        for x in inputs:
            y = model(torch.from_numpy(x))
            outs.append((y[0] if isinstance(y, (list, tuple)) else y)[0].numpy())
    return outs


def ort_session(path: Path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def ort_run(session, inputs: list[np.ndarray]) -> list[np.ndarray]:
    name = session.get_inputs()[0].name
    dtype = np.float16 if "float16" in session.get_inputs()[0].type else np.float32
    return [session.run(None, {name: x.astype(dtype)})[0][0].astype(np.float32) for x in inputs]


def compare(ref: list[np.ndarray], test: list[np.ndarray], precision: str, s: NMSSettings,
            test_is_nms: bool = False, band: float = 1e-5) -> ParityReport:
    """ref: torch raw outputs; test: raw outputs, or (max_det, 6) rows when the graph has NMS.
    band: score distance from the threshold within which a one-sided detection is tolerated
    (raw outputs: 4x the measured max score difference)."""
    tol_box, tol_score = TOLERANCE[precision]
    d_box = d_score = 0.0
    if not test_is_nms:
        d_box = max(float(np.abs(r[:4] - t[:4]).max() / max(1.0, np.abs(r[:4]).max()))
                    for r, t in zip(ref, test, strict=True))
        d_score = max(float(np.abs(r[4:] - t[4:]).max()) for r, t in zip(ref, test, strict=True))
        band = 4 * d_score + 1e-7
    total = DetectionMatch()
    for r, t in zip(ref, test, strict=True):
        det_t = t[t[:, 4] > 0] if test_is_nms else nms_numpy(t, s)
        box_px = tol_box * max(1.0, float(np.abs(r[:4]).max()))
        det_r, idx = nms_numpy(r, s, return_index=True)
        margin = np.full(len(idx), np.inf)  # one class: no class choice to tie
        if r.shape[0] > 5:
            top2 = np.sort(r[4:, idx], axis=0)[-2:]
            margin = top2[1] - top2[0]
        m = match_detections(det_r, det_t, s, band, box_px, margin)
        for k in ("n_ref", "n_test", "matched", "flips", "unmatched"):
            setattr(total, k, getattr(total, k) + getattr(m, k))
        total.min_iou = min(total.min_iou, m.min_iou)
    passed = d_box <= tol_box and d_score <= tol_score and total.unmatched == 0
    return ParityReport(images=len(ref), precision=precision, max_rel_diff_box=d_box, max_abs_diff_score=d_score,
                        tolerance_box=tol_box, tolerance_score=tol_score, detections_ref=total.n_ref,
                        detections_test=total.n_test, detections_matched=total.matched,
                        detections_flipped=total.flips, detections_unmatched=total.unmatched, min_match_iou=total.min_iou,
                        nms=asdict(s), passed=passed)


def check_parity(model, onnx_path: Path, inputs: list[np.ndarray], precision: str, s: NMSSettings,
                 test_is_nms: bool = False, band: float = 1e-5) -> ParityReport:
    report = compare(torch_raw(model, inputs), ort_run(ort_session(onnx_path), inputs), precision, s,
                     test_is_nms, band)
    if not report.passed:
        raise ArtifactError(f"{onnx_path}: exported model does not match its checkpoint: {report.summary()}")
    return report
