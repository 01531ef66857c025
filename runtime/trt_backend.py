"""Native TensorRT backend for plain `.engine` files (no ultralytics JSON header).

TensorRT 10 removed the bindings API: tensors are addressed by name (`set_tensor_address`,
`execute_async_v3`). TensorRT 8.x (JetPack 5) has only the bindings API on older minors
(`execute_async_v2`). Both are handled. Device memory goes through cuda-python's runtime API,
imported lazily so the rest of the runtime works without a GPU. An engine only runs on the
TensorRT version and GPU it was built with; deserialisation failure says so.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from d3n.errors import ArtifactError, ConfigError
from d3n.runtime.backends import Backend, check_input_shape, check_output_shape

log = logging.getLogger(__name__)


def _import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise ConfigError("native TensorRT backend: the `tensorrt` Python package is not installed "
                          "(JetPack ships it; elsewhere `pip install tensorrt`, or run the ONNX "
                          "model on ONNX Runtime)") from None
    return trt


def _import_cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError:
            raise ConfigError("native TensorRT backend: cuda-python is not installed "
                              "(`pip install cuda-python`)") from None
    return cudart


class _Cuda:
    """The few CUDA runtime calls needed, with errors checked."""

    def __init__(self):
        self.rt = _import_cudart()
        self.stream = self.check(self.rt.cudaStreamCreate(), "cudaStreamCreate")
        self.stream_handle = int(self.stream)  # TensorRT wants the raw cudaStream_t as an int

    def check(self, result, what: str):
        err, *rest = result if isinstance(result, tuple) else (result,)
        if int(err) != 0:
            raise ConfigError(f"CUDA error in {what}: {err} (is an NVIDIA GPU and driver present?)")
        return rest[0] if len(rest) == 1 else rest

    def malloc(self, nbytes: int) -> int:
        return int(self.check(self.rt.cudaMalloc(nbytes), "cudaMalloc"))

    def to_device(self, ptr: int, host: np.ndarray) -> None:
        self.check(self.rt.cudaMemcpyAsync(ptr, host.ctypes.data, host.nbytes,
                                           self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice,
                                           self.stream), "cudaMemcpyAsync H2D")

    def to_host(self, host: np.ndarray, ptr: int) -> None:
        self.check(self.rt.cudaMemcpyAsync(host.ctypes.data, ptr, host.nbytes,
                                           self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost,
                                           self.stream), "cudaMemcpyAsync D2H")

    def sync(self) -> None:
        self.check(self.rt.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")

    def free(self, ptr: int) -> None:
        self.rt.cudaFree(ptr)


class TensorRTBackend(Backend):
    def __init__(self, model_path: Path, sidecar):
        super().__init__(model_path, sidecar)
        trt = _import_tensorrt()
        self.trt = trt
        self.cuda = _Cuda()
        self.logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(self.logger)
        data = Path(model_path).read_bytes()
        if data[:1] == b"{" or data[4:5] == b"{":
            raise ArtifactError(f"{model_path}: engine starts with a JSON header (an ultralytics "
                                "engine?); d3n expects plain TensorRT engines (`d3n export --format engine`)")
        self.engine = runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            raise ArtifactError(f"{model_path}: TensorRT {trt.__version__} cannot deserialise this "
                                "engine (built with another TensorRT version or GPU? rebuild it on "
                                "this device)")
        self.context = self.engine.create_execution_context()
        self.name = "tensorrt"
        self._buffers: list[int] = []
        if hasattr(self.engine, "num_io_tensors"):
            self._setup_tensor_api()
        else:
            self._setup_bindings_api()
        try:
            check_output_shape(model_path, sidecar, self._outputs[0][0].shape)
        except ArtifactError:
            self.close()  # nobody else holds this half-built backend to free its device memory
            raise
        log.info("tensorrt %s: loaded %s, input %s", trt.__version__, model_path.name, self.input_shape)

    # TensorRT >= 8.5 / 10: tensors by name.
    def _setup_tensor_api(self) -> None:
        trt, eng = self.trt, self.engine
        names = [eng.get_tensor_name(i) for i in range(eng.num_io_tensors)]
        inputs = [n for n in names if eng.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if eng.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or not outputs:
            raise ArtifactError(f"{self.model_path}: expected one input and at least one output, "
                                f"engine has inputs {inputs} and outputs {outputs}")
        self.input_name = inputs[0]
        declared = tuple(eng.get_tensor_shape(self.input_name))
        self.input_shape = check_input_shape(self.model_path, self.sidecar, declared)
        self.max_batch = self._profile_max_batch(declared)
        largest = (self.max_batch, *self.input_shape[1:])
        if -1 in declared:  # dynamic profile: buffers sized for its largest batch
            self.context.set_input_shape(self.input_name, largest)
        self.input_dtype = np.dtype(trt.nptype(eng.get_tensor_dtype(self.input_name)))
        self._in_ptr = self._alloc(int(np.prod(largest)) * self.input_dtype.itemsize)
        self.context.set_tensor_address(self.input_name, self._in_ptr)
        self._outputs = []
        for name in outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            host = np.empty(shape, dtype=trt.nptype(eng.get_tensor_dtype(name)))
            ptr = self._alloc(host.nbytes)
            self.context.set_tensor_address(name, ptr)
            self._outputs.append((host, ptr))
        self._execute = lambda: self.context.execute_async_v3(self.cuda.stream_handle)

    def _profile_max_batch(self, declared: tuple) -> int:
        """The largest batch the engine runs: 1 for a fixed batch, else the maximum of its
        first optimisation profile (`d3n export --dynamic --batch N` sets it to N)."""
        if declared[0] != -1:
            return 1
        _, _, largest = self.engine.get_tensor_profile_shape(self.input_name, 0)
        return max(int(largest[0]), 1)

    # TensorRT 8.x before the tensor API: binding indices.
    def _setup_bindings_api(self) -> None:
        trt, eng = self.trt, self.engine
        n = eng.num_bindings
        ins = [i for i in range(n) if eng.binding_is_input(i)]
        if len(ins) != 1:
            raise ArtifactError(f"{self.model_path}: expected one input binding, engine has {len(ins)}")
        i_in = ins[0]
        self.input_shape = check_input_shape(self.model_path, self.sidecar, tuple(eng.get_binding_shape(i_in)))
        if -1 in tuple(eng.get_binding_shape(i_in)):  # batching is left to the tensor API
            self.context.set_binding_shape(i_in, self.input_shape)
            log.info("%s: TensorRT %s bindings API: the dynamic engine runs one frame per "
                     "inference", self.model_path.name, trt.__version__)
        self.input_dtype = np.dtype(trt.nptype(eng.get_binding_dtype(i_in)))
        bindings = [0] * n
        self._in_ptr = bindings[i_in] = self._alloc(int(np.prod(self.input_shape)) * self.input_dtype.itemsize)
        self._outputs = []
        for i in range(n):
            if i == i_in:
                continue
            host = np.empty(tuple(self.context.get_binding_shape(i)), dtype=trt.nptype(eng.get_binding_dtype(i)))
            bindings[i] = self._alloc(host.nbytes)
            self._outputs.append((host, bindings[i]))
        self._execute = lambda: self.context.execute_async_v2(bindings, self.cuda.stream_handle)

    def _alloc(self, nbytes: int) -> int:
        ptr = self.cuda.malloc(nbytes)
        self._buffers.append(ptr)
        return ptr

    def _run(self, blob: np.ndarray) -> np.ndarray:
        n = blob.shape[0]
        if self.max_batch != 1:  # tensor API, dynamic profile: this call's batch size
            self.context.set_input_shape(self.input_name, blob.shape)
        self.cuda.to_device(self._in_ptr, blob)
        if not self._execute():
            raise RuntimeError(f"{self.model_path.name}: TensorRT execution failed")
        host, ptr = self._outputs[0]
        rows = host[:n]  # batch-major: the first n rows of the buffer sized for the largest batch
        self.cuda.to_host(rows, ptr)
        self.cuda.sync()
        return rows.copy()

    def close(self) -> None:
        for ptr in self._buffers:
            self.cuda.free(ptr)
        self._buffers.clear()
        self.context = None
        self.engine = None
