"""`d3n bench` runs every measurement it promises on a small model and writes them as JSON."""

from __future__ import annotations

import importlib.util
import json
import math

from d3n.cli import main


def test_bench_side_by_side(tiny_ckpt, synth_small, tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = main(["bench", "--model", str(tiny_ckpt), "--imgsz", "64", "--frames", "12", "--iters", "4",
               "--calib", str(synth_small), "--out", str(tmp_path / "models"), "--json", str(out)])
    assert rc == 0
    r = json.loads(out.read_text())
    assert r["hardware"]["cpu"] and r["hardware"]["cores"]
    rows = {(row["backend"].split(" ")[0], row["model"]) for row in r["model_only"]}
    assert {("onnxruntime-cpu", "model.onnx"), ("onnxruntime-cpu", "model.int8.onnx"),
            ("torch-eager-cpu", "tiny.pt")} <= rows
    if importlib.util.find_spec("openvino"):  # OpenVINO rows on the same two files, when installed
        assert {("openvino-cpu", "model.onnx"), ("openvino-cpu", "model.int8.onnx")} <= rows
    for row in r["model_only"]:
        assert 0 < row["p50_ms"] <= row["p99_ms"] and row["fps"] > 0
    e2e = r["end_to_end"]
    assert set(e2e) == {"d3n_fp32", "d3n_int8", "ultralytics_fp32"}
    assert e2e["d3n_fp32"]["frames"] == 12 and all(v["fps"] > 0 for v in e2e.values())
    assert math.isfinite(r["accuracy"]["fp32"]["mAP50"]) and math.isfinite(r["accuracy"]["int8"]["mAP50"])
    for key in ("e2e_over_model_only_fp32", "int8_over_fp32_latency_p50", "d3n_over_ultralytics_e2e"):
        assert math.isfinite(r["ratios"][key]) and r["ratios"][key] > 0
    printed = capsys.readouterr().out
    assert "model-only" in printed and "end-to-end" in printed
