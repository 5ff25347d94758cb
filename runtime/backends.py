"""Inference backends: one registry, one factory, no silent fallback.

    session = create_session("cuda", bundle, intra_op_threads=4)

`cpu`, `cuda` and `tensorrt` each need one onnxruntime execution provider.
Asking for one by name that this install or machine cannot provide raises
BackendError listing what is available; onnxruntime itself would quietly run
on the CPU when a GPU provider fails to initialise, so every session is checked
after creation to be running on the provider that was asked for. `auto` tries
the backends best-first and logs the one it chose (and why others were
skipped). `tensorrt-engine` (a serialized native TensorRT engine) is declared
so that it is named in errors, but running one is not implemented in this
runtime: it errors clearly instead.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from runtime.bundle import Bundle
from runtime.errors import BackendError, BundleError

log = logging.getLogger("edgekiln.runtime")


class Session:
    """A loaded model on one backend: `run(batch) -> logits`, thread-safe."""

    backend: str
    provider: str

    def __init__(self, ort_session: Any, bundle: Bundle, backend: str):
        self.ort_session = ort_session
        self.input_name = bundle.input_name
        self.output_name = bundle.output_name
        self.backend = backend
        self.provider = ort_session.get_providers()[0]

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self.ort_session.run([self.output_name], {self.input_name: batch})[0]


class IOBindingSession(Session):
    """CUDA/TensorRT sessions: inputs are copied to the GPU once through an
    OrtValue and the output is bound on the device, so onnxruntime does no
    extra staging copies; one device-to-host copy returns the logits.
    See https://onnxruntime.ai/docs/performance/tune-performance/iobinding.html
    """

    def __init__(self, ort_session: Any, bundle: Bundle, backend: str, device_id: int, device: str = "cuda"):
        super().__init__(ort_session, bundle, backend)
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
    sess = _ort_session("cpu", "CPUExecutionProvider", ["CPUExecutionProvider"], bundle.path(artifact), intra_op_threads)
    return Session(sess, bundle, "cpu")


@register_backend("cuda", "CUDAExecutionProvider", "onnxruntime-gpu's CUDA execution provider, with IO binding")
def _cuda(bundle: Bundle, artifact: str = "onnx", intra_op_threads: int | None = None, device_id: int = 0) -> Session:
    _require_provider("cuda", "CUDAExecutionProvider")
    providers = [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"]
    sess = _ort_session("cuda", "CUDAExecutionProvider", providers, bundle.path(artifact), intra_op_threads)
    return IOBindingSession(sess, bundle, "cuda", device_id)


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
    sess = _ort_session("tensorrt", "TensorrtExecutionProvider", providers, bundle.path(artifact), intra_op_threads)
    return IOBindingSession(sess, bundle, "tensorrt", device_id)


@register_backend("tensorrt-engine", "", "a native serialized TensorRT engine from the bundle (not implemented yet)")
def _tensorrt_engine(bundle: Bundle, artifact: str = "tensorrt", intra_op_threads: int | None = None,
                     device_id: int = 0) -> Session:
    engine = bundle.path("tensorrt" if artifact == "onnx" else artifact)  # BundleError when there is no engine
    raise BackendError(
        f"backend 'tensorrt-engine': running native engines ({engine.name}) is not implemented in this runtime; "
        "use backend 'tensorrt' (onnxruntime's TensorRT provider builds and caches an engine from the ONNX model) "
        "or hand the Triton repository to Triton Inference Server (docs/deploy.md)"
    )


def create_session(backend: str, bundle: Bundle, artifact: str = "onnx", intra_op_threads: int | None = None,
                   device_id: int = 0) -> Session:
    """Open the bundle's model on `backend` ('auto' = the best that works, logged)."""
    if backend == "auto":
        return _auto(bundle, artifact, intra_op_threads, device_id)
    if backend not in _BACKENDS:
        raise BackendError(f"unknown backend '{backend}'; valid: {', '.join(backend_names())}")
    sess = _BACKENDS[backend].make(bundle, artifact=artifact, intra_op_threads=intra_op_threads, device_id=device_id)
    log.info("edgekiln runtime: %s on backend '%s' (%s)", bundle.path(artifact).name, backend, sess.provider)
    return sess


def _auto(bundle: Bundle, artifact: str, intra_op_threads: int | None, device_id: int) -> Session:
    available = available_providers()
    skipped = []
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
                 bundle.path(artifact).name, f"; skipped {'; '.join(skipped)}" if skipped else "")
        return sess
    raise BackendError(f"backend 'auto': no backend could start ({'; '.join(skipped)})")
