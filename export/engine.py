"""TensorRT engines, built on the device that will run them (engines are tied to the TensorRT
version and GPU they were built with).

- FP16: builder flag. INT8: on TensorRT >= 10.1 explicit quantization, i.e. the engine is built
  from the Q/DQ ONNX model (the implicit calibrators are deprecated there); on TensorRT 8.x /
  10.0 IInt8EntropyCalibrator2 over letterboxed real images, with its cache saved beside the
  engine so a rebuild skips calibration.
- Workspace limit, optional dynamic-batch optimisation profile, progress while building
  (IProgressMonitor on TensorRT >= 10, a ticking spinner otherwise: Jetson builds take minutes).
- Written as a plain serialized engine (no JSON header: trtexec and DeepStream load it) plus the
  sidecar.
"""

from __future__ import annotations

import itertools
import logging
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from d3n.artifacts import write_bytes
from d3n.errors import D3NError
from d3n.export.cudart import DeviceBuffer, device_count

log = logging.getLogger(__name__)


def cuda_device_count() -> int:
    return device_count()


def require_tensorrt():
    """Fail before any work when there is no GPU or no TensorRT; returns the tensorrt module."""
    if cuda_device_count() == 0:
        raise D3NError("--format engine needs an NVIDIA GPU with a working CUDA driver; none found "
                       "(TensorRT engines must be built on the device that runs them)")
    try:
        import tensorrt as trt
    except ImportError:
        raise D3NError("--format engine needs TensorRT (python package `tensorrt`; on Jetson it ships "
                       "with JetPack); it is not installed") from None
    return trt


def trt_version(trt) -> tuple[int, int]:
    major, minor = trt.__version__.split(".")[:2]
    return int(major), int(minor)


def explicit_quantization(trt) -> bool:
    return trt_version(trt) >= (10, 1)


def _progress_monitor(trt):
    """IProgressMonitor (TensorRT >= 10) printing one tqdm bar per build phase."""
    from tqdm import tqdm

    class Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.bars: dict[str, tqdm] = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            self.bars[phase_name] = tqdm(total=num_steps, desc=phase_name, leave=False)

        def step_complete(self, phase_name, step):
            bar = self.bars.get(phase_name)
            if bar is not None:
                bar.update(step + 1 - bar.n)
            return True  # keep building

        def phase_finish(self, phase_name):
            bar = self.bars.pop(phase_name, None)
            if bar is not None:
                bar.close()

    return Monitor()


@contextmanager
def spinner(message: str):
    """A ticking line on stderr while a long call without progress callbacks runs."""
    stop = threading.Event()
    t0 = time.time()

    def tick():
        for ch in itertools.cycle("|/-\\"):
            if stop.wait(0.5):
                break
            sys.stderr.write(f"\r{message} {ch} {time.time() - t0:5.0f}s")
            sys.stderr.flush()
        sys.stderr.write(f"\r{message} done in {time.time() - t0:.0f}s\n")

    th = threading.Thread(target=tick, daemon=True)
    th.start()
    try:
        yield
    finally:
        stop.set()
        th.join()


def _calibrator(trt, inputs: list[np.ndarray], cache: Path):
    """IInt8EntropyCalibrator2 fed with letterboxed frames (batch 1); cache read/written at `cache`."""

    class Calibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self):
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.it = iter(inputs)
            self.buf = DeviceBuffer(inputs[0].nbytes) if inputs else None

        def get_batch_size(self):
            return 1

        def get_batch(self, names):
            x = next(self.it, None)
            if x is None or self.buf is None:
                return None
            return [self.buf.upload(np.ascontiguousarray(x, dtype=np.float32))]

        def read_calibration_cache(self):
            return cache.read_bytes() if cache.exists() else None

        def write_calibration_cache(self, data):
            write_bytes(cache, bytes(data))

    return Calibrator()


def build_engine(onnx_path: Path, out: Path, precision: str, workspace_gb: float, dynamic: bool,
                 max_batch: int, imgsz: tuple[int, int], calib_inputs: list[np.ndarray] | None = None) -> dict:
    """Parse `onnx_path` and write a plain serialized engine to `out`; returns build info."""
    trt = require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    trt.init_libnvinfer_plugins(logger, "")  # EfficientNMS_TRT for --nms
    builder = trt.Builder(logger)
    flags = 0 if trt_version(trt) >= (10, 0) else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise D3NError(f"{onnx_path}: TensorRT cannot parse it ({errors})")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if precision in ("fp16", "int8") and getattr(builder, "platform_has_fast_fp16", True):
        config.set_flag(trt.BuilderFlag.FP16)  # INT8 engines keep non-quantized layers in FP16
    profile = None
    if dynamic:
        inp = network.get_input(0)
        c, (h, w) = 3, imgsz  # ultralytics' dynamic ONNX leaves batch, height and width open
        profile = builder.create_optimization_profile()
        profile.set_shape(inp.name, (1, c, h, w), (max(1, max_batch // 2), c, h, w), (max_batch, c, h, w))
        config.add_optimization_profile(profile)
    cache = out.with_suffix(".calib.cache")
    info = {"tensorrt": trt.__version__, "precision": precision, "workspace_gb": workspace_gb,
            "dynamic": dynamic, "max_batch": max_batch if dynamic else 1}
    if precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
        if explicit_quantization(trt):
            info["int8_mode"] = "explicit (Q/DQ ONNX)"
        else:
            if not calib_inputs:
                raise D3NError(f"{onnx_path}: INT8 calibration needs images (--calib DATA)")
            config.int8_calibrator = _calibrator(trt, calib_inputs, cache)
            if profile is not None:
                config.set_calibration_profile(profile)
            info.update(int8_mode="IInt8EntropyCalibrator2", calibration_cache=cache.name)
    if trt_version(trt) >= (10, 0):
        config.progress_monitor = _progress_monitor(trt)
        serialized = builder.build_serialized_network(network, config)
    else:
        with spinner(f"building TensorRT engine from {onnx_path.name}"):
            serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise D3NError(f"{onnx_path}: TensorRT engine build failed (see the TensorRT log above)")
    write_bytes(out, bytes(serialized))
    return info
