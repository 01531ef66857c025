"""`d3n bench` runs every measurement it promises on a small model and writes them as JSON."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from d3n.cli import main


def test_bench_side_by_side(tiny_ckpt, synth_small, tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = main(["bench", "--model", str(tiny_ckpt), "--imgsz", "64", "--frames", "12", "--iters", "4",
               "--calib", str(synth_small), "--out", str(tmp_path / "models"), "--json", str(out)])
    assert rc == 0
    r = json.loads(out.read_text())
    assert r["hardware"]["cpu"] and r["hardware"]["cores"]
    assert r["split"] == "val"  # synth_small has no test split: val, with a warning
    rows = {(row["backend"].split(" ")[0], row["model"]) for row in r["model_only"]}
    assert {("onnxruntime-cpu", "model.onnx"), ("onnxruntime-cpu", "model.int8.onnx"),
            ("torch-eager-cpu", "tiny.pt")} <= rows
    have_openvino = importlib.util.find_spec("openvino") is not None
    if have_openvino:  # OpenVINO rows on the same two files, when installed
        assert {("openvino-cpu", "model.onnx"), ("openvino-cpu", "model.int8.onnx")} <= rows
    for row in r["model_only"]:
        assert 0 < row["p50_ms"] <= row["p99_ms"] and row["fps"] > 0
    by = {(row["backend"], row["model"]): row for row in r["model_only"]}
    for (backend, model), row in by.items():  # every d3n backend scored on the same split and path
        if not backend.startswith("torch-eager-cpu"):
            assert row["split"] == "val" and math.isfinite(row["mAP50"]), (backend, model)
    assert abs(by[("onnxruntime-cpu", "model.onnx")]["mAP50"] - r["accuracy"]["fp32"]["mAP50"]) < 1e-6  # one path
    if have_openvino:  # FP32 on two runtimes: the same detections up to float rounding
        assert abs(by[("openvino-cpu", "model.onnx")]["mAP50"] - r["accuracy"]["fp32"]["mAP50"]) < 0.01
        assert ("openvino-cpu (bf16)", "model.onnx") in by
    e2e = r["end_to_end"]
    ov = {"ultralytics_openvino", "d3n_openvino_bf16", "d3n_openvino_int8"} if have_openvino else set()
    if have_openvino and importlib.util.find_spec("nncf"):
        ov.add("ultralytics_openvino_int8")
    assert set(e2e) == {"d3n_fp32", "d3n_int8", "ultralytics_fp32"} | ov
    if have_openvino:
        assert e2e["ultralytics_openvino"]["mAP_by"] == "ultralytics val" and e2e["ultralytics_openvino"]["precision"]
        assert 0 <= e2e["ultralytics_openvino"]["mAP50"] <= 1
    assert e2e["d3n_fp32"]["frames"] == 12 and all(v["fps"] > 0 for v in e2e.values())
    assert math.isfinite(r["accuracy"]["fp32"]["mAP50"]) and math.isfinite(r["accuracy"]["int8"]["mAP50"])
    for key in ("e2e_over_model_only_fp32", "int8_over_fp32_latency_p50", "d3n_over_ultralytics_e2e",
                "d3n_best_over_ultralytics_best_e2e"):
        assert math.isfinite(r["ratios"][key]) and r["ratios"][key] > 0
    printed = capsys.readouterr().out
    assert "model-only" in printed and "end-to-end" in printed


def test_scored_split_is_test_unless_asked(tmp_path, synth_small):
    # val chose the checkpoint: every bench mAP is scored on test where the dataset has one
    from d3n.data.synth import generate
    from d3n.errors import DataError
    from d3n.export.bench import scored_split

    with_test = generate(tmp_path / "data", images=10, size=64, seed=0, test_frac=0.2, progress=False)
    assert scored_split(with_test, None) == "test"
    assert scored_split(with_test, "val") == "val"
    assert scored_split(synth_small, None) == "val"
    with pytest.raises(DataError, match=r"data.yaml: no split 'holdout'"):
        scored_split(with_test, "holdout")


def test_results_outlive_the_temporary_models_folder(tmp_path):
    from d3n.export.bench import BenchOptions, results_path

    pt = tmp_path / "m.pt"
    assert results_path(BenchOptions(model=pt)) == Path("bench.json")  # not inside the deleted temp folder
    assert results_path(BenchOptions(model=pt, out=tmp_path / "o")) == tmp_path / "o" / "bench.json"
    assert results_path(BenchOptions(model=pt, out=tmp_path / "o", json=tmp_path / "r.json")) == tmp_path / "r.json"
