"""The native TensorRT engine backend (`tensorrt-engine`): the only TensorRT runner in edgekiln.

It runs a bundle's serialized engine (artifact 'tensorrt', model.plan) with TensorRT's
own Python API and onnxruntime-gpu's OrtValues as device buffers (no torch). An engine
only runs on the TensorRT version and GPU it was built for, so the fingerprint bundle.json
records with it is compared with this machine's first; a mismatch, or a machine without
TensorRT or a GPU, is EngineUnavailable — the one error the ONNX fallback
(runtime.backends.policy) may replace.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np

from runtime.backends.base import Session, register_backend
from runtime.backends.ort import available_providers, preload_cuda_libraries
from runtime.bundle import Bundle
from runtime.errors import BackendError, BundleError

_FALLBACK_HINT = ("or allow running the bundle's ONNX model instead (runtime.load(..., allow_engine_fallback=True), "
                  "edgekiln serve --allow-engine-fallback)")
_REEXPORT_HINT = "re-export the engine on this machine (edgekiln export CONFIG --tensorrt), " + _FALLBACK_HINT


class EngineUnavailable(BackendError):
    """The bundle's engine cannot run on this machine: no TensorRT, no GPU, or another TensorRT
    version or GPU than it was built for. The only error the ONNX fallback may replace."""

    def __init__(self, reason: str, advice: str):
        super().__init__(f"backend 'tensorrt-engine': {reason}; {advice}")
        self.reason = reason


def is_onnx_key(key: str) -> bool:
    return key == "onnx" or key.startswith("onnx_")


def engine_key(artifact: str) -> str:
    """The engine artifact to run when `artifact` was asked for ('onnx', the default, means the bundle's engine)."""
    return "tensorrt" if is_onnx_key(artifact) else artifact


def onnx_key(artifact: str) -> str:
    """The ONNX artifact onnxruntime backends run in place of `artifact`."""
    return artifact if is_onnx_key(artifact) else "onnx"


def import_tensorrt() -> Any:
    try:
        import tensorrt as trt
    except (ImportError, OSError) as e:  # OSError: the wheel is there but libnvinfer cannot be loaded
        raise EngineUnavailable(
            f"the tensorrt Python package does not import here ({e})",
            "install NVIDIA TensorRT 10 with pip install 'tensorrt>=10,<11' (Linux x86_64/aarch64 with an NVIDIA "
            "driver) and onnxruntime-gpu (pip install 'edgekiln[gpu]'), " + _FALLBACK_HINT,
        ) from None
    return trt


def run_in_profile_batches(x: np.ndarray, min_batch: int, max_batch: int, run_one) -> np.ndarray:
    """Run `run_one` on `x` in pieces a TensorRT optimization profile accepts: at most `max_batch`
    rows each, a short piece padded with zero rows up to `min_batch` (set_input_shape rejects shapes
    outside the profile) and those rows dropped from its output. Used by the runtime's engine
    backend and by the exporter's parity runner."""
    outs = []
    for i in range(0, len(x), max_batch):
        piece = x[i : i + max_batch]
        n = len(piece)
        if n < min_batch:
            piece = np.concatenate([piece, np.zeros((min_batch - n, *piece.shape[1:]), piece.dtype)])
        outs.append(run_one(piece)[:n])
    return outs[0] if len(outs) == 1 else np.concatenate(outs)


class TensorRTEngineSession:
    """A serialized TensorRT engine run through TensorRT's Python API (TensorRT 10, name-based IO).

    Device buffers are onnxruntime-gpu OrtValues (onnxruntime-gpu is already the GPU
    runtime's dependency; torch must not be imported here). The engine runs on a CUDA
    stream of its own, created through the driver API (runtime.gpu_info.CudaDevice):
    enqueueV3 on the legacy default stream (stream 0) makes TensorRT add synchronizations,
    which NVIDIA documents as a performance issue, and no torch or cuda-python stream is
    available in this runtime. See
    https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/ExecutionContext.html
    """

    def __init__(self, trt: Any, engine_path: Path, input_name: str, output_name: str,
                 chw: tuple[int, int, int], device: Any):
        self.device = device  # a runtime.gpu_info.CudaDevice, owned (and closed) by this session
        self.ort_session = None  # no onnxruntime session
        self.input_name, self.output_name = input_name, output_name
        self.backend = "tensorrt-engine"
        self.provider = f"TensorRT {trt.__version__}"
        self.model_file = engine_path.name
        self.device_id = device.device_id
        self._lock = threading.Lock()  # one IExecutionContext runs one batch at a time
        try:
            self._load(trt, engine_path, tuple(chw))
        except BaseException:
            self.close()
            raise

    def _load(self, trt: Any, engine_path: Path, chw: tuple[int, int, int]) -> None:
        name = engine_path.name
        self._probe_device_buffers()
        with self.device.current():  # TensorRT allocates in the current context: device_id's
            self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
            self._engine = self._runtime.deserialize_cuda_engine(engine_path.read_bytes())
            if self._engine is None:
                raise EngineUnavailable(f"TensorRT {trt.__version__} could not deserialize {name} "
                                        "(TensorRT's log above says why)", _REEXPORT_HINT)
            self._context = self._engine.create_execution_context()
            if self._context is None:
                raise BackendError(f"backend 'tensorrt-engine': TensorRT could not create an execution context "
                                   f"for {name} (out of GPU memory? TensorRT's log above says why)")
        engine = self._engine
        io = {engine.get_tensor_name(i): engine.get_tensor_mode(engine.get_tensor_name(i))
              for i in range(engine.num_io_tensors)}
        for tensor, mode in ((self.input_name, trt.TensorIOMode.INPUT), (self.output_name, trt.TensorIOMode.OUTPUT)):
            if io.get(tensor) != mode:
                raise BundleError(f"{engine_path}: the engine has no {mode.name.lower()} tensor '{tensor}' named in "
                                  f"bundle.json (engine IO: {', '.join(io)})")
            if engine.get_tensor_dtype(tensor) != trt.float32:
                raise BundleError(f"{engine_path}: tensor '{tensor}' is {engine.get_tensor_dtype(tensor)}, not float32")
        # set_input_shape fails outside the optimization profile, so batches are split to at most its max
        # and padded up to its min (run_in_profile_batches).
        shape_min, _, shape_max = (tuple(int(d) for d in dims)  # trt.Dims -> tuple
                                   for dims in engine.get_tensor_profile_shape(self.input_name, 0))
        self.min_batch, self.max_batch = shape_min[0], shape_max[0]
        if shape_max[1:] != chw:
            raise BundleError(f"{engine_path}: the engine takes images of shape {shape_max[1:]}, "
                              f"bundle.json's preprocessing makes {chw}")
        self.num_classes = tuple(int(d) for d in engine.get_tensor_shape(self.output_name))[-1]

    def _probe_device_buffers(self) -> None:
        """Fail now, not on the first request, when onnxruntime-gpu cannot allocate CUDA memory."""
        import onnxruntime as ort

        preload_cuda_libraries()
        try:
            ort.OrtValue.ortvalue_from_shape_and_type((1,), np.float32, "cuda", self.device_id)
        except Exception as e:  # onnxruntime raises untyped errors when its CUDA libraries are missing
            msg = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
            raise EngineUnavailable(f"onnxruntime-gpu cannot allocate CUDA memory for the engine's buffers ({msg})",
                                    "check the CUDA/cuDNN libraries onnxruntime-gpu needs, " + _FALLBACK_HINT) from None

    def run(self, batch: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(batch, dtype=np.float32)
        if len(x) == 0:
            return np.zeros((0, self.num_classes), dtype=np.float32)
        return run_in_profile_batches(x, self.min_batch, self.max_batch, self._run)

    def _run(self, x: np.ndarray) -> np.ndarray:
        import onnxruntime as ort

        with self._lock, self.device.current():
            # onnxruntime copies on the legacy default stream; CudaDevice's stream is a blocking one, so
            # the engine's kernels wait for that copy.
            inp = ort.OrtValue.ortvalue_from_numpy(x, "cuda", self.device_id)
            if not self._context.set_input_shape(self.input_name, tuple(x.shape)):
                raise BackendError(f"backend 'tensorrt-engine': TensorRT rejected input shape {tuple(x.shape)} "
                                   f"(engine batch range {self.min_batch}..{self.max_batch})")
            out_shape = tuple(int(d) for d in self._context.get_tensor_shape(self.output_name))
            out = ort.OrtValue.ortvalue_from_shape_and_type(out_shape, np.float32, "cuda", self.device_id)
            self._context.set_tensor_address(self.input_name, inp.data_ptr())
            self._context.set_tensor_address(self.output_name, out.data_ptr())
            if not self._context.execute_async_v3(self.device.stream):
                raise BackendError("backend 'tensorrt-engine': TensorRT execution failed "
                                   "(TensorRT's log above says why)")
            self.device.synchronize()  # before the buffers are read back or freed
            logits = out.numpy()
        return logits

    def close(self) -> None:
        """Free the engine, its stream and the device context (idempotent; also done by garbage collection)."""
        device = self.__dict__.pop("device", None)
        if device is None:
            return
        with device.current():  # TensorRT objects go before the context they live in
            for attr in ("_context", "_engine", "_runtime"):
                self.__dict__.pop(attr, None)
        device.close()

    def __del__(self):
        if not sys.is_finalizing():  # at exit the driver frees everything itself
            self.close()


def check_engine_fingerprint(engine_name: str, recorded: Any, current: dict[str, str]) -> None:
    """Raise EngineUnavailable naming every difference between bundle.json's fingerprint and this machine's."""
    from runtime.gpu_info import fingerprint_mismatch

    if not isinstance(recorded, dict):
        raise EngineUnavailable(f"bundle.json records no fingerprint for {engine_name}, so it cannot be checked "
                                "against this GPU", _REEXPORT_HINT)
    diff = fingerprint_mismatch(recorded, current)
    if diff:
        raise EngineUnavailable(f"{engine_name} was built for another machine ({'; '.join(diff)})", _REEXPORT_HINT)


@register_backend("tensorrt-engine", "",
                  "the bundle's native serialized TensorRT engine (model.plan), checked against this GPU")
def _tensorrt_engine(bundle: Bundle, artifact: str = "onnx", intra_op_threads: int | None = None,
                     device_id: int = 0) -> Session:
    from runtime.gpu_info import CudaDevice, engine_fingerprint

    key = engine_key(artifact)
    entry = bundle.artifact(key)  # BundleError when the bundle has no engine
    engine = bundle.path(key)
    trt = import_tensorrt()
    available = available_providers()
    if "CUDAExecutionProvider" not in available:
        raise EngineUnavailable(
            f"its device buffers need onnxruntime-gpu, and this onnxruntime has no CUDAExecutionProvider "
            f"(available: {', '.join(available)})",
            "pip install 'edgekiln[gpu]' on a machine with an NVIDIA GPU, " + _FALLBACK_HINT)
    current = engine_fingerprint(str(trt.__version__), device_id)
    if current is None:
        raise EngineUnavailable("no CUDA GPU here (the NVIDIA driver library is missing or reports no device)",
                                "run it on a machine with the GPU it was built for, " + _FALLBACK_HINT)
    check_engine_fingerprint(engine.name, entry.fingerprint, current)
    chw = (3, *bundle.preprocess.hw)
    # the session closes the device if it fails to load
    return TensorRTEngineSession(trt, engine, bundle.input_name, bundle.output_name, chw, CudaDevice(device_id))
