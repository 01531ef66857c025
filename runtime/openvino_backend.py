"""OpenVINO backend: the same `.onnx` files (FP32, or d3n's Q/DQ INT8) on the CPU.

OpenVINO reads ONNX directly, so there is no separate export; its Q/DQ pairs become quantized
convolutions (run as INT8). On Intel CPUs it is usually faster than ONNX Runtime's CPU EP.
The package is optional (`d3n[openvino]`) and imported only when this backend is opened, so the
runtime works without it.

Precision is pinned to FP32 by default: on CPUs with AMX or AVX-512 BF16 OpenVINO's own default
is bf16, which changes the outputs (on the test model at 128 px: boxes by up to 0.2 px, scores
by up to 7e-4), so detections would differ from every other backend's. `inference_precision="bf16"` asks for it explicitly.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np

from d3n.errors import ArtifactError, ConfigError
from d3n.runtime.backends import Backend, batch_dim, check_input_shape, check_output_shape

log = logging.getLogger(__name__)

PRECISIONS = ("f32", "bf16", "f16")  # OpenVINO's INFERENCE_PRECISION_HINT values


def import_openvino():
    """The openvino module, or a ConfigError saying how to get it (never a silent fallback)."""
    try:
        import openvino
    except ImportError as exc:
        raise ConfigError("--device openvino: the `openvino` package is not installed or does not "
                          f"import ({exc}); install it with `pip install 'd3n[openvino]'`, or use "
                          "--device cpu for ONNX Runtime") from None
    return openvino


def openvino_available() -> bool:
    """Whether `--device auto` may pick OpenVINO: the package imports."""
    try:
        import_openvino()
    except ConfigError as exc:
        log.debug("OpenVINO not available: %s", exc)
        return False
    return True


def compile_config(threads: int | None, precision: str) -> dict[str, str]:
    """CPU plugin settings. LATENCY: one stream, every thread on the one inference the runtime
    has in flight (THROUGHPUT would split the threads over requests it never sends)."""
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": precision}
    if threads:
        config["INFERENCE_NUM_THREADS"] = str(int(threads))
        from d3n.runtime.pipeline import available_cores

        if threads < available_cores():
            # Fewer threads than cores means the box is shared (--threads, see runtime.md).
            # Pinned, every such process would take the same first cores; let the OS spread them.
            config["ENABLE_CPU_PINNING"] = "NO"
    return config


def _dims(partial_shape) -> list[int]:
    """A partial shape as ints, -1 for a dynamic dimension (what batch_dim and the checks read)."""
    return [d.get_length() if d.is_static else -1 for d in partial_shape]


class OpenVINOBackend(Backend):
    def __init__(self, model_path: Path, sidecar, intra_op_threads: int | None = None,
                 inference_precision: str = "f32", trt_cache_dir=None):
        # trt_cache_dir: an ONNX Runtime option, accepted so `--device auto` takes the same options
        super().__init__(model_path, sidecar)
        if inference_precision not in PRECISIONS:
            raise ConfigError(f"OpenVINO precision '{inference_precision}' is not one of "
                              f"{', '.join(PRECISIONS)}")
        ov = import_openvino()
        config = compile_config(intra_op_threads, inference_precision)
        try:
            core = ov.Core()
            model = core.read_model(str(model_path))
            self.compiled = core.compile_model(model, "CPU", config)
        except Exception as exc:  # OpenVINO raises RuntimeError subclasses of its own
            raise ArtifactError(f"{model_path}: OpenVINO cannot load the model ({exc})") from None
        self.name = "openvino-cpu"
        # what OpenVINO compiled, not what was asked: a CPU without bf16/f16 support runs f32
        self.precision = self.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        if self.precision != inference_precision:
            raise ConfigError(f"--openvino-precision {inference_precision}: OpenVINO compiled "
                              f"{model_path.name} at {self.precision} on this CPU (no {inference_precision} "
                              f"support); leave the option out or choose {self.precision}")
        self._check_io(model_path, sidecar)
        self.request = self.compiled.create_infer_request()
        self._lock = threading.Lock()  # one InferRequest must not run twice at once
        log.info("%s: loaded %s (OpenVINO %s), input %s %s, %s batch, %s threads, precision %s",
                 self.name, model_path.name, ov.__version__.split("-")[0], self.input_shape,
                 self.input_dtype, "dynamic" if self.max_batch is None else "fixed",
                 config.get("INFERENCE_NUM_THREADS", "default"), self.precision)

    def _check_io(self, model_path: Path, sidecar) -> None:
        inputs, outputs = self.compiled.inputs, self.compiled.outputs
        if len(inputs) != 1 or not outputs:
            raise ArtifactError(f"{model_path}: expected one input and at least one output, "
                                f"the model has {len(inputs)} inputs and {len(outputs)} outputs")
        shape = _dims(inputs[0].get_partial_shape())
        self.input_shape = check_input_shape(model_path, sidecar, shape)
        self.max_batch = batch_dim(shape)  # as on ONNX Runtime: the graph decides
        self.input_dtype = np.dtype(inputs[0].get_element_type().to_dtype())
        check_output_shape(model_path, sidecar, _dims(outputs[0].get_partial_shape()))

    def _run(self, blob: np.ndarray) -> np.ndarray:
        with self._lock:
            self.request.infer({0: blob}, share_inputs=True)  # blob is contiguous: no copy in
            # a view of the request's buffer, overwritten by the next inference: copy it out
            return self.request.get_output_tensor(0).data.copy()

    def close(self) -> None:
        self.request = None
        self.compiled = None
