"""Inference backends behind one small interface, and `open_backend` to pick one.

Public API (used by `d3n run` and `d3n bench`; keep it stable):

    backend = open_backend("model.onnx", device="auto")   # or "cpu" | "cuda" | "tensorrt" | "openvino"
    backend.name          # e.g. "onnxruntime-cpu", "onnxruntime-tensorrt", "tensorrt", "openvino-cpu"
    backend.sidecar       # d3n.sidecar.Sidecar, checked against the model file (sha256)
    backend.input_shape   # (1, 3, h, w): one frame
    backend.max_batch     # frames per inference: 1 (fixed batch), N (engine profile) or None
    backend.warmup(n)     # n timed runs on a zero blob; returns seconds taken (logged)
    out = backend.infer(blob)   # (b, 3, h, w) float blob -> first output as np.ndarray

`.onnx` files run on ONNX Runtime or OpenVINO. `device="auto"` picks ONNX Runtime's TensorRT EP
or CUDA EP when onnxruntime has one, else OpenVINO when it is installed (the fastest CPU backend
on Intel CPUs), else ONNX Runtime's CPU EP; `device` may insist on one. `.engine`/`.plan` files
are plain TensorRT engines run natively.
Every model must have its sidecar beside it (`model.onnx` -> `model.json`), and it must match.
A release folder holding exactly one model (and its sidecar) stands for that model.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from d3n import sidecar as sidecar_mod
from d3n.errors import ArtifactError, ConfigError

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda", "tensorrt", "openvino")
ENGINE_SUFFIXES = (".engine", ".plan", ".trt")
MODEL_SUFFIXES = (".onnx", *ENGINE_SUFFIXES)


class Backend:
    """One loaded model. Subclasses set `name`, `input_shape`, `input_dtype` and `_run`, and
    `max_batch` when the model's batch axis is dynamic."""

    name: str = "?"
    input_shape: tuple[int, int, int, int]
    input_dtype: np.dtype = np.dtype(np.float32)
    max_batch: int | None = 1  # frames per inference; None: a dynamic batch axis with no bound

    def __init__(self, model_path: Path, sidecar: sidecar_mod.Sidecar):
        self.model_path = Path(model_path)
        self.sidecar = sidecar

    def infer(self, blob: np.ndarray) -> np.ndarray:
        """Run a (b, 3, h, w) blob, b frames (1 unless the batch axis is dynamic, at most
        `max_batch`); returns the model's first output, one row per frame."""
        n = blob.shape[0] if blob.ndim == 4 else 0
        fits = n >= 1 and (self.max_batch is None or n <= self.max_batch)
        if tuple(blob.shape[1:]) != tuple(self.input_shape[1:]) or not fits:
            most = "any" if self.max_batch is None else str(self.max_batch)
            raise ValueError(f"{self.model_path.name}: input blob shape {tuple(blob.shape)} != "
                             f"model input {tuple(self.input_shape)} (batch of 1 to {most})")
        return self._run(np.ascontiguousarray(blob, dtype=self.input_dtype))

    def _run(self, blob: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def warmup(self, n: int = 1, batch: int = 1) -> float:
        """Run `n` inferences on a zero blob of `batch` frames (first runs allocate, tune and,
        for TensorRT EP, build the engine for that batch size); returns the seconds taken and
        logs them."""
        blob = np.zeros((batch, *self.input_shape[1:]), dtype=self.input_dtype)
        log.info("%s: warming up %s (%d run%s, batch %d)...", self.name, self.model_path.name, n,
                 "s" * (n != 1), batch)
        t0 = time.perf_counter()
        for _ in range(max(n, 0)):
            self._run(blob)
        dt = time.perf_counter() - t0
        log.info("%s: warm-up done in %.2f s", self.name, dt)
        return dt

    def close(self) -> None:
        """Release native resources (sessions, device buffers)."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {self.model_path.name} {self.input_shape}>"


def check_input_shape(model_path: Path, sc: sidecar_mod.Sidecar, shape) -> tuple[int, int, int, int]:
    """The (1, 3, h, w) input shape, checked against the sidecar's imgsz; dynamic dims filled."""
    want = (1, 3, int(sc.imgsz[0]), int(sc.imgsz[1]))
    dims = list(shape)
    if len(dims) != 4:
        raise ArtifactError(f"{model_path}: expected a 4-D image input, model has {dims}")
    for i, (have, expect) in enumerate(zip(dims, want, strict=False)):
        if isinstance(have, int) and have > 0 and have != expect:
            raise ArtifactError(f"{model_path}: input dim {i} is {have}, sidecar "
                                f"{sidecar_mod.sidecar_path(model_path).name} says {expect} "
                                f"(imgsz {sc.imgsz}); the sidecar does not match this model")
    return want


def batch_dim(shape) -> int | None:
    """The model's batch size: 1 when the input's first dimension is fixed (check_input_shape
    refuses any other fixed value), None when it is dynamic (a name, -1 or 0)."""
    return 1 if _dim(shape[0]) is not None else None


def _dim(v) -> int | None:
    """A fixed dimension as an int; None for a dynamic one (a name, -1 or 0)."""
    return int(v) if isinstance(v, (int, np.integer)) and v > 0 else None


def check_output_shape(model_path: Path, sc: sidecar_mod.Sidecar, shape) -> None:
    """Check the model's first output against the sidecar's layout and class names.

    The sha256 check only proves the sidecar was written for this file, not that a hand-edited
    name list still fits it: a list shorter than the model's classes would pass and then fail
    (IndexError) on the first confident detection, deep in the pipeline threads.
    """
    dims = [_dim(v) for v in shape]
    name = sidecar_mod.sidecar_path(model_path).name
    shown = tuple(d if d is not None else "?" for d in dims)
    if sc.output.kind == "nms":
        if len(dims) != 3 or dims[2] not in (6, None):
            raise ArtifactError(f"{model_path}: output shape {shown} is not the in-graph NMS "
                                f"table (1, max_det, 6) that {name} declares (output.kind nms)")
        return  # class ids out of range are dropped by decode_nms; nc is not in this shape
    if len(dims) != 3 or (dims[1] is not None and dims[1] < 5):
        raise ArtifactError(f"{model_path}: output shape {shown} is not the raw head "
                            f"(1, 4 + nc, anchors) that {name} declares")
    if dims[1] is not None and dims[1] - 4 != len(sc.names):
        raise ArtifactError(f"{model_path}: the model outputs {dims[1] - 4} classes (output "
                            f"{shown}), but its sidecar {name} lists {len(sc.names)} class names; "
                            "the sidecar does not match this model (re-export it)")


def model_files(folder: Path) -> list[Path]:
    """The model files in a release folder, by name. Names starting with '.' are skipped: they
    are a copy in progress (rsync, or a promotion that writes then renames) or a cache."""
    return sorted(p for p in Path(folder).iterdir()
                  if p.suffix.lower() in MODEL_SUFFIXES and not p.name.startswith(".") and p.is_file())


def resolve_model(path: str | Path) -> Path:
    """`path` itself, or for a release folder the one model file in it."""
    path = Path(path)
    if not path.is_dir():
        return path
    found = model_files(path)
    if len(found) != 1:
        listed = ", ".join(p.name for p in found) or "none"
        raise ArtifactError(f"{path}: a release folder must hold exactly one model "
                            f"({', '.join(MODEL_SUFFIXES)}) with its sidecar; found {listed}")
    return found[0]


def open_backend(model_path: str | Path, device: str = "auto", **options) -> Backend:
    """Load `model_path` (a model file, or a release folder holding one) with its checked
    sidecar on the best backend for `device`.

    device: "auto" (best available, see `onnx_device`), "cpu", "cuda", "tensorrt" (ONNX Runtime)
    or "openvino". Engine files go to native TensorRT (GPU only). Options are passed to the
    backend (both: `intra_op_threads`; ONNX Runtime: `trt_cache_dir`; OpenVINO:
    `inference_precision`, an error for another backend unless "f32"). Raises ArtifactError for a missing/corrupt model or a sidecar that
    does not match, ConfigError for an unavailable device.
    """
    if device not in DEVICES:
        raise ConfigError(f"--device: '{device}' is not one of {', '.join(DEVICES)}")
    model_path = resolve_model(model_path)
    sc = sidecar_mod.load(model_path)  # missing model / sidecar / hash mismatch -> ArtifactError
    precision = options.pop("inference_precision", None)
    if model_path.suffix.lower() in ENGINE_SUFFIXES:
        _no_precision(precision, model_path, "TensorRT (the engine's own)")
        if device in ("cpu", "cuda", "openvino"):
            raise ConfigError(f"{model_path}: a TensorRT engine runs only with --device tensorrt "
                              f"or auto, not '{device}' (use the ONNX model for {device})")
        from d3n.runtime.trt_backend import TensorRTBackend

        return TensorRTBackend(model_path, sc)
    if model_path.suffix.lower() != ".onnx":
        raise ArtifactError(f"{model_path}: unknown model type '{model_path.suffix}' "
                            f"(expected .onnx or {'/'.join(ENGINE_SUFFIXES)})")
    device = onnx_device(device)
    if device == "openvino" and precision is not None:
        options["inference_precision"] = precision
    else:
        _no_precision(precision, model_path, f"ONNX Runtime ({device}), in the model's own")
    if device == "openvino":
        from d3n.runtime.openvino_backend import OpenVINOBackend

        return OpenVINOBackend(model_path, sc, **options)
    from d3n.runtime.ort_backend import OrtBackend

    return OrtBackend(model_path, sc, device=device, **options)


def _no_precision(precision: str | None, model_path: Path, runs_on: str) -> None:
    """An inference precision other than f32 on a backend that does not take one is an error:
    dropped silently, the numbers would not be the ones asked for."""
    if precision not in (None, "f32"):
        raise ConfigError(f"--openvino-precision {precision}: only the OpenVINO backend takes an inference "
                          f"precision; {model_path.name} runs on {runs_on}")


def onnx_device(device: str) -> str:
    """The device an ONNX model runs on. "auto": ONNX Runtime's TensorRT EP or CUDA EP when
    onnxruntime has one (a GPU beats any CPU backend), else OpenVINO when it imports, else ONNX
    Runtime's CPU EP. The choice is logged, so a run says which backend it got and why."""
    if device != "auto":
        return device
    import onnxruntime as ort

    from d3n.runtime.openvino_backend import openvino_available
    from d3n.runtime.ort_backend import choose_device

    best = choose_device("auto", ort.get_available_providers())
    if best != "cpu":
        log.info("--device auto: onnxruntime %s (a GPU execution provider is installed)", best)
        return best
    if openvino_available():
        log.info("--device auto: OpenVINO on the CPU (no GPU execution provider in onnxruntime; "
                 "openvino is installed)")
        return "openvino"
    log.info("--device auto: onnxruntime CPU (no GPU execution provider, openvino not installed)")
    return "cpu"
