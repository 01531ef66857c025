"""ONNX Runtime backend: TensorRT EP (engine cache on disk), CUDA EP or CPU EP.

ONNX Runtime silently falls back to the CPU when a requested provider fails to load; here the
providers actually active are checked, so `--device cuda` never quietly runs on the CPU.
The TensorRT EP builds its engine on the first run (minutes on a Jetson): the runtime warms up
explicitly and logs it, and the engine cache is kept beside the model so the next start is fast.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from d3n.errors import ArtifactError, ConfigError
from d3n.runtime.backends import Backend, batch_dim, check_input_shape, check_output_shape

log = logging.getLogger(__name__)

PROVIDERS = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
PREFERENCE = ("tensorrt", "cuda", "cpu")


def choose_device(device: str, available: list[str]) -> str:
    """The device to use: the requested one if its provider exists, or the best for "auto"."""
    if device == "auto":
        return next(d for d in PREFERENCE if PROVIDERS[d] in available or d == "cpu")
    if PROVIDERS[device] not in available:
        hint = " (install onnxruntime-gpu: the `gpu` extra)" if device != "cpu" else ""
        raise ConfigError(f"--device {device}: onnxruntime has no {PROVIDERS[device]}; "
                          f"available: {', '.join(available)}{hint}")
    return device


def trt_cache_path(model_path: Path, trt_cache_dir: Path | None = None) -> Path:
    """Where the TensorRT EP keeps built engines: the option, $D3N_TRT_CACHE, or beside the model."""
    return Path(trt_cache_dir or os.environ.get("D3N_TRT_CACHE") or
                model_path.parent / f".{model_path.stem}.trt_cache")


def provider_list(device: str, model_path: Path, fp16: bool, trt_cache_dir: Path | None) -> list:
    """Providers for `device`, each falling back to the next (TensorRT -> CUDA -> CPU)."""
    providers: list = []
    if device == "tensorrt":
        cache = trt_cache_path(model_path, trt_cache_dir)
        cache.mkdir(parents=True, exist_ok=True)
        providers.append((PROVIDERS["tensorrt"], {
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(cache),
            "trt_timing_cache_enable": True,
            "trt_timing_cache_path": str(cache),
            "trt_fp16_enable": fp16,
        }))
    if device in ("tensorrt", "cuda"):
        providers.append(PROVIDERS["cuda"])
    providers.append(PROVIDERS["cpu"])
    return providers


class OrtBackend(Backend):
    def __init__(self, model_path: Path, sidecar, device: str = "auto",
                 trt_cache_dir: str | Path | None = None, intra_op_threads: int | None = None):
        super().__init__(model_path, sidecar)
        import onnxruntime as ort

        device = choose_device(device, ort.get_available_providers())
        fp16 = sidecar.precision == "fp16"
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if intra_op_threads:  # ORT's default (its own guess per session) oversubscribes
            opts.intra_op_num_threads = int(intra_op_threads)  # shared cores: see runtime.md
        try:
            self.session = ort.InferenceSession(
                str(model_path), sess_options=opts,
                providers=provider_list(device, model_path, fp16, trt_cache_dir and Path(trt_cache_dir)))
        except Exception as exc:  # onnxruntime raises its own exception types for bad files
            raise ArtifactError(f"{model_path}: ONNX Runtime cannot load the model ({exc})") from None
        active = self.session.get_providers()
        if PROVIDERS[device] not in active:
            raise ConfigError(f"--device {device}: {PROVIDERS[device]} failed to start for "
                              f"{model_path.name} (active: {', '.join(active)})")
        self.device = device
        self.trt_cache = trt_cache_path(model_path, trt_cache_dir and Path(trt_cache_dir))
        self.name = f"onnxruntime-{device}"
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.input_dtype = np.dtype(np.float16 if inp.type == "tensor(float16)" else np.float32)
        self.input_shape = check_input_shape(model_path, sidecar, inp.shape)
        self.max_batch = batch_dim(inp.shape)  # the graph decides what ONNX Runtime can run
        outputs = self.session.get_outputs()
        check_output_shape(model_path, sidecar, outputs[0].shape)
        self.output_names = [o.name for o in outputs]
        threads = opts.intra_op_num_threads or "default"
        log.info("%s: loaded %s, input %s %s, %s batch, %s intra-op threads", self.name,
                 model_path.name, self.input_shape, self.input_dtype,
                 "dynamic" if self.max_batch is None else "fixed", threads)

    def warmup(self, n: int = 1, batch: int = 1) -> float:
        if self.device == "tensorrt":
            log.info("%s: the first run builds the TensorRT engine (minutes on a Jetson; cached in "
                     "%s for the next start)", self.name, self.trt_cache)
        return super().warmup(n, batch)

    def _run(self, blob: np.ndarray) -> np.ndarray:
        return self.session.run(self.output_names[:1], {self.input_name: blob})[0]

    def close(self) -> None:
        self.session = None
