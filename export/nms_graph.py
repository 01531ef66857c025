"""NMS inside the exported graph (`d3n export --nms`): the model then outputs (1, max_det, 6) rows
of x1, y1, x2, y2, score, class, padded with zero rows, so a consumer needs no post-processing.

ONNX: the raw head (1, 4 + nc, anchors) is decoded the way ultralytics' `non_max_suppression`
does it (single best class per anchor, boxes shifted by class * 7680 so one NonMaxSuppression
call is class-aware). TensorRT: the EfficientNMS_TRT plugin (per-class selection), rows past its
`num_detections` zeroed. Both are appended to the exported graph with onnx helper nodes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from d3n.boxes import MAX_WH  # the class offset of the runtime's NMS, so both select alike
from d3n.errors import D3NError

RAW = "raw_output0"
OUT = "output0"


@dataclass(frozen=True)
class NMSSettings:
    conf: float = 0.25  # ultralytics' predict defaults
    iou: float = 0.7
    max_det: int = 300


class _Graph:
    """Small builder: adds constants and nodes with unique names under a prefix."""

    def __init__(self, graph: onnx.GraphProto, prefix: str):
        self.g, self.prefix, self.n = graph, prefix, 0

    def name(self, hint: str) -> str:
        self.n += 1
        return f"{self.prefix}/{hint}_{self.n}"

    def const(self, value, dtype=np.int64) -> str:
        name = self.name("const")
        self.g.initializer.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op_type: str, inputs: list[str], outputs: int | list[str] = 1, **attrs) -> list[str]:
        outs = outputs if isinstance(outputs, list) else [self.name(op_type.lower()) for _ in range(outputs)]
        self.g.node.append(helper.make_node(op_type, inputs, outs, name=self.name(op_type), **attrs))
        return outs

    def one(self, op_type: str, inputs: list[str], **attrs) -> str:
        return self.op(op_type, inputs, 1, **attrs)[0]


def _detach_raw_output(model: onnx.ModelProto) -> int:
    """Rename the raw head output so the NMS result can take its name; returns nc."""
    g = model.graph
    if len(g.output) != 1:
        raise D3NError(f"--nms expects a single raw output, the graph has {len(g.output)}")
    raw = g.output[0]
    dims = [d.dim_value for d in raw.type.tensor_type.shape.dim]
    if len(dims) != 3 or dims[0] not in (0, 1) or dims[1] <= 4:
        raise D3NError(f"--nms expects a raw head of shape (1, 4 + nc, anchors), got {dims}")
    for node in g.node:
        node.output[:] = [RAW if o == raw.name else o for o in node.output]
    g.output.remove(raw)
    return dims[1] - 4


def _split_head(b: _Graph, nc: int) -> tuple[str, str]:
    """(1, 4 + nc, N) -> boxes xyxy (1, N, 4) and class scores (1, N, nc)."""
    t = b.one("Transpose", [RAW], perm=[0, 2, 1])
    ax = b.const([2])
    xy = b.one("Slice", [t, b.const([0]), b.const([2]), ax])
    wh = b.one("Slice", [t, b.const([2]), b.const([4]), ax])
    cls = b.one("Slice", [t, b.const([4]), b.const([4 + nc]), ax])
    half = b.one("Mul", [wh, b.const(0.5, np.float32)])
    xyxy = b.one("Concat", [b.one("Sub", [xy, half]), b.one("Add", [xy, half])], axis=2)
    return xyxy, cls


def _pad_rows(b: _Graph, det: str, max_det: int) -> None:
    """(K, 6) -> (1, max_det, 6), zero rows after the K detections."""
    k = b.one("Slice", [b.one("Shape", [det]), b.const([0]), b.const([1])])
    pad = b.one("Sub", [b.const([max_det]), k])
    zero = b.const([0])
    pads = b.one("Concat", [zero, zero, pad, zero], axis=0)
    padded = b.one("Pad", [det, pads, b.const(0.0, np.float32)], mode="constant")
    b.op("Unsqueeze", [padded, b.const([0])], [OUT])


def _set_output(model: onnx.ModelProto, max_det: int) -> None:
    model.graph.output.append(helper.make_tensor_value_info(OUT, TensorProto.FLOAT, [1, max_det, 6]))


def append_onnx_nms(src: Path, dst: Path, s: NMSSettings) -> Path:
    """Append ultralytics-equivalent NMS (ONNX NonMaxSuppression) to a raw-head model."""
    model = onnx.load(str(src))
    nc = _detach_raw_output(model)
    b = _Graph(model.graph, "d3n_nms")
    xyxy, cls = _split_head(b, nc)
    label = b.one("ArgMax", [cls], axis=2, keepdims=1)  # (1, N, 1) best class per anchor
    score = b.one("GatherElements", [cls, label], axis=2)  # (1, N, 1)
    label_f = b.one("Cast", [label], to=TensorProto.FLOAT)
    shifted = b.one("Add", [xyxy, b.one("Mul", [label_f, b.const(MAX_WH, np.float32)])])
    scores = b.one("Transpose", [score], perm=[0, 2, 1])  # (1, 1, N)
    sel = b.one("NonMaxSuppression", [shifted, scores, b.const([s.max_det]), b.const([s.iou], np.float32),
                                      b.const([s.conf], np.float32)], center_point_box=0)
    idx = b.one("Reshape", [b.one("Gather", [sel, b.const([2])], axis=1), b.const([-1])])
    rows = b.one("Squeeze", [b.one("Concat", [xyxy, score, label_f], axis=2), b.const([0])])  # (N, 6)
    _pad_rows(b, b.one("Gather", [rows, idx], axis=0), s.max_det)
    _set_output(model, s.max_det)
    return _save(model, dst)


def append_trt_nms(src: Path, dst: Path, s: NMSSettings) -> Path:
    """Append TensorRT's EfficientNMS_TRT plugin; the same (1, max_det, 6) output as ONNX NMS."""
    model = onnx.load(str(src))
    nc = _detach_raw_output(model)
    b = _Graph(model.graph, "d3n_trt_nms")
    xyxy, cls = _split_head(b, nc)
    num, boxes, scores, classes = b.op(
        "EfficientNMS_TRT", [xyxy, cls], 4, background_class=-1, box_coding=0, iou_threshold=s.iou,
        score_threshold=s.conf, max_output_boxes=s.max_det, score_activation=0, class_agnostic=0,
        plugin_version="1")
    cls_f = b.one("Unsqueeze", [b.one("Cast", [classes], to=TensorProto.FLOAT), b.const([2])])
    score_u = b.one("Unsqueeze", [scores, b.const([2])])
    rows = b.one("Concat", [boxes, score_u, cls_f], axis=2)  # (1, max_det, 6)
    # Rows past num_detections are undefined: zero them.
    rng = b.one("Range", [b.const(0, np.int32), b.const(s.max_det, np.int32), b.const(1, np.int32)])
    valid = b.one("Unsqueeze", [b.one("Less", [rng, b.one("Reshape", [num, b.const([1])])]), b.const([0, 2])])
    b.op("Where", [valid, rows, b.const(0.0, np.float32)], [OUT])
    _set_output(model, s.max_det)
    return _save(model, dst)


def _save(model: onnx.ModelProto, dst: Path) -> Path:
    from d3n.artifacts import save_with

    if not any(o.domain == "" for o in model.opset_import) or max(
            o.version for o in model.opset_import if o.domain == "") < 13:
        raise D3NError(f"{dst}: --nms needs opset >= 13")
    save_with(dst, lambda p: onnx.save(model, str(p)))
    return dst
