"""TensorRT engines: a clear failure without a GPU / TensorRT; a real build where there is one."""

from __future__ import annotations

import pytest

from d3n import sidecar
from d3n.errors import D3NError
from d3n.export.engine import cuda_device_count
from d3n.export.exporter import ExportOptions, export_model


def _has_tensorrt() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


HAS_GPU = cuda_device_count() > 0


@pytest.mark.skipif(HAS_GPU and _has_tensorrt(), reason="this machine can build engines")
def test_engine_fails_clearly_before_any_work(tiny_ckpt, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(D3NError, match="NVIDIA GPU|TensorRT"):
        export_model(ExportOptions(model=tiny_ckpt, format="engine", half=True, out=out))
    assert not out.exists()  # nothing exported first


def test_engine_cli_message(tiny_ckpt, tmp_path, capsys):
    if HAS_GPU and _has_tensorrt():
        pytest.skip("this machine can build engines")
    from d3n.cli import main

    assert main(["export", str(tiny_ckpt), "--format", "engine", "--out", str(tmp_path / "e")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("d3n: error:") and "Traceback" not in err


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_GPU and _has_tensorrt()), reason="needs an NVIDIA GPU and TensorRT")
@pytest.mark.parametrize("nms", [False, True])
def test_fp16_engine_build(tiny_ckpt, tmp_path, nms):
    res = export_model(ExportOptions(model=tiny_ckpt, format="engine", imgsz=(128, 128), half=True, nms=nms,
                                     workspace=1.0, out=tmp_path / "model.engine"))
    data = res.model.read_bytes()
    assert not data.lstrip().startswith(b"{")  # plain engine, no ultralytics JSON header
    sc = sidecar.load(res.model)
    assert sc.format == "engine" and sc.precision == "fp16"
    assert sc.output.kind == ("nms" if nms else "raw")
    import tensorrt as trt

    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    trt.init_libnvinfer_plugins(trt.Logger(trt.Logger.WARNING), "")
    assert runtime.deserialize_cuda_engine(data) is not None


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_GPU and _has_tensorrt()), reason="needs an NVIDIA GPU and TensorRT")
def test_int8_dynamic_engine_build(tiny_ckpt, synth_small, tmp_path):
    res = export_model(ExportOptions(model=tiny_ckpt, format="engine", imgsz=(128, 128), int8=True, dynamic=True,
                                     max_batch=4, calib=synth_small, calib_images=8, workspace=1.0,
                                     out=tmp_path / "model.engine"))
    sc = sidecar.load(res.model)
    assert sc.precision == "int8" and sc.batch == "dynamic"
    assert sc.extra["build"]["max_batch"] == 4
