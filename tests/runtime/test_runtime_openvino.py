"""OpenVINO backend: same outputs as ONNX Runtime (FP32, batch 1 and a dynamic batch of 2), the same
detections end to end, INT8 from d3n's Q/DQ model, threads, `--device auto` order, a clear error
without the package, and the bench rows.

FP32 tolerance against ONNX Runtime: boxes within 5e-3 px, scores within 1e-4 (measured on an
AMX Xeon: 2.3e-5 px and 1e-7). Both are well below what OpenVINO's bf16 default changes (0.2 px,
7e-4), so a backend that silently ran bf16 would fail them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import IMGSZ, NAMES, make_frame

from d3n import sidecar as sidecar_mod
from d3n.artifacts import sha256_file
from d3n.cli import main
from d3n.errors import ArtifactError, ConfigError
from d3n.runtime import backends
from d3n.runtime.backends import open_backend
from d3n.runtime.preprocess import prepare

try:
    import openvino

    HAVE_OPENVINO = True
except ImportError:
    HAVE_OPENVINO = False

needs_openvino = pytest.mark.skipif(not HAVE_OPENVINO, reason="openvino is not installed (optional: "
                                    "pip install 'd3n[openvino]', not in the dev extra: see docs/runtime.md)")
BOX_ATOL, SCORE_ATOL = 5e-3, 1e-4  # pixels at 128 px; score units (see the module docstring)


def assert_close_outputs(got: np.ndarray, want: np.ndarray) -> None:
    """Raw head (b, 4 + nc, anchors): rows 0-3 are xywh boxes in pixels, the rest class scores."""
    assert got.shape == want.shape
    np.testing.assert_allclose(got[:, :4], want[:, :4], rtol=0, atol=BOX_ATOL)
    np.testing.assert_allclose(got[:, 4:], want[:, 4:], rtol=0, atol=SCORE_ATOL)


def frames_blob(n: int) -> np.ndarray:
    """n real-looking frames letterboxed by the runtime (random noise would not exercise NMS-worthy
    scores)."""
    return np.concatenate([prepare(make_frame(i), (IMGSZ, IMGSZ))[0] for i in range(n)])


@pytest.fixture(scope="module")
def int8_onnx(tiny_onnx, tmp_path_factory) -> Path:
    """The tiny model quantized by d3n's own `onnx-int8` step (ORT Q/DQ, stem and decode float),
    calibrated on a few letterboxed frames, with an INT8 sidecar."""
    from d3n.export.int8 import quantize

    path = tmp_path_factory.mktemp("ov_int8") / "tiny.int8.onnx"
    quantize(tiny_onnx, path, [frames_blob(8)[i:i + 1] for i in range(8)])
    sc = sidecar_mod.load(tiny_onnx)
    sidecar_mod.save(sc.model_copy(update={"format": "onnx-int8", "precision": "int8", "model_file": path.name,
                                           "model_sha256": sha256_file(path)}), path)
    return path


@needs_openvino
def test_fp32_matches_onnxruntime(tiny_onnx):
    ov, ort = open_backend(tiny_onnx, "openvino"), open_backend(tiny_onnx, "cpu")
    assert ov.name == "openvino-cpu" and ov.input_shape == (1, 3, IMGSZ, IMGSZ) and ov.max_batch == 1
    assert ov.sidecar == ort.sidecar
    # FP32 asked for explicitly: OpenVINO's default on AMX / AVX-512 BF16 CPUs is bf16
    assert ov.compiled.get_property("INFERENCE_PRECISION_HINT") == openvino.Type.f32
    assert ov.warmup(1) > 0
    blob = frames_blob(1)
    assert_close_outputs(ov.infer(blob), ort.infer(blob))
    out = ov.infer(blob)
    ov.infer(np.zeros_like(blob))  # the next inference must not overwrite a result handed out
    assert_close_outputs(out, ort.infer(blob))
    with pytest.raises(ValueError, match=r"input blob shape \(2, 3, 128, 128\).*batch of 1 to 1"):
        ov.infer(frames_blob(2))
    ov.close()


@needs_openvino
def test_dynamic_batch_of_two_matches_onnxruntime(dyn_onnx):
    ov, ort = open_backend(dyn_onnx, "openvino"), open_backend(dyn_onnx, "cpu")
    assert ov.max_batch is None and ov.input_shape == (1, 3, IMGSZ, IMGSZ)
    blob = frames_blob(2)
    out = ov.infer(blob)
    assert out.shape == (2, 4 + len(NAMES), 336)
    assert_close_outputs(out, ort.infer(blob))
    assert_close_outputs(out[1:2], ov.infer(blob[1:2]))  # batching does not change a frame's result
    assert ov.warmup(1, batch=2) > 0


@needs_openvino
def test_threads_and_precision_options(tiny_onnx):
    from d3n.runtime.openvino_backend import compile_config
    from d3n.runtime.pipeline import available_cores

    b = open_backend(tiny_onnx, "openvino", intra_op_threads=1)
    assert b.compiled.get_property("INFERENCE_NUM_THREADS") == 1
    # pinned only when the process owns its cores; a share of them (--threads) floats
    assert "ENABLE_CPU_PINNING" not in compile_config(available_cores(), "f32")
    if available_cores() > 1:
        assert compile_config(1, "f32")["ENABLE_CPU_PINNING"] == "NO"
        assert b.compiled.get_property("ENABLE_CPU_PINNING") is False
    with pytest.raises(ConfigError, match="precision 'int4' is not one of f32, bf16, f16"):
        open_backend(tiny_onnx, "openvino", inference_precision="int4")


@needs_openvino
def test_sidecar_checks_and_bad_model(model_copy):
    """The same refusals as on ONNX Runtime, each naming the file and the reason."""
    side = model_copy.with_suffix(".json")
    data = json.loads(side.read_text())
    side.write_text(json.dumps({**data, "names": ["crack", "scratch"]}))  # hash still matches
    with pytest.raises(ArtifactError, match=r"tiny.onnx: the model outputs 3 classes .* tiny.json lists 2"):
        open_backend(model_copy, "openvino")
    side.write_text(json.dumps({**data, "imgsz": [160, 160]}))
    with pytest.raises(ArtifactError, match=r"tiny.onnx: input dim 2 is 128, sidecar tiny.json says 160"):
        open_backend(model_copy, "openvino")
    model_copy.write_bytes(b"not an onnx file at all")
    with pytest.raises(ArtifactError, match="sha256 of tiny.onnx does not match"):
        open_backend(model_copy, "openvino")
    side.write_text(json.dumps({**data, "model_sha256": sha256_file(model_copy)}))
    with pytest.raises(ArtifactError, match=r"tiny.onnx: OpenVINO cannot load the model \("):
        open_backend(model_copy, "openvino")


def _detections(path: Path) -> list[list[dict]]:
    """Each frame's detections in a canonical order. The untrained tiny model gives many anchors
    the same score, and NMS orders equal scores by their last float bit, which differs between
    backends: what must match is each frame's set of detections, not its order."""
    def key(d):
        return d["class_id"], [round(v, 1) for v in d["xyxy"]], d["score"]

    return [sorted(json.loads(line)["detections"], key=key) for line in path.read_text().splitlines()]


