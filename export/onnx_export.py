"""Checkpoint -> ONNX (opset >= 17, simplified with onnxslim) through ultralytics' exporter.

The exporter writes next to its input checkpoint, so it runs on a symlink in a scratch folder
and the result is moved to the requested path; the user's checkpoint folder stays untouched.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from d3n import __version__
from d3n.artifacts import save_with, sha256_file
from d3n.errors import D3NError
from d3n.export.checkpoint import Checkpoint
from d3n.sidecar import OutputLayout, Preprocess, Sidecar

log = logging.getLogger(__name__)
OPSET = 17


def num_anchors(imgsz: tuple[int, int], strides: list[int]) -> int:
    return sum((imgsz[0] // s) * (imgsz[1] // s) for s in strides)


def export_onnx(ckpt: Checkpoint, out: Path, imgsz: tuple[int, int], dynamic: bool = False,
                half: bool = False, opset: int = OPSET) -> Path:
    """Export the raw head, (batch, 4 + nc, anchors), to `out`."""
    if half:
        from d3n.export.engine import cuda_device_count

        if cuda_device_count() == 0:
            raise D3NError(f"{ckpt.path}: --half ONNX export needs a CUDA device (FP16 is traced on the GPU)")
    with tempfile.TemporaryDirectory(prefix="d3n-export-") as tmp:
        link = Path(tmp) / "model.pt"
        os.symlink(ckpt.path.resolve(), link)
        from d3n.offline import ultralytics

        yolo = ultralytics().YOLO(str(link), task="detect")
        try:
            produced = yolo.export(format="onnx", imgsz=list(imgsz), opset=opset, simplify=True,
                                   dynamic=dynamic, half=half, device=0 if half else "cpu", batch=1)
        except Exception as exc:
            raise D3NError(f"{ckpt.path}: ONNX export failed ({exc})") from exc
        save_with(out, lambda p: shutil.copyfile(produced, p))
    return out


def build_sidecar(ckpt: Checkpoint, model_path: Path, fmt: str, imgsz: tuple[int, int],
                  precision: str = "fp32", dynamic: bool = False, nms_max_det: int | None = None,
                  extra: dict | None = None) -> Sidecar:
    batch: int | str = "dynamic" if dynamic else 1
    if nms_max_det is None:
        output = OutputLayout(kind="raw", shape=[batch, 4 + ckpt.nc, num_anchors(imgsz, ckpt.strides)],
                              box_format="xywh")
    else:
        output = OutputLayout(kind="nms", shape=[batch, nms_max_det, 6], box_format="xyxy")
    return Sidecar(
        format=fmt, model_file=model_path.name, model_sha256=sha256_file(model_path),
        names=ckpt.names, imgsz=list(imgsz), strides=ckpt.strides, batch=batch, precision=precision,
        preprocess=Preprocess(dtype="float16" if precision == "fp16" and fmt != "engine" else "float32"),
        output=output, source_checkpoint=str(ckpt.path), source_sha256=ckpt.sha256,
        d3n_version=__version__, extra=dict(extra or {}),
    )
