"""onnx-int8: ORT static QDQ quantization runs, stays runnable on ORT CPU, and is scored beside FP32."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest

from d3n import sidecar
from d3n.export.exporter import ExportOptions, export_model
from d3n.metrics import KEYS


@pytest.fixture(scope="module")
def int8_export(tiny_ckpt, synth_small, tmp_path_factory):
    out = tmp_path_factory.mktemp("int8")
    return export_model(ExportOptions(model=tiny_ckpt, format="onnx-int8", imgsz=(128, 128), calib=synth_small,
                                      calib_images=8, parity_images=2, out=out))


def test_int8_is_scored_beside_fp32(int8_export):
    metrics = json.loads(int8_export.model.with_name("model.int8.metrics.json").read_text())
    for key in ("fp32", "int8"):
        # the keys and unit of training's metrics.json (d3n.metrics): fractions
        assert set(KEYS) <= set(metrics[key])
        for k in ("mAP50", "mAP50-95", "precision", "recall"):
            assert math.isfinite(metrics[key][k]) and 0 <= metrics[key][k] <= 1
        assert metrics[key]["split"] == "val" and metrics[key]["images"] > 0
    assert metrics["fp32"]["model"] == "model.onnx" and metrics["int8"]["model"] == "model.int8.onnx"
    assert metrics["mAP50_drop"] == pytest.approx(metrics["fp32"]["mAP50"] - metrics["int8"]["mAP50"], abs=1e-5)
    assert sidecar.load(int8_export.model).extra["metrics"] == metrics


def test_int8_model_is_qdq_with_float_head_decode(int8_export):
    from d3n.export.int8 import head_decode_nodes

    q = onnx.load(str(int8_export.model))
    ops = [n.op_type for n in q.graph.node]
    assert ops.count("QuantizeLinear") > 50 and ops.count("DequantizeLinear") > 50
    # per-channel weights: weight scales are vectors
    inits = {i.name: i for i in q.graph.initializer}
    assert any(len(inits[n.input[1]].dims) == 1 and inits[n.input[1]].dims[0] > 1
               for n in q.graph.node if n.op_type == "DequantizeLinear" and n.input[1] in inits)
    # the decode (boxes in pixels concatenated with 0-1 scores) stays float
    produced_by = {o: n for n in q.graph.node for o in n.output}
    assert produced_by[q.graph.output[0].name].op_type == "Concat"
    assert head_decode_nodes(q)
    # the stem conv keeps float weights and a float input: quantized, it cost 6.9 mAP50 points
    stem = next(n for n in q.graph.node if n.op_type == "Conv" and n.name.startswith("/model.0/"))
    assert stem.input[0] == q.graph.input[0].name
    assert stem.input[1] in inits and inits[stem.input[1]].data_type == onnx.TensorProto.FLOAT
    sc = sidecar.load(int8_export.model)
    assert sc.format == "onnx-int8" and sc.precision == "int8"
    assert sc.extra["quantization"]["format"] == "QDQ" and sc.extra["quantization"]["per_channel"]
    assert sc.extra["quantization"]["calibration_images"] == 8


def test_int8_runs_on_ort_cpu_close_to_fp32(int8_export):
    import onnxruntime as ort

    from d3n.export.calib import batches, synthetic_images

    fp32 = ort.InferenceSession(str(int8_export.model.with_name("model.onnx")), providers=["CPUExecutionProvider"])
    int8 = ort.InferenceSession(str(int8_export.model), providers=["CPUExecutionProvider"])
    for x in batches(synthetic_images(2, seed=3), (128, 128)):
        a, b = fp32.run(None, {"images": x})[0], int8.run(None, {"images": x})[0]
        assert a.shape == b.shape and np.isfinite(b).all()
        # boxes within a few pixels on a 128 px input: quantization noise, not a broken graph
        assert np.median(np.abs(a[0, :4] - b[0, :4])) < 4.0


def test_int8_out_file_is_the_int8_model(tiny_ckpt, synth_small, tmp_path):
    """`--out X.onnx` names the file the format produces, here the INT8 model, as the pipeline's
    export stage relies on (`--out student-int8.onnx`); the FP32 model goes beside it as
    X.fp32.onnx (docs/deploy.md)."""
    out = tmp_path / "student-int8.onnx"
    res = export_model(ExportOptions(model=tiny_ckpt, format="onnx-int8", imgsz=(128, 128), calib=synth_small,
                                     calib_images=2, parity=False, evaluate=False, out=out))
    assert res.model == out and res.sidecar == tmp_path / "student-int8.json"
    assert sidecar.load(out).precision == "int8"
    assert sidecar.load(tmp_path / "student-int8.fp32.onnx").precision == "fp32"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "student-int8.fp32.json", "student-int8.fp32.onnx", "student-int8.json", "student-int8.onnx"]
