"""Backends: ONNX Runtime selection, sidecar enforcement, bad models; native TensorRT on a GPU."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from d3n.cli import main
from d3n.errors import ArtifactError, ConfigError
from d3n.runtime.backends import open_backend
from d3n.runtime.ort_backend import choose_device


def test_open_backend_cpu(tiny_onnx):
    b = open_backend(tiny_onnx)  # auto: a GPU provider of onnxruntime, else OpenVINO, else ORT CPU
    assert b.input_shape == (1, 3, 128, 128)
    assert b.sidecar.names == ["crack", "scratch", "pit"]
    assert b.name.startswith(("onnxruntime-", "openvino-"))
    assert b.warmup(2) > 0
    out = b.infer(np.zeros(b.input_shape, np.float32))
    assert out.shape == (1, 7, 336)
    with pytest.raises(ValueError, match="input blob shape"):
        b.infer(np.zeros((1, 3, 64, 64), np.float32))


def test_choose_device():
    assert choose_device("auto", ["CPUExecutionProvider"]) == "cpu"
    assert choose_device("auto", ["TensorrtExecutionProvider", "CUDAExecutionProvider",
                                  "CPUExecutionProvider"]) == "tensorrt"
    assert choose_device("auto", ["CUDAExecutionProvider", "CPUExecutionProvider"]) == "cuda"
    with pytest.raises(ConfigError, match="no CUDAExecutionProvider"):
        choose_device("cuda", ["CPUExecutionProvider"])


def test_unavailable_device_is_an_error(tiny_onnx):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA EP present: nothing to refuse")
    with pytest.raises(ConfigError, match="--device cuda"):
        open_backend(tiny_onnx, device="cuda")
    with pytest.raises(ConfigError, match="not one of"):
        open_backend(tiny_onnx, device="gpu0")


def test_an_openvino_precision_on_onnx_runtime_is_refused(tiny_onnx, video_avi, tmp_path, capsys):
    """Never dropped silently: the run would not compute in the precision asked for."""
    with pytest.raises(ConfigError, match=r"--openvino-precision bf16: only the OpenVINO backend .* ONNX Runtime"):
        open_backend(tiny_onnx, "cpu", inference_precision="bf16")
    assert open_backend(tiny_onnx, "cpu", inference_precision="f32").name == "onnxruntime-cpu"  # what it does anyway
    out = tmp_path / "det.jsonl"
    rc, err = _run_cli(tiny_onnx, video_avi, capsys, "--device", "cpu", "--openvino-precision", "bf16",
                       "--sink", f"jsonl:{out}")
    assert rc != 0 and "--openvino-precision bf16" in err and not out.exists()


def _run_cli(model, source, capsys, *extra) -> tuple[int, str]:
    rc = main(["run", "--model", str(model), "--source", str(source), *extra])
    return rc, capsys.readouterr().err


def test_hash_mismatch_refused(model_copy, video_avi, capsys):
    with open(model_copy, "ab") as f:
        f.write(b"\0")  # the model changed after export
    with pytest.raises(ArtifactError, match="sha256 of tiny.onnx does not match"):
        open_backend(model_copy)
    rc, err = _run_cli(model_copy, video_avi, capsys)
    assert rc == 1 and "does not match the sidecar" in err and "tiny.json" in err


def test_missing_sidecar_refused(model_copy, video_avi, capsys):
    model_copy.with_suffix(".json").unlink()
    rc, err = _run_cli(model_copy, video_avi, capsys)
    assert rc == 1 and "sidecar missing" in err


def test_sidecar_of_another_model_refused(model_copy, video_avi, capsys):
    other = model_copy.with_name("other.onnx")
    shutil.copy(model_copy, other)
    shutil.copy(model_copy.with_suffix(".json"), other.with_suffix(".json"))  # says tiny.onnx
    rc, err = _run_cli(other, video_avi, capsys)
    assert rc == 1 and "sidecar is for 'tiny.onnx', not 'other.onnx'" in err


def test_sidecar_with_wrong_input_size_refused(model_copy):
    path = model_copy.with_suffix(".json")
    data = json.loads(path.read_text())
    data["imgsz"] = [640, 640]
    path.write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="sidecar .*does not match this model|says 640"):
        open_backend(model_copy)


def test_corrupt_and_missing_model(model_copy, tmp_path):
    from d3n.artifacts import sha256_file

    model_copy.write_bytes(b"not an onnx file at all")
    sc = model_copy.with_suffix(".json")
    data = json.loads(sc.read_text())
    data["model_sha256"] = sha256_file(model_copy)  # sidecar matches: the file itself is bad
    sc.write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="ONNX Runtime cannot load"):
        open_backend(model_copy, device="cpu")  # auto may pick OpenVINO (its own message)
    with pytest.raises(ArtifactError, match="model file not found"):
        open_backend(tmp_path / "nope.onnx")


def test_engine_refused_on_cpu_device(model_copy):
    from d3n.artifacts import sha256_file
    from d3n.sidecar import load, save

    engine = model_copy.with_suffix(".engine")
    engine.write_bytes(b"ftrt-not-really")
    sc = load(model_copy).model_copy(update={"format": "engine", "model_file": engine.name,
                                             "model_sha256": sha256_file(engine)})
    save(sc, engine)
    with pytest.raises(ConfigError, match="runs only with --device tensorrt"):
        open_backend(engine, device="cpu")
    # an engine computes in the precision it was built at: an OpenVINO precision is refused, not dropped
    with pytest.raises(ConfigError, match=r"--openvino-precision bf16: .* runs on TensorRT"):
        open_backend(engine, device="tensorrt", inference_precision="bf16")


def _has_tensorrt_gpu() -> bool:
    try:
        import tensorrt  # noqa: F401
        from cuda.bindings import runtime as cudart
    except ImportError:
        return False
    err, n = cudart.cudaGetDeviceCount()
    return int(err) == 0 and n > 0


@pytest.mark.gpu
@pytest.mark.skipif(not _has_tensorrt_gpu(), reason="needs tensorrt, cuda-python and an NVIDIA GPU")
def test_native_tensorrt_matches_onnxruntime(tiny_onnx, tmp_path):
    import tensorrt as trt

    from d3n.artifacts import sha256_file
    from d3n.sidecar import load, save

    # Build a plain engine from the ONNX file with TensorRT's own parser.
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0 if int(trt.__version__.split(".")[0]) >= 10 else \
        1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse(tiny_onnx.read_bytes())
    config = builder.create_builder_config()
    engine = tmp_path / "tiny.engine"
    engine.write_bytes(bytes(builder.build_serialized_network(network, config)))
    save(load(tiny_onnx).model_copy(update={"format": "engine", "model_file": engine.name,
                                            "model_sha256": sha256_file(engine)}), engine)
    native = open_backend(engine)
    assert native.name == "tensorrt"
    ref = open_backend(tiny_onnx, device="cpu")
    blob = np.random.default_rng(0).uniform(0, 1, ref.input_shape).astype(np.float32)
    np.testing.assert_allclose(native.infer(blob), ref.infer(blob), atol=2e-2, rtol=1e-2)
    native.close()


def _rewrite_sidecar(model, **changes) -> None:
    """Edit the sidecar only: the model's sha256 still matches, as after a careless hand edit."""
    path = model.with_suffix(".json")
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if key == "output_kind":
            data["output"]["kind"] = value
        else:
            data[key] = value
    path.write_text(json.dumps(data))


def test_sidecar_with_fewer_class_names_than_the_model_refused(model_copy, video_avi, tmp_path, capsys):
    _rewrite_sidecar(model_copy, names=["crack", "scratch"])  # the model scores 3 classes
    with pytest.raises(ArtifactError, match=r"tiny.onnx: the model outputs 3 classes .* tiny.json lists 2"):
        open_backend(model_copy)
    out = tmp_path / "det.jsonl"
    rc, err = _run_cli(model_copy, video_avi, capsys, "--sink", f"jsonl:{out}")
    assert rc == 1 and "outputs 3 classes" in err and "lists 2" in err
    assert not out.exists()  # refused before any output was created


def test_sidecar_claiming_in_graph_nms_on_a_raw_model_refused(model_copy):
    _rewrite_sidecar(model_copy, output_kind="nms")  # (1, 7, 336) is no (1, max_det, 6) table
    with pytest.raises(ArtifactError, match=r"tiny.onnx: output shape \(1, 7, 336\) .*\(1, max_det, 6\)"):
        open_backend(model_copy)
