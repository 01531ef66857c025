"""Just enough CUDA through ctypes for engine building without torch (Jetson images have none):
count devices (driver API) and move calibration batches to the GPU (runtime API)."""

from __future__ import annotations

import ctypes
import ctypes.util

from d3n.errors import D3NError

_H2D = 1  # cudaMemcpyHostToDevice


def _load(names: tuple[str, ...]):
    for name in names:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    found = ctypes.util.find_library(names[0].split(".")[0].removeprefix("lib"))
    return ctypes.CDLL(found) if found else None


def device_count() -> int:
    """CUDA devices visible to this process; 0 without a driver or GPU."""
    lib = _load(("libcuda.so.1", "libcuda.so"))
    if lib is None or lib.cuInit(0) != 0:
        return 0
    n = ctypes.c_int(0)
    return n.value if lib.cuDeviceGetCount(ctypes.byref(n)) == 0 else 0


class DeviceBuffer:
    """One device allocation, filled from host numpy arrays."""

    def __init__(self, nbytes: int):
        self.rt = _load(("libcudart.so", "libcudart.so.12", "libcudart.so.11.0"))
        if self.rt is None:
            raise D3NError("libcudart not found: the CUDA runtime is needed to calibrate an INT8 engine")
        self.ptr = ctypes.c_void_p()
        self.nbytes = nbytes
        self._check(self.rt.cudaMalloc(ctypes.byref(self.ptr), ctypes.c_size_t(nbytes)), "cudaMalloc")

    def _check(self, code: int, what: str) -> None:
        if code != 0:
            raise D3NError(f"{what} failed with CUDA error {code}")

    def upload(self, array) -> int:
        if array.nbytes > self.nbytes:
            raise D3NError(f"calibration batch of {array.nbytes} bytes exceeds the {self.nbytes}-byte buffer")
        self._check(self.rt.cudaMemcpy(self.ptr, ctypes.c_void_p(array.ctypes.data), ctypes.c_size_t(array.nbytes),
                                       _H2D), "cudaMemcpy")
        return int(self.ptr.value)

    def free(self) -> None:
        if self.ptr:
            self.rt.cudaFree(self.ptr)
            self.ptr = ctypes.c_void_p()
