"""Which backend runs a bundle when the caller leaves a choice: `auto`, and the engine fallback.

`auto` tries the backends best-first and logs the one it chose (and why the others
were skipped): `tensorrt-engine` first when the bundle has an engine, then AUTO_ORDER.

Backend `tensorrt-engine` with the fallback allowed (`allow_engine_fallback=True`,
`edgekiln serve --allow-engine-fallback`, or $EDGEKILN_ALLOW_ENGINE_FALLBACK=1): when
the engine cannot run here (EngineUnavailable), a WARNING names the reason and the
bundle's ONNX model runs on the best onnxruntime backend that starts.
"""

from __future__ import annotations

import logging
import os

from runtime.backends.base import Session, backend_spec, has_artifact
from runtime.backends.ort import available_providers
from runtime.backends.tensorrt_engine import EngineUnavailable, engine_key, is_onnx_key, onnx_key
from runtime.bundle import Bundle
from runtime.errors import BackendError, ConfigError

log = logging.getLogger("edgekiln.runtime")

# `auto` tries these onnxruntime backends in order (after the bundle's engine, when it has one).
AUTO_ORDER = ("tensorrt", "cuda", "cpu")
ENGINE_FALLBACK_ENV = "EDGEKILN_ALLOW_ENGINE_FALLBACK"


def engine_fallback_from_env() -> bool:
    """$EDGEKILN_ALLOW_ENGINE_FALLBACK=1: the same as allow_engine_fallback=True, for containers configured by env."""
    raw = os.environ.get(ENGINE_FALLBACK_ENV, "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise ConfigError(f"${ENGINE_FALLBACK_ENV}={os.environ[ENGINE_FALLBACK_ENV]!r} is not a boolean; use 1 or 0")


def _make(name: str, bundle: Bundle, artifact: str, intra_op_threads: int | None, device_id: int) -> Session:
    return backend_spec(name).make(bundle, artifact=artifact, intra_op_threads=intra_op_threads, device_id=device_id)


def engine_or_fallback(bundle: Bundle, artifact: str, intra_op_threads: int | None, device_id: int) -> Session:
    """Backend 'tensorrt-engine' with the fallback allowed: the engine when it can run here, else the
    bundle's ONNX model on the best onnxruntime backend, with a WARNING naming the reason."""
    key = engine_key(artifact)
    if not has_artifact(bundle, key):
        reason = f"the bundle has no '{key}' artifact"
    else:
        try:
            sess = _make("tensorrt-engine", bundle, key, intra_op_threads, device_id)
        except EngineUnavailable as e:
            reason = e.reason
        else:
            log.info("edgekiln runtime: %s on backend 'tensorrt-engine' (%s)", sess.model_file, sess.provider)
            return sess
    fallback_key = onnx_key(artifact)
    try:
        sess = auto_session(bundle, fallback_key, intra_op_threads, device_id, try_engine=False)
    except BackendError as e:
        raise BackendError(f"backend 'tensorrt-engine': {reason}; and the allowed fallback to the '{fallback_key}' "
                           f"artifact failed too: {e}") from None
    log.warning("edgekiln runtime: backend 'tensorrt-engine' cannot run here: %s. Falling back, as allowed "
                "(allow_engine_fallback), to %s on onnxruntime backend '%s' (%s)",
                reason, sess.model_file, sess.backend, sess.provider)
    return sess


def _auto_engine(bundle: Bundle, artifact: str, intra_op_threads: int | None,
                 device_id: int) -> tuple[Session | None, str]:
    """auto's first try: the bundle's own engine. (session, "") or (None, why it was skipped)."""
    key = engine_key(artifact)
    if artifact != "onnx" and is_onnx_key(artifact):
        why = f"the '{artifact}' artifact was asked for"
        log.info("edgekiln runtime: auto: skipping backend 'tensorrt-engine': %s", why)
        return None, why
    if not has_artifact(bundle, key):
        why = f"bundle has no '{key}' artifact"
        log.info("edgekiln runtime: auto: skipping backend 'tensorrt-engine': %s", why)
        return None, why
    try:
        sess = _make("tensorrt-engine", bundle, key, intra_op_threads, device_id)
    except BackendError as e:
        log.warning("edgekiln runtime: auto: skipping backend 'tensorrt-engine': %s", getattr(e, "reason", e))
        return None, "failed to start"
    log.info("edgekiln runtime: auto chose backend 'tensorrt-engine' (%s) for %s", sess.provider, sess.model_file)
    return sess, ""


def auto_session(bundle: Bundle, artifact: str, intra_op_threads: int | None, device_id: int,
                 try_engine: bool = True) -> Session:
    """Backend 'auto': the bundle's engine (when try_engine and it has one), then AUTO_ORDER; logged."""
    engine_skipped = ""
    if try_engine:
        sess, why = _auto_engine(bundle, artifact, intra_op_threads, device_id)
        if sess is not None:
            return sess
        engine_skipped = f"tensorrt-engine: {why}; "
    artifact = onnx_key(artifact)
    available = available_providers()
    skipped = []
    for name in AUTO_ORDER:
        spec = backend_spec(name)
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
