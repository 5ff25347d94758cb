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
from typing import Callable, Protocol, runtime_checkable

import numpy as np

from runtime.bundle import Bundle
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


BACKENDS: Registry[BackendSpec] = Registry("backend", BackendError, extra_names=("auto",))


def register_backend(name: str, provider: str, description: str):
    """Decorator: register `make(bundle, artifact, intra_op_threads, device_id) -> Session` as backend `name`."""

    def deco(fn: Callable[..., Session]) -> Callable[..., Session]:
        BACKENDS.add(name, BackendSpec(name, provider, description, fn))
        return fn

    return deco


def backend_names() -> list[str]:
    """Every backend name `create_session` accepts (including `auto`)."""
    return BACKENDS.names()


def backend_spec(name: str) -> BackendSpec:
    return BACKENDS.get(name)


def has_artifact(bundle: Bundle, key: str) -> bool:
    return key in bundle.manifest.artifacts


def create_session(backend: str, bundle: Bundle, artifact: str = "onnx", intra_op_threads: int | None = None,
                   device_id: int = 0, allow_engine_fallback: bool = False) -> Session:
    """Open the bundle's model on `backend` ('auto' = the best that works, logged).

    allow_engine_fallback (or $EDGEKILN_ALLOW_ENGINE_FALLBACK=1): when backend 'tensorrt-engine'
    cannot run the bundle's engine here, run its ONNX model on the best onnxruntime backend
    instead, with a WARNING saying why. Without it that is a BackendError.
    """
    from runtime.backends import policy  # the policies build on this registry

    if backend == "auto":
        return policy.auto_session(bundle, artifact, intra_op_threads, device_id)
    spec = backend_spec(backend)
    if backend == "tensorrt-engine" and (allow_engine_fallback or policy.engine_fallback_from_env()):
        return policy.engine_or_fallback(bundle, artifact, intra_op_threads, device_id)
    sess = spec.make(bundle, artifact=artifact, intra_op_threads=intra_op_threads, device_id=device_id)
    policy.log.info("edgekiln runtime: %s on backend '%s' (%s)", sess.model_file, backend, sess.provider)
    return sess


# The backend each artifact format runs on when the caller names none (ONNX) or always (engines).
_FORMAT_BACKEND = {"onnx": None, "tensorrt": "tensorrt-engine"}


def session_for_artifact(bundle: Bundle, key: str, *, backend: str | None = None,
                         intra_op_threads: int | None = None, device_id: int = 0) -> Session:
    """Open bundle artifact `key` on the backend its format needs: ONNX artifacts on `backend`
    (default 'cpu'), TensorRT engines on 'tensorrt-engine' (fingerprint-checked, never a fallback).

    The parity gate, bench, INT8 guard and golden self-test open artifacts here, so what they
    measure is the serving code. intra_op_threads=None keeps onnxruntime's default (one thread
    per physical core); engines ignore it.
    """
    fmt = bundle.artifact(key).format
    if fmt not in _FORMAT_BACKEND:
        raise BundleError(f"{bundle.root}: artifact '{key}' has format '{fmt}', which no backend runs "
                          f"(runnable formats: {', '.join(_FORMAT_BACKEND)})")
    name = _FORMAT_BACKEND[fmt] or backend or "cpu"
    if fmt == "tensorrt" and backend not in (None, name):
        raise BackendError(f"artifact '{key}' is a TensorRT engine, which only backend '{name}' runs "
                           f"(asked for '{backend}')")
    if fmt == "onnx" and name == "tensorrt-engine":
        raise BackendError(f"artifact '{key}' is an ONNX model; backend 'tensorrt-engine' runs only engines "
                           f"(valid for ONNX: {', '.join(n for n in backend_names() if n != 'tensorrt-engine')})")
    if name == "auto":  # the best onnxruntime backend for this very artifact, never the bundle's engine
        from runtime.backends import policy

        return policy.auto_session(bundle, key, intra_op_threads, device_id, try_engine=False)
    return create_session(name, bundle, artifact=key, intra_op_threads=intra_op_threads, device_id=device_id)
