"""Inference backends: one registry, one factory, no silent fallback.

    session = create_session("cuda", bundle, intra_op_threads=4)

`cpu`, `cuda` and `tensorrt` each need one onnxruntime execution provider.
Asking for one by name that this install or machine cannot provide raises
BackendError listing what is available; onnxruntime itself would quietly run
on the CPU when a GPU provider fails to initialise, so every session is checked
after creation to be running on the provider that was asked for.

`tensorrt-engine` runs the bundle's serialized TensorRT engine (artifact
'tensorrt', model.plan) with TensorRT's own Python API and onnxruntime-gpu's
OrtValues as device buffers (no torch). An engine only runs on the TensorRT
version and GPU it was built for, so the fingerprint bundle.json records with it
is compared with this machine's first; a mismatch, or a machine without
TensorRT or a GPU, is an error — unless the caller allows the fallback
(`allow_engine_fallback=True`, `edgekiln serve --allow-engine-fallback`, or
$EDGEKILN_ALLOW_ENGINE_FALLBACK=1), in which case a WARNING names the reason and
the bundle's ONNX model runs on the best onnxruntime backend that starts.

`auto` tries the backends best-first and logs the one it chose (and why others
were skipped): `tensorrt-engine` first when the bundle has an engine, then
AUTO_ORDER.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from runtime.bundle import Bundle
from runtime.errors import BackendError, BundleError, ConfigError

log = logging.getLogger("edgekiln.runtime")


class Session:
    """A loaded model on one backend: `run(batch) -> logits`, thread-safe."""

    backend: str
    provider: str

    def __init__(self, ort_session: Any, bundle: Bundle, backend: str, model_file: str = ""):
        self.ort_session = ort_session
        self.input_name = bundle.input_name
        self.output_name = bundle.output_name
        self.backend = backend
        self.provider = ort_session.get_providers()[0]
        self.model_file = model_file  # the bundle file it runs, for logs

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self.ort_session.run([self.output_name], {self.input_name: batch})[0]


class IOBindingSession(Session):
    """CUDA/TensorRT sessions: inputs are copied to the GPU once through an
    OrtValue and the output is bound on the device, so onnxruntime does no
    extra staging copies; one device-to-host copy returns the logits.
    See https://onnxruntime.ai/docs/performance/tune-performance/iobinding.html
    """

    def __init__(self, ort_session: Any, bundle: Bundle, backend: str, device_id: int, device: str = "cuda",
                 model_file: str = ""):
        super().__init__(ort_session, bundle, backend, model_file)
        self.device_id = device_id
        self.device = device  # "cpu" only in tests, which exercise this path without a GPU

    def run(self, batch: np.ndarray) -> np.ndarray:
        import onnxruntime as ort

        binding = self.ort_session.io_binding()  # one per call: IOBinding objects are not thread-safe
        x = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(batch, dtype=np.float32), self.device, self.device_id)
        binding.bind_ortvalue_input(self.input_name, x)
        binding.bind_output(self.output_name, self.device, self.device_id)
        self.ort_session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]


@dataclass(frozen=True)
class BackendSpec:
    name: str
    provider: str  # the onnxruntime execution provider it needs ("" for none)
    description: str
    make: Callable[..., Session]


_BACKENDS: dict[str, BackendSpec] = {}
# `auto` tries these in order.
AUTO_ORDER = ("tensorrt", "cuda", "cpu")


def register_backend(name: str, provider: str, description: str):
    def deco(fn: Callable[..., Session]) -> Callable[..., Session]:
        if name in _BACKENDS or name == "auto":
            raise ValueError(f"backend '{name}' is already registered")
        _BACKENDS[name] = BackendSpec(name, provider, description, fn)
        return fn

    return deco


def backend_names() -> list[str]:
    """Every backend name `create_session` accepts (including `auto`)."""
    return [*_BACKENDS, "auto"]


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def _session_options(intra_op_threads: int | None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if intra_op_threads:
        opts.intra_op_num_threads = int(intra_op_threads)
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return opts


def _require_provider(name: str, provider: str) -> None:
    available = available_providers()
    if provider not in available:
        raise BackendError(
            f"backend '{name}' needs onnxruntime's {provider}, which this install lacks "
            f"(available: {', '.join(available)}); "
            + ("install onnxruntime-gpu (pip install 'edgekiln[gpu]') on a machine with an NVIDIA GPU"
               if provider != "CPUExecutionProvider" else "reinstall onnxruntime")
        )


def _ort_session(name: str, provider: str, providers: list, model_path: Path, intra_op_threads: int | None):
    import onnxruntime as ort

    try:
        sess = ort.InferenceSession(str(model_path), sess_options=_session_options(intra_op_threads), providers=providers)
    except Exception as e:  # onnxruntime raises untyped errors for bad models and broken GPU setups
        msg = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        if provider == "CPUExecutionProvider":
            raise BundleError(f"{model_path}: onnxruntime cannot load it ({msg})") from None
        raise BackendError(f"backend '{name}': onnxruntime could not create a {provider} session ({msg})") from None
    got = sess.get_providers()
    if not got or got[0] != provider:
        # onnxruntime falls back to the CPU with only a warning when a GPU
        # provider fails to initialise (missing CUDA/cuDNN/TensorRT libraries).
        raise BackendError(
            f"backend '{name}': onnxruntime could not initialise {provider} and fell back to "
            f"{', '.join(got) or 'nothing'}; check the CUDA/cuDNN/TensorRT libraries "
            f"(onnxruntime's log above says which one is missing)"
        )
    return sess


@register_backend("cpu", "CPUExecutionProvider", "onnxruntime on the CPU")
def _cpu(bundle: Bundle, artifact: str = "onnx", intra_op_threads: int | None = None, device_id: int = 0) -> Session:
    _require_provider("cpu", "CPUExecutionProvider")
    path = bundle.path(artifact)
    sess = _ort_session("cpu", "CPUExecutionProvider", ["CPUExecutionProvider"], path, intra_op_threads)
    return Session(sess, bundle, "cpu", model_file=path.name)


@register_backend("cuda", "CUDAExecutionProvider", "onnxruntime-gpu's CUDA execution provider, with IO binding")
def _cuda(bundle: Bundle, artifact: str = "onnx", intra_op_threads: int | None = None, device_id: int = 0) -> Session:
    _require_provider("cuda", "CUDAExecutionProvider")
    providers = [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"]
    path = bundle.path(artifact)
    sess = _ort_session("cuda", "CUDAExecutionProvider", providers, path, intra_op_threads)
    return IOBindingSession(sess, bundle, "cuda", device_id, model_file=path.name)


@register_backend("tensorrt", "TensorrtExecutionProvider",
                  "onnxruntime-gpu's TensorRT execution provider (engines built from the ONNX file and cached)")
def _tensorrt(bundle: Bundle, artifact: str = "onnx", intra_op_threads: int | None = None, device_id: int = 0) -> Session:
    _require_provider("tensorrt", "TensorrtExecutionProvider")
    # TensorRT builds an engine on first load (seconds to minutes); caching it
    # next to the bundle (or where EDGEKILN_TRT_CACHE says) makes later starts fast.
    cache = Path(os.environ.get("EDGEKILN_TRT_CACHE", bundle.root / ".trt-cache"))
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BackendError(f"backend 'tensorrt': cannot create the engine cache {cache} ({e}); set EDGEKILN_TRT_CACHE") from None
    trt_opts = {
        "device_id": device_id,
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(cache),
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": str(cache),
    }
    providers = [("TensorrtExecutionProvider", trt_opts), ("CUDAExecutionProvider", {"device_id": device_id}),
                 "CPUExecutionProvider"]
    path = bundle.path(artifact)
    sess = _ort_session("tensorrt", "TensorrtExecutionProvider", providers, path, intra_op_threads)
    return IOBindingSession(sess, bundle, "tensorrt", device_id, model_file=path.name)


# ------------------------------------------------------------------ native TensorRT engines

ENGINE_FALLBACK_ENV = "EDGEKILN_ALLOW_ENGINE_FALLBACK"
_FALLBACK_HINT = ("or allow running the bundle's ONNX model instead (runtime.load(..., allow_engine_fallback=True), "
                  "edgekiln serve --allow-engine-fallback)")
_REEXPORT_HINT = "re-export the engine on this machine (edgekiln export CONFIG --tensorrt), " + _FALLBACK_HINT


class EngineUnavailable(BackendError):
    """The bundle's engine cannot run on this machine: no TensorRT, no GPU, or another TensorRT
    version or GPU than it was built for. The only error the ONNX fallback may replace."""

    def __init__(self, reason: str, advice: str):
        super().__init__(f"backend 'tensorrt-engine': {reason}; {advice}")
        self.reason = reason


def _is_onnx_key(key: str) -> bool:
    return key == "onnx" or key.startswith("onnx_")


def _engine_key(artifact: str) -> str:
    """The engine artifact to run when `artifact` was asked for ('onnx', the default, means the bundle's engine)."""
    return "tensorrt" if _is_onnx_key(artifact) else artifact


def _onnx_key(artifact: str) -> str:
    """The ONNX artifact onnxruntime backends run in place of `artifact`."""
    return artifact if _is_onnx_key(artifact) else "onnx"


def engine_fallback_from_env() -> bool:
    """$EDGEKILN_ALLOW_ENGINE_FALLBACK=1: the same as allow_engine_fallback=True, for containers configured by env."""
    raw = os.environ.get(ENGINE_FALLBACK_ENV, "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise ConfigError(f"${ENGINE_FALLBACK_ENV}={os.environ[ENGINE_FALLBACK_ENV]!r} is not a boolean; use 1 or 0")


def _import_tensorrt() -> Any:
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


class TensorRTEngineSession(Session):
    """A serialized TensorRT engine run through TensorRT's Python API (TensorRT 10, name-based IO).

    Device buffers are onnxruntime-gpu OrtValues (onnxruntime-gpu is already the GPU
    runtime's dependency; torch must not be imported here). The engine runs on a CUDA
    stream of its own, created through the driver API (runtime.gpu_info.CudaDevice):
    enqueueV3 on the legacy default stream (stream 0) makes TensorRT add synchronizations,
    which NVIDIA documents as a performance issue, and no torch or cuda-python stream is
    available in this runtime. See
    https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/ExecutionContext.html
    """

    def __init__(self, trt: Any, engine_path: Path, bundle: Bundle, device: Any):
        self.device = device  # a runtime.gpu_info.CudaDevice, owned (and closed) by this session
        self.ort_session = None  # no onnxruntime session: Session's constructor does not apply
        self.input_name, self.output_name = bundle.input_name, bundle.output_name
        self.backend = "tensorrt-engine"
        self.provider = f"TensorRT {trt.__version__}"
        self.model_file = engine_path.name
        self.device_id = device.device_id
        self._lock = threading.Lock()  # one IExecutionContext runs one batch at a time
        try:
            self._load(trt, engine_path, bundle)
        except BaseException:
            self.close()
            raise

    def _load(self, trt: Any, engine_path: Path, bundle: Bundle) -> None:
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
        chw = (3, bundle.preprocess.crop, bundle.preprocess.crop)
        if shape_max[1:] != chw:
            raise BundleError(f"{engine_path}: the engine takes images of shape {shape_max[1:]}, "
                              f"bundle.json's preprocessing makes {chw}")
        self.num_classes = tuple(int(d) for d in engine.get_tensor_shape(self.output_name))[-1]

    def _probe_device_buffers(self) -> None:
        """Fail now, not on the first request, when onnxruntime-gpu cannot allocate CUDA memory."""
        import onnxruntime as ort

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

    key = _engine_key(artifact)
    engine = bundle.path(key)  # BundleError when the bundle has no engine
    trt = _import_tensorrt()
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
    check_engine_fingerprint(engine.name, bundle.meta["artifacts"][key].get("fingerprint"), current)
    return TensorRTEngineSession(trt, engine, bundle, CudaDevice(device_id))  # closes the device if it fails


def _engine_or_fallback(bundle: Bundle, artifact: str, intra_op_threads: int | None, device_id: int) -> Session:
    """Backend 'tensorrt-engine' with the fallback allowed: the engine when it can run here, else the
    bundle's ONNX model on the best onnxruntime backend, with a WARNING naming the reason."""
    key = _engine_key(artifact)
    if key not in bundle.meta.get("artifacts", {}):
        reason = f"the bundle has no '{key}' artifact"
    else:
        try:
            sess = _BACKENDS["tensorrt-engine"].make(bundle, artifact=key, intra_op_threads=intra_op_threads,
                                                     device_id=device_id)
        except EngineUnavailable as e:
            reason = e.reason
        else:
            log.info("edgekiln runtime: %s on backend 'tensorrt-engine' (%s)", sess.model_file, sess.provider)
            return sess
    onnx_key = _onnx_key(artifact)
    try:
        sess = _auto(bundle, onnx_key, intra_op_threads, device_id, try_engine=False)
    except BackendError as e:
        raise BackendError(f"backend 'tensorrt-engine': {reason}; and the allowed fallback to the '{onnx_key}' "
                           f"artifact failed too: {e}") from None
    log.warning("edgekiln runtime: backend 'tensorrt-engine' cannot run here: %s. Falling back, as allowed "
                "(allow_engine_fallback), to %s on onnxruntime backend '%s' (%s)",
                reason, sess.model_file, sess.backend, sess.provider)
    return sess


def create_session(backend: str, bundle: Bundle, artifact: str = "onnx", intra_op_threads: int | None = None,
                   device_id: int = 0, allow_engine_fallback: bool = False) -> Session:
    """Open the bundle's model on `backend` ('auto' = the best that works, logged).

    allow_engine_fallback (or $EDGEKILN_ALLOW_ENGINE_FALLBACK=1): when backend 'tensorrt-engine'
    cannot run the bundle's engine here, run its ONNX model on the best onnxruntime backend
    instead, with a WARNING saying why. Without it that is a BackendError.
    """
    if backend == "auto":
        return _auto(bundle, artifact, intra_op_threads, device_id)
    if backend not in _BACKENDS:
        raise BackendError(f"unknown backend '{backend}'; valid: {', '.join(backend_names())}")
    if backend == "tensorrt-engine" and (allow_engine_fallback or engine_fallback_from_env()):
        return _engine_or_fallback(bundle, artifact, intra_op_threads, device_id)
    sess = _BACKENDS[backend].make(bundle, artifact=artifact, intra_op_threads=intra_op_threads, device_id=device_id)
    log.info("edgekiln runtime: %s on backend '%s' (%s)", sess.model_file, backend, sess.provider)
    return sess


def _auto(bundle: Bundle, artifact: str, intra_op_threads: int | None, device_id: int,
          try_engine: bool = True) -> Session:
    skipped = []
    if try_engine:  # the bundle's own engine first, when it has one; logged on its own line when skipped
        key = _engine_key(artifact)
        if artifact != "onnx" and _is_onnx_key(artifact):
            why = f"the '{artifact}' artifact was asked for"
            log.info("edgekiln runtime: auto: skipping backend 'tensorrt-engine': %s", why)
        elif key not in bundle.meta.get("artifacts", {}):
            why = f"bundle has no '{key}' artifact"
            log.info("edgekiln runtime: auto: skipping backend 'tensorrt-engine': %s", why)
        else:
            try:
                sess = _BACKENDS["tensorrt-engine"].make(bundle, artifact=key, intra_op_threads=intra_op_threads,
                                                         device_id=device_id)
            except BackendError as e:
                why = "failed to start"
                log.warning("edgekiln runtime: auto: skipping backend 'tensorrt-engine': %s", getattr(e, "reason", e))
            else:
                log.info("edgekiln runtime: auto chose backend 'tensorrt-engine' (%s) for %s", sess.provider,
                         sess.model_file)
                return sess
        engine_skipped = f"tensorrt-engine: {why}; "
    else:
        engine_skipped = ""
    artifact = _onnx_key(artifact)
    available = available_providers()
    for name in AUTO_ORDER:
        spec = _BACKENDS[name]
        if spec.provider not in available:
            skipped.append(f"{name}: no {spec.provider}")
            continue
        try:
            sess = spec.make(bundle, artifact=artifact, intra_op_threads=intra_op_threads, device_id=device_id)
        except BackendError as e:
            log.warning("edgekiln runtime: auto: skipping backend '%s': %s", name, e)
            skipped.append(f"{name}: failed to start")
            continue
        log.info("edgekiln runtime: auto chose backend '%s' (%s) for %s%s", name, sess.provider,
                 sess.model_file, f"; skipped {'; '.join(skipped)}" if skipped else "")
        return sess
    raise BackendError(f"backend 'auto': no backend could start ({engine_skipped}{'; '.join(skipped)})")
