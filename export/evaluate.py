"""mAP of an exported ONNX model on a dataset split, scored by ultralytics' validator.

Both the FP32 and the INT8 model go through the same path (ORT CPU, the same letterbox, the same
NMS and matching), so the two numbers are comparable.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

from d3n.data.layout import DatasetLayout
from d3n.errors import ArtifactError


def map50(model_path: Path, data: str | Path, imgsz: tuple[int, int], split: str = "val") -> dict:
    from d3n.offline import ultralytics

    layout = DatasetLayout.open(data)
    yolo = ultralytics().YOLO(str(model_path), task="detect")
    size = imgsz[0] if imgsz[0] == imgsz[1] else max(imgsz)  # the validator takes one square size
    with tempfile.TemporaryDirectory(prefix="d3n-val-") as tmp:
        metrics = yolo.val(data=str(layout.yaml_path), imgsz=size, batch=1, split=split, device="cpu",
                           plots=False, save_json=False, verbose=False, project=tmp, name="val", exist_ok=True)
    out = {"mAP50": float(metrics.box.map50) * 100, "mAP50_95": float(metrics.box.map) * 100,
           "images": len(layout.images(split)), "split": split}
    if not all(math.isfinite(v) for v in (out["mAP50"], out["mAP50_95"])):
        raise ArtifactError(f"{model_path}: evaluation on {layout.yaml_path} gave non-finite mAP {out}")
    return out
