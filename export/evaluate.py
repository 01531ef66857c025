"""Accuracy of an exported ONNX model on a dataset split, as the deployed runtime would detect.

Both the FP32 and the INT8 model go through the same path (ORT CPU, the runtime's letterbox, decode
and NMS at ultralytics' val settings, `d3n.metrics` matching and AP), so the two numbers compare,
and they compare with training's: the same `d3n.metrics` keys, as fractions. Given a runtime
backend, the model runs on it instead (e.g. OpenVINO, for `d3n bench`), the rest unchanged.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from d3n.boxes import xywh2xyxy
from d3n.data.layout import DatasetLayout
from d3n.errors import ArtifactError
from d3n.metrics import DetectionStats

CONF, IOU, MAX_DET = 0.001, 0.7, 300  # ultralytics' val settings, as training scores


def evaluate_onnx(model_path: Path, data: str | Path, imgsz: tuple[int, int], split: str = "val",
                  backend=None) -> dict:
    """`d3n.metrics` summary (plus `split`) of a raw-head ONNX model on DATA's `split`: on ORT CPU,
    or through `backend`, a runtime backend already holding the model (e.g. OpenVINO, for `d3n
    bench`, which times the same loaded model)."""
    from d3n.export.parity import ort_run, ort_session

    layout = DatasetLayout.open(data)
    if backend is not None:
        return _score(model_path, layout, imgsz, split, backend.infer)
    session = ort_session(model_path)
    return _score(model_path, layout, imgsz, split, lambda blob: ort_run(session, [blob])[0])


def _score(model_path: Path, layout: DatasetLayout, imgsz: tuple[int, int], split: str, infer) -> dict:
    from d3n.export.calib import read_image
    from d3n.runtime.postprocess import class_thresholds, postprocess
    from d3n.runtime.preprocess import prepare

    thresholds = class_thresholds(layout.nc, CONF)
    stats = DetectionStats()
    for path in layout.images(split):
        img = read_image(path)
        blob, lb = prepare(img, imgsz)
        det = postprocess(infer(blob), lb, thresholds, iou=IOU, max_det=MAX_DET)
        labels = layout.labels(path)
        h, w = img.shape[:2]
        # labels are normalised xywh; detections come back in original-frame pixels
        true_xyxy = xywh2xyxy(labels[:, 1:5] * np.array([w, h, w, h], np.float32))
        stats.add(det.xyxy, det.scores, det.class_ids, true_xyxy, labels[:, 0].astype(np.int64))
    out = {**stats.summary(list(layout.names)), "split": split}
    if not all(math.isfinite(out[k]) for k in ("mAP50", "mAP50-95")):
        raise ArtifactError(f"{model_path}: evaluation on {layout.yaml_path} gave non-finite mAP {out}")
    return out
