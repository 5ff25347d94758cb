"""The GPU's name and compute capability, and a CUDA stream, from the CUDA driver.

    info = gpu_info(0)                       # GpuInfo(name='NVIDIA L4', compute_capability='8.9'), None without a GPU
    engine_fingerprint("10.3.0", 0)          # bundle.json's "fingerprint" format, for fingerprint_mismatch()

Hand-written ctypes over the CUDA driver API (libcuda.so.1 / nvcuda.dll)
because runtime/ must never import torch (a test checks it), and pycuda or
cuda-python would be one more dependency; the driver library itself is present
wherever an NVIDIA GPU can be used at all. Driver API reference:
https://docs.nvidia.com/cuda/cuda-driver-api/
"""

from __future__ import annotations

import ctypes
import functools
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

from runtime.errors import BackendError

# CUdevice_attribute values (cuda.h)
CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75
CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR = 76
# CUresult values meaning "there is no usable GPU here" rather than "something is broken"
CUDA_ERROR_STUB_LIBRARY = 34  # the toolkit's stub libcuda (a container without the driver mounted)
CUDA_ERROR_NO_DEVICE = 100
CUDA_ERROR_INVALID_DEVICE = 101

# What a serialized TensorRT engine is tied to; the order the differences are reported in.
FINGERPRINT_KEYS = ("tensorrt", "compute_capability", "gpu")


@dataclass(frozen=True)
class GpuInfo:
    name: str  # cuDeviceGetName, the same string as torch.cuda.get_device_name()
    compute_capability: str  # "major.minor", as exporters/tensorrt.py records it


@functools.lru_cache(maxsize=1)
def _driver() -> Any:
    """The loaded driver library, or None where there is none (no NVIDIA driver, macOS)."""
    if sys.platform == "win32":
        names, loader = ["nvcuda.dll"], getattr(ctypes, "WinDLL", ctypes.CDLL)
    elif sys.platform.startswith("linux"):
        names, loader = ["libcuda.so.1"], ctypes.CDLL
    else:
        return None
    for name in names:
        try:
            lib = loader(name)
        except OSError:
            continue
        _declare(lib)
        return lib
    return None


def _declare(lib: Any) -> None:
    """Argument types, so handles are passed as pointers and not truncated to C ints."""
    c_int, c_uint, c_void_p, ptr = ctypes.c_int, ctypes.c_uint, ctypes.c_void_p, ctypes.POINTER
    sigs = {
        "cuInit": [c_uint],
        "cuDeviceGetCount": [ptr(c_int)],
        "cuDeviceGet": [ptr(c_int), c_int],
        "cuDeviceGetName": [ctypes.c_char_p, c_int, c_int],
        "cuDeviceGetAttribute": [ptr(c_int), c_int, c_int],
        "cuGetErrorName": [c_int, ptr(ctypes.c_char_p)],
        "cuDevicePrimaryCtxRetain": [ptr(c_void_p), c_int],
        "cuDevicePrimaryCtxRelease_v2": [c_int],
        "cuCtxPushCurrent_v2": [c_void_p],
        "cuCtxPopCurrent_v2": [ptr(c_void_p)],
        "cuStreamCreate": [ptr(c_void_p), c_uint],
        "cuStreamSynchronize": [c_void_p],
        "cuStreamDestroy_v2": [c_void_p],
    }
    for name, argtypes in sigs.items():
        fn = getattr(lib, name, None)
        if fn is not None:  # a driver too old for a _v2 entry point fails when it is called, by name
            fn.argtypes, fn.restype = argtypes, c_int


def _call(lib: Any, name: str, *args: Any) -> int:
    fn = getattr(lib, name, None)
    if fn is None:
        raise BackendError(f"the NVIDIA driver is too old: its CUDA library has no {name}; update the driver")
    return int(fn(*args))


def _check(lib: Any, status: int, what: str) -> None:
    if status != 0:
        name = ctypes.c_char_p()
        known = getattr(lib, "cuGetErrorName", None) is not None and lib.cuGetErrorName(status, ctypes.byref(name)) == 0
        raise BackendError(f"CUDA driver: {what} failed ({name.value.decode() if known and name.value else status})")


