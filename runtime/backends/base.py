"""The backend contract and its registry: one decorator registers a backend, one factory opens it.

    session = create_session("cuda", bundle, intra_op_threads=4)
    logits = session.run(batch)          # float32 NCHW -> float32 logits

A backend is a function `make(bundle, artifact=..., intra_op_threads=..., device_id=...) -> Session`
registered under a name with the onnxruntime execution provider it needs ("" for none).
`create_session` adds the two policies on top (runtime.backends.policy): `auto`, and the
allowed fallback from a native engine to the bundle's ONNX model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol, runtime_checkable

import numpy as np

from runtime.bundle import DEFAULT_RUNTIMES, Bundle
from runtime.errors import BackendError, BundleError
from runtime.registry import Registry


@runtime_checkable
class Session(Protocol):
    """A loaded model on one backend; `run` is thread-safe."""

    backend: str  # the registered backend name ('cpu', 'tensorrt-engine', ...)
    provider: str  # what actually runs it ('CPUExecutionProvider', 'TensorRT 10.3.0', ...)
    model_file: str  # the file it runs, for logs

    def run(self, batch: np.ndarray) -> np.ndarray:
        """float32 NCHW batch -> float32 logits (N, classes)."""
        ...


@dataclass(frozen=True)
class BackendSpec:
    name: str
    provider: str  # the onnxruntime execution provider it needs ("" for none)
    description: str
    make: Callable[..., Session]
    takes_options: bool = False  # make(..., options=...) takes backend options (runtime.backends.openvino)


BACKENDS: Registry[BackendSpec] = Registry("backend", BackendError, extra_names=("auto",))


def register_backend(name: str, provider: str, description: str, takes_options: bool = False):
    """Decorator: register `make(bundle, artifact, intra_op_threads, device_id) -> Session` as backend `name`
    (takes_options: make also takes `options=`, the backend's own settings object)."""

    def deco(fn: Callable[..., Session]) -> Callable[..., Session]:
        BACKENDS.add(name, BackendSpec(name, provider, description, fn, takes_options))
        return fn

    return deco


def backend_names() -> list[str]:
    """Every backend name `create_session` accepts (including `auto`)."""
    return BACKENDS.names()


def backend_spec(name: str) -> BackendSpec:
    return BACKENDS.get(name)


def has_artifact(bundle: Bundle, key: str) -> bool:
    return key in bundle.manifest.artifacts


def check_parity_on(bundle: Bundle, key: str, backend: str) -> None:
    """BackendError when export's parity gate ran artifact `key` on `backend` and it failed there (its
    record in bundle.json): that artifact is shipped for the backends where it passed, not this one."""
    art = bundle.manifest.artifacts.get(key)
    record = ((art.parity or {}).get("backends") or {}).get(backend) if art else None
    if record and record.get("passed") is False:
        why = "; ".join(record.get("failures") or []) or "see its parity record in bundle.json"
        ok = [b for b in art.runtimes if b != backend and ((art.parity or {}).get("backends") or {}).get(b, {}).get(
            "passed", True)]
        raise BackendError(f"artifact '{key}' ({art.file}) failed the parity gate on backend '{backend}' at export "
                           f"({why}); run it on {', '.join(ok) or 'another backend'}, or open another artifact")


def create_session(backend: str, bundle: Bundle, artifact: str = "onnx", intra_op_threads: int | None = None,
                   device_id: int = 0, allow_engine_fallback: bool = False, options: Any = None) -> Session:
    """Open the bundle's model on `backend` ('auto' = the best that works, logged).

    options: the backend's own settings (runtime.backends.openvino.OpenVINOOptions for 'openvino');
    a BackendError for a backend that takes none.

    allow_engine_fallback (or $EDGEKILN_ALLOW_ENGINE_FALLBACK=1): when backend 'tensorrt-engine'
    cannot run the bundle's engine here, run its ONNX model on the best onnxruntime backend
    instead, with a WARNING saying why. Without it that is a BackendError.
    """
    from runtime.backends import policy  # the policies build on this registry

    if backend == "auto":
        return policy.auto_session(bundle, artifact, intra_op_threads, device_id)
    spec = backend_spec(backend)
    if options is not None:
        if not spec.takes_options:
            raise BackendError(f"backend '{backend}' takes no backend options (got {options!r})")
        sess = spec.make(bundle, artifact=artifact, intra_op_threads=intra_op_threads, device_id=device_id,
                         options=options)
        policy.log.info("edgekiln runtime: %s on backend '%s' (%s)", sess.model_file, backend, sess.provider)
        return sess
    if backend == "tensorrt-engine" and (allow_engine_fallback or policy.engine_fallback_from_env()):
        return policy.engine_or_fallback(bundle, artifact, intra_op_threads, device_id)
    sess = spec.make(bundle, artifact=artifact, intra_op_threads=intra_op_threads, device_id=device_id)
    policy.log.info("edgekiln runtime: %s on backend '%s' (%s)", sess.model_file, backend, sess.provider)
    return sess


def session_for_artifact(bundle: Bundle, key: str, *, backend: str | None = None,
                         intra_op_threads: int | None = None, device_id: int = 0, options: Any = None) -> Session:
    """Open bundle artifact `key` on `backend`, which must be one its bundle.json entry lists in
    `runtimes` (default: the first: 'cpu' for ONNX artifacts, 'tensorrt-engine' for TensorRT engines,
    fingerprint-checked, never a fallback); 'auto' picks the best onnxruntime backend for an ONNX artifact.

    The parity gate, bench, INT8 guard and golden self-test open artifacts here, so what they
    measure is the serving code. intra_op_threads=None keeps onnxruntime's default (one thread
    per physical core); engines ignore it.
    """
    art = bundle.artifact(key)
    if not art.runtimes:  # bundle.json records the backends each artifact runs on (runtime.bundle.DEFAULT_RUNTIMES)
        raise BundleError(f"{bundle.root}: artifact '{key}' has format '{art.format}', which no backend runs "
                          f"(runnable formats: {', '.join(DEFAULT_RUNTIMES)})")
    if backend == "auto" and "cpu" in art.runtimes:  # the best onnxruntime backend for this very artifact
        from runtime.backends import policy

        return policy.auto_session(bundle, key, intra_op_threads, device_id, try_engine=False)
    name = backend or art.runtimes[0]
    if name not in art.runtimes:
        raise BackendError(f"artifact '{key}' ({art.format}) runs on backend {', '.join(art.runtimes)}, "
                           f"not on '{name}'")
    return create_session(name, bundle, artifact=key, intra_op_threads=intra_op_threads, device_id=device_id,
                          options=options)
