"""Which backend runs a bundle when the caller leaves a choice: `auto`, and the engine fallback.

`auto` tries the backends best-first and logs the one it chose (and why the others
were skipped): `tensorrt-engine` first when the bundle has an engine, then AUTO_ORDER. On the
CPU, when the bundle also has the OpenVINO IR of the same precision (exporters.openvino) and both
passed the parity gate, it times onnxruntime and OpenVINO on one image and takes the faster,
logging both times (`cpu_by_speed`).

Backend `tensorrt-engine` with the fallback allowed (`allow_engine_fallback=True`,
`edgekiln serve --allow-engine-fallback`, or $EDGEKILN_ALLOW_ENGINE_FALLBACK=1): when
the engine cannot run here (EngineUnavailable), a WARNING names the reason and the
bundle's ONNX model runs on the best onnxruntime backend that starts.
"""

from __future__ import annotations

import logging
import os

from runtime.backends.base import Session, backend_spec, has_artifact
from runtime.backends.ort import Int8KernelsSaturate, available_providers
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
            if name == "cpu":
                return cpu_by_speed(bundle, artifact, intra_op_threads, skipped)
            sess = spec.make(bundle, artifact=artifact, intra_op_threads=intra_op_threads, device_id=device_id)
        except BackendError as e:
            log.warning("edgekiln runtime: auto: skipping backend '%s': %s", name, e)
            skipped.append(f"{name}: {e}" if isinstance(e, Int8KernelsSaturate) else f"{name}: failed to start")
            continue
        log.info("edgekiln runtime: auto chose backend '%s' (%s) for %s%s", name, sess.provider,
                 sess.model_file, f"; skipped {'; '.join(skipped)}" if skipped else "")
        return sess
    raise BackendError(f"backend 'auto': no backend could start ({engine_skipped}{'; '.join(skipped)})")


# the OpenVINO IR artifact that is the same model at the same precision as an ONNX artifact
OPENVINO_TWIN = {"onnx": "openvino", "onnx_fp16": "openvino_fp16", "onnx_int8": "openvino_int8"}


def _passed(bundle: Bundle, key: str) -> bool:
    parity = bundle.manifest.artifacts[key].parity
    return bool(parity and parity.get("passed"))


def _median_ms(sess: Session, x, runs: int = 10) -> float:
    import time

    import numpy as np

    for _ in range(3):
        sess.run(x)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(x)
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1e3


def cpu_by_speed(bundle: Bundle, artifact: str, intra_op_threads: int | None, skipped: list[str]) -> Session:
    """auto on the CPU: onnxruntime on `artifact`, or OpenVINO on its IR twin when that passed parity (as
    `artifact` did) and is faster here, timed at batch 1 on this machine; logs the times and the reason."""
    import numpy as np

    twin = OPENVINO_TWIN.get(artifact)
    try:
        cpu = backend_spec("cpu").make(bundle, artifact=artifact, intra_op_threads=intra_op_threads)
    except Int8KernelsSaturate as e:  # the INT8 twin OpenVINO quantized itself, when it passed parity
        if twin is None or not has_artifact(bundle, twin) or not _passed(bundle, twin):
            raise
        try:
            ov = backend_spec("openvino").make(bundle, artifact=twin, intra_op_threads=intra_op_threads)
        except BackendError:
            raise e from None  # the reason auto needs to name is the saturation, not the twin's
        log.warning("edgekiln runtime: auto chose backend 'openvino' (%s, %s), which passed parity: %s%s", ov.provider,
                    ov.model_file, e, f"; skipped {'; '.join(skipped)}" if skipped else "")
        return ov
    why = ""
    if twin is None or not has_artifact(bundle, twin):
        why = f"the bundle has no OpenVINO twin of '{artifact}'"
    elif not (_passed(bundle, artifact) and _passed(bundle, twin)):
        why = f"'{artifact}' and '{twin}' have not both passed the parity gate"
    else:
        try:
            ov = backend_spec("openvino").make(bundle, artifact=twin, intra_op_threads=intra_op_threads)
        except BackendError as e:
            why = f"openvino cannot run '{twin}' here ({e})"
        else:
            x = np.zeros((1, 3, *bundle.preprocess.hw), np.float32)
            t_cpu, t_ov = _median_ms(cpu, x), _median_ms(ov, x)
            best, other = (ov, cpu) if t_ov < t_cpu else (cpu, ov)
            log.info("edgekiln runtime: auto chose backend '%s' (%s, %s): fastest here of the backends whose "
                     "artifact passed parity (openvino %s %.2f ms vs cpu %s %.2f ms at batch 1)%s", best.backend,
                     best.provider, best.model_file, ov.model_file, t_ov, cpu.model_file, t_cpu,
                     f"; skipped {'; '.join(skipped)}" if skipped else "")
            return best
    log.info("edgekiln runtime: auto chose backend 'cpu' (%s) for %s (%s)%s", cpu.provider, cpu.model_file, why,
             f"; skipped {'; '.join(skipped)}" if skipped else "")
    return cpu