def _device(lib: Any, device_id: int) -> int | None:
    """cuInit + cuDeviceGet; None when the driver reports no GPU."""
    status = _call(lib, "cuInit", 0)
    if status in (CUDA_ERROR_NO_DEVICE, CUDA_ERROR_STUB_LIBRARY):
        return None
    _check(lib, status, "cuInit")
    dev = ctypes.c_int()
    status = _call(lib, "cuDeviceGet", ctypes.byref(dev), int(device_id))
    if status == CUDA_ERROR_INVALID_DEVICE:
        count = ctypes.c_int()
        _check(lib, _call(lib, "cuDeviceGetCount", ctypes.byref(count)), "cuDeviceGetCount")
        raise BackendError(f"no CUDA device {device_id}: this machine has {count.value} (valid device ids: "
                           f"{', '.join(map(str, range(count.value))) or 'none'})")
    _check(lib, status, f"cuDeviceGet({device_id})")
    return dev.value


def gpu_info(device_id: int = 0) -> GpuInfo | None:
    """Name and compute capability of CUDA device `device_id`; None where there is no driver or GPU.

    Raises BackendError when the driver is present but fails, or `device_id` does not exist.
    """
    lib = _driver()
    if lib is None:
        return None
    dev = _device(lib, device_id)
    if dev is None:
        return None
    buf = ctypes.create_string_buffer(256)
    _check(lib, _call(lib, "cuDeviceGetName", buf, len(buf), dev), "cuDeviceGetName")
    major, minor = ctypes.c_int(), ctypes.c_int()
    for out, attr in ((major, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR),
                      (minor, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)):
        _check(lib, _call(lib, "cuDeviceGetAttribute", ctypes.byref(out), attr, dev), "cuDeviceGetAttribute")
    return GpuInfo(name=buf.value.decode(errors="replace"), compute_capability=f"{major.value}.{minor.value}")


def engine_fingerprint(tensorrt_version: str, device_id: int = 0) -> dict[str, str] | None:
    """This machine's fingerprint in the format exporters/tensorrt.gpu_fingerprint() records; None without a GPU."""
    info = gpu_info(device_id)
    if info is None:
        return None
    return {"tensorrt": str(tensorrt_version), "gpu": info.name, "compute_capability": info.compute_capability}


def fingerprint_mismatch(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable differences between the bundle's fingerprint and this machine's (empty = compatible)."""
    out = []
    for key in FINGERPRINT_KEYS:
        if recorded.get(key) != current.get(key):
            out.append(f"{key}: engine built for {recorded.get(key)!r}, this machine has {current.get(key)!r}")
    return out


class CudaDevice:
    """Device `device_id`'s primary context (the one the CUDA runtime, onnxruntime and
    TensorRT use) and one CUDA stream created in it, for the native engine backend."""

    def __init__(self, device_id: int = 0):
        lib = _driver()
        dev = _device(lib, device_id) if lib is not None else None
        if dev is None:
            raise BackendError("no CUDA GPU here (the NVIDIA driver library is missing or reports no device)")
        self.device_id = device_id
        self._lib, self._dev = lib, dev
        self._ctx = ctypes.c_void_p()
        _check(lib, _call(lib, "cuDevicePrimaryCtxRetain", ctypes.byref(self._ctx), dev), "cuDevicePrimaryCtxRetain")
        self._stream = ctypes.c_void_p()
        try:
            with self.current():
                # Flags 0 = a blocking stream: it waits for work queued on the legacy default stream, which is
                # where onnxruntime's OrtValue host-to-device copies run (some versions do not synchronize them).
                _check(lib, _call(lib, "cuStreamCreate", ctypes.byref(self._stream), 0), "cuStreamCreate")
        except BackendError:
            _call(lib, "cuDevicePrimaryCtxRelease_v2", dev)
            raise

    @property
    def stream(self) -> int:
        """The stream's handle, as TensorRT's execute_async_v3 takes it."""
        return int(self._stream.value or 0)

    @contextmanager
    def current(self) -> Iterator[None]:
        """Make this device's primary context current on the calling thread (any thread may run a batch)."""
        _check(self._lib, _call(self._lib, "cuCtxPushCurrent_v2", self._ctx), "cuCtxPushCurrent")
        try:
            yield
        finally:
            popped = ctypes.c_void_p()
            _call(self._lib, "cuCtxPopCurrent_v2", ctypes.byref(popped))

    def synchronize(self) -> None:
        _check(self._lib, _call(self._lib, "cuStreamSynchronize", self._stream), "cuStreamSynchronize")

    def close(self) -> None:
        """Destroy the stream and release the primary context (idempotent)."""
        if self._stream.value:
            _call(self._lib, "cuStreamDestroy_v2", self._stream)
            self._stream = ctypes.c_void_p()
            _call(self._lib, "cuDevicePrimaryCtxRelease_v2", self._dev)