@needs_openvino
def test_run_device_openvino_writes_the_same_detections_as_cpu(tiny_onnx, video_avi, tmp_path, capsys):
    got = {}
    for device in ("openvino", "cpu"):
        out, summary = tmp_path / f"{device}.jsonl", tmp_path / f"{device}.json"
        rc = main(["run", "--model", str(tiny_onnx), "--source", str(video_avi), "--device", device,
                   "--threads", "1", "--sink", f"jsonl:{out}", "--summary", str(summary)])
        assert rc == 0, capsys.readouterr().err
        got[device] = _detections(out)
        assert json.loads(summary.read_text())["backend"] == {"openvino": "openvino-cpu",
                                                              "cpu": "onnxruntime-cpu"}[device]
    assert len(got["openvino"]) == len(got["cpu"]) == 60
    assert sum(map(len, got["cpu"])) > 0  # the comparison is not vacuous
    for a, b in zip(got["openvino"], got["cpu"], strict=True):
        assert [d["class_id"] for d in a] == [d["class_id"] for d in b]
        if a:  # boxes in frame pixels (200 x 150 from 128 px: x1.56), rounded to 0.01 px
            np.testing.assert_allclose([d["xyxy"] for d in a], [d["xyxy"] for d in b], atol=0.02)
            np.testing.assert_allclose([d["score"] for d in a], [d["score"] for d in b], atol=SCORE_ATOL)


@needs_openvino
def test_run_takes_openvino_precision(tiny_onnx, video_avi, tmp_path, capsys, caplog):
    """`--openvino-precision bf16` reaches the compiled model: the log names the precision OpenVINO
    compiled (read back from it), and the run writes every frame."""
    import logging

    if "BF16" not in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        pytest.skip("this CPU has no bf16: OpenVINO compiles f32, and d3n refuses the option")
    caplog.set_level(logging.INFO)
    out = tmp_path / "bf16.jsonl"
    rc = main(["run", "--model", str(tiny_onnx), "--source", str(video_avi), "--device", "openvino",
               "--openvino-precision", "bf16", "--threads", "1", "--sink", f"jsonl:{out}"])
    assert rc == 0, capsys.readouterr().err
    assert len(_detections(out)) == 60 and "precision bf16" in caplog.text


def test_missing_openvino_is_a_clear_error(tiny_onnx, video_avi, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` now raises ImportError
    with pytest.raises(ConfigError, match=r"--device openvino: the `openvino` package is not installed"
                                          r".*pip install 'd3n\[openvino\]'"):
        open_backend(tiny_onnx, "openvino")
    rc = main(["run", "--model", str(tiny_onnx), "--source", str(video_avi), "--device", "openvino"])
    assert rc == 1 and "openvino` package is not installed" in capsys.readouterr().err
    assert backends.onnx_device("auto") in ("cpu", "cuda", "tensorrt")  # never openvino without it


def test_auto_order_gpu_then_openvino_then_cpu(monkeypatch, caplog):
    import onnxruntime as ort

    from d3n.runtime import openvino_backend

    caplog.set_level("INFO", logger="d3n.runtime.backends")
    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(openvino_backend, "openvino_available", lambda: True)
    assert backends.onnx_device("auto") == "cuda"
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert backends.onnx_device("auto") == "openvino"
    monkeypatch.setattr(openvino_backend, "openvino_available", lambda: False)
    assert backends.onnx_device("auto") == "cpu"
    assert backends.onnx_device("openvino") == "openvino"  # an explicit device is kept
    logged = [r.getMessage() for r in caplog.records]
    assert any("auto: onnxruntime cuda" in m for m in logged)
    assert any("auto: OpenVINO" in m for m in logged) and any("auto: onnxruntime CPU" in m for m in logged)


def test_engine_refused_on_openvino(model_copy):
    sc = sidecar_mod.load(model_copy)
    engine = model_copy.with_suffix(".engine")
    engine.write_bytes(b"ftrt-not-really")
    sidecar_mod.save(sc.model_copy(update={"format": "engine", "model_file": engine.name,
                                           "model_sha256": sha256_file(engine)}), engine)
    with pytest.raises(ConfigError, match="runs only with --device tensorrt or auto, not 'openvino'"):
        open_backend(engine, device="openvino")


@needs_openvino
def test_int8_qdq_model_runs_as_int8(tiny_onnx, int8_onnx):
    q = open_backend(int8_onnx, "openvino")
    assert q.sidecar.precision == "int8" and q.input_shape == (1, 3, IMGSZ, IMGSZ)
    blob = frames_blob(1)
    out = q.infer(blob)
    assert out.shape == (1, 4 + len(NAMES), 336) and np.isfinite(out).all()
    # Rough agreement with FP32 (quantization moves scores by a few hundredths at most here).
    fp32 = open_backend(tiny_onnx, "openvino").infer(blob)
    np.testing.assert_allclose(out[:, 4:], fp32[:, 4:], atol=0.05)
    np.testing.assert_allclose(out[:, :4], fp32[:, :4], atol=1.0)  # pixels at 128 px
    # The Q/DQ pairs became quantized convolutions: OpenVINO runs them in 8 bits, not float.
    convs = [op.get_rt_info()["runtimePrecision"].astype(str)
             for op in q.compiled.get_runtime_model().get_ops()
             if op.get_rt_info()["layerType"].astype(str) == "Convolution"]
    assert convs and sum(p in ("u8", "i8") for p in convs) > len(convs) // 2, convs


@needs_openvino
def test_bench_openvino_rows(tiny_onnx, int8_onnx, monkeypatch, tmp_path):
    import yaml

    from d3n.data.synth import generate
    from d3n.export import bench
    from d3n.runtime import openvino_backend

    data = generate(tmp_path / "data", images=8, size=IMGSZ, seed=0, val_frac=0.5, progress=False)
    for lbl in (data / "labels").rglob("*.txt"):  # the tiny model's 3 classes
        lbl.write_text("".join(f"{ln}\n" for ln in lbl.read_text().splitlines() if int(ln.split()[0]) < len(NAMES)))
    spec = yaml.safe_load((data / "data.yaml").read_text())
    (data / "data.yaml").write_text(yaml.safe_dump({**spec, "names": dict(enumerate(NAMES)), "nc": len(NAMES)}))
    opts = bench.BenchOptions(model=tiny_onnx.with_suffix(".pt"), imgsz=(IMGSZ, IMGSZ), iters=3, warmup=1,
                              split="val")
    m = {"fp32": tiny_onnx, "int8": int8_onnx, "data": data}
    rows = bench._openvino_rows(m, opts)
    assert [(r["backend"], r["model"]) for r in rows] == [("openvino-cpu", "tiny.onnx"),
                                                           ("openvino-cpu", "tiny.int8.onnx"),
                                                           ("openvino-cpu (bf16)", "tiny.onnx")]
    assert all(0 < r["p50_ms"] <= r["p99_ms"] and r["fps"] > 0 and r["iters"] == 3 for r in rows)
    assert all(r["split"] == "val" and 0 <= r["mAP50"] <= 1 for r in rows)  # scored, on the same split
    monkeypatch.setattr(openvino_backend, "openvino_available", lambda: False)
    assert bench._openvino_rows(m, opts) == []
