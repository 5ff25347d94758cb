"""OpenVINO: backend `openvino`, the only module in edgekiln that compiles an OpenVINO model.

    session = create_session("openvino", bundle, artifact="openvino_int8")
    session = create_session("openvino", bundle, options=OpenVINOOptions(device="CPU", precision="f32"))

It runs a bundle's ONNX artifacts and its OpenVINO IR artifacts (model.xml + model.bin, exporters.openvino)
on an explicit device (CPU, GPU, NPU, AUTO) with an explicit inference precision (f32, bf16, f16),
a performance hint (latency, throughput), streams and threads. Unset options come from
$EDGEKILN_OPENVINO_DEVICE / _PRECISION / _HINT / _STREAMS (containers configure by env), then from the
artifact: a `bf16` artifact runs with the bf16 hint, every other one with f32 (OpenVINO's own default
on a CPU with AMX or AVX512-BF16 is bf16, which changes the logits; edgekiln never takes it silently).

Like the onnxruntime backends it never falls back: a device this machine lacks, or a precision the
device cannot run (OpenVINO's CPU plugin quietly runs f32 when asked for bf16 on a CPU without bf16),
is a BackendError listing what is available. The session logs what it actually runs on, read back
from the compiled model (execution devices, inference precision, streams, threads).
"""

from __future__ import annotations

import logging
import os
import queue
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from runtime.backends.base import register_backend
from runtime.bundle import Bundle
from runtime.errors import BackendError, BundleError, ConfigError

log = logging.getLogger("edgekiln.runtime")

DEVICES = ("CPU", "GPU", "NPU", "AUTO")
PRECISIONS = ("f32", "bf16", "f16")
HINTS = ("latency", "throughput")
ENV = "EDGEKILN_OPENVINO_"  # + DEVICE, PRECISION, HINT, STREAMS
# OPTIMIZATION_CAPABILITIES entry a device reports when it can run a precision natively
_CAPABILITY = {"f32": "FP32", "bf16": "BF16", "f16": "FP16"}
# an artifact's precision -> the inference precision it runs with unless told otherwise
_DEFAULT_PRECISION = {"bf16": "bf16"}
INSTALL_HINT = "install it with: pip install 'edgekiln[openvino]'"


@dataclass(frozen=True)
class OpenVINOOptions:
    """How backend `openvino` compiles a model; None = the env var, else the default named."""

    device: str | None = None  # CPU | GPU | GPU.1 | NPU | AUTO (default CPU)
    precision: str | None = None  # f32 | bf16 | f16 (default: the artifact's: bf16 for a bf16 artifact, else f32)
    hint: str | None = None  # latency | throughput (default latency)
    streams: int | None = None  # None: what the hint picks
    threads: int | None = None  # None: intra_op_threads, else OpenVINO's default

    def __post_init__(self) -> None:
        device = (self.device or "").upper()
        if self.device is not None and device.split(".")[0] not in DEVICES:
            raise ConfigError(f"openvino device '{self.device}' is not one of {', '.join(DEVICES)} "
                              "(GPU.1 picks the second GPU)")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise ConfigError(f"openvino precision '{self.precision}' is not one of {', '.join(PRECISIONS)}")
        if self.hint is not None and self.hint not in HINTS:
            raise ConfigError(f"openvino hint '{self.hint}' is not one of {', '.join(HINTS)}")
        for name in ("streams", "threads"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ConfigError(f"openvino {name} must be a positive integer (got {v!r})")
        if self.device is not None:
            object.__setattr__(self, "device", device)

    @classmethod
    def from_env(cls) -> "OpenVINOOptions":
        env = {k: os.environ.get(ENV + k.upper(), "").strip() or None for k in ("device", "precision", "hint", "streams")}
        streams = env.pop("streams")
        if streams is not None and not streams.isdigit():
            raise ConfigError(f"${ENV}STREAMS={streams!r} is not a positive integer")
        return cls(**env, streams=int(streams) if streams else None)

    def over(self, base: "OpenVINOOptions") -> "OpenVINOOptions":
        """These options, `base`'s where these are None."""
        return replace(base, **{k: v for k, v in self.__dict__.items() if v is not None})


def default_precision(artifact_precision: str) -> str:
    """The inference precision an artifact of `artifact_precision` runs with unless told otherwise."""
    return _DEFAULT_PRECISION.get(artifact_precision, "f32")


def supported_precisions(device: str = "CPU") -> list[str]:
    """The inference precisions `device` runs here; [] without openvino or the device."""
    try:
        import openvino
    except ImportError:
        return []
    core = openvino.Core()
    return device_precisions(core, device) if device in available_devices(core) else []


def _openvino() -> Any:
    try:
        import openvino
    except ImportError:
        raise BackendError(f"backend 'openvino' needs the openvino package, which is not installed; {INSTALL_HINT}") from None
    return openvino


def _core() -> Any:
    ov = _openvino()
    return ov.Core()


def available_devices(core: Any | None = None) -> list[str]:
    """OpenVINO's devices on this machine (CPU, GPU.0, NPU, ...)."""
    return list((core or _core()).available_devices)


def device_precisions(core: Any, device: str) -> list[str]:
    """The inference precisions (f32, bf16, f16) `device` reports it can run natively."""
    caps = set(core.get_property(device, "OPTIMIZATION_CAPABILITIES"))
    return [p for p, cap in _CAPABILITY.items() if cap in caps]


def check_device(core: Any, device: str) -> None:
    available = available_devices(core)
    if device == "AUTO":
        return
    base = device.split(".")[0]
    if device not in available and not (device == base and any(d.split(".")[0] == base for d in available)):
        raise BackendError(f"backend 'openvino': device {device} is not available here "
                           f"(available: {', '.join(available + ['AUTO'])})")


def check_precision(core: Any, device: str, precision: str) -> None:
    """BackendError when `device` cannot run `precision` (AUTO: every available device that AUTO may pick)."""
    devices = available_devices(core) if device == "AUTO" else [device]
    for d in devices:
        can = device_precisions(core, d)
        if precision not in can:
            raise BackendError(f"backend 'openvino': {d} ({core.get_property(d, 'FULL_DEVICE_NAME')}) cannot run "
                               f"inference precision {precision} (it runs: {', '.join(can)})")


def _config(ov: Any, opts: OpenVINOOptions) -> dict:
    import openvino.properties as props
    import openvino.properties.hint as hints

    types = {"f32": ov.Type.f32, "bf16": ov.Type.bf16, "f16": ov.Type.f16}
    cfg: dict = {hints.inference_precision: types[opts.precision],
                 hints.performance_mode: getattr(hints.PerformanceMode, opts.hint.upper())}
    if opts.streams:
        cfg[props.num_streams] = opts.streams
    if opts.threads:
        cfg[props.inference_num_threads] = opts.threads
    return cfg


def _runs_on(compiled: Any) -> tuple[str, dict[str, Any]]:
    """What the compiled model actually runs on, read back from it (AUTO resolves here)."""
    import openvino.properties as props
    import openvino.properties.hint as hints

    got: dict[str, Any] = {}
    for name, prop in (("devices", props.execution_devices), ("precision", hints.inference_precision),
                       ("streams", props.num_streams), ("threads", props.inference_num_threads)):
        try:
            got[name] = compiled.get_property(prop)
        except RuntimeError:  # not every device/AUTO reports every property
            got[name] = None
    if got["precision"] is not None:
        got["precision"] = got["precision"].get_type_name()  # f32 | bf16 | f16
    devices = ",".join(got["devices"] or [])
    return devices, got


class OpenVINOSession:
    """A compiled OpenVINO model as a Session: `run(batch) -> logits`, thread-safe (a pool of infer requests)."""

    backend = "openvino"

    def __init__(self, compiled: Any, model_file: str, opts: OpenVINOOptions):
        self.compiled = compiled
        self.model_file = model_file
        self.options = opts
        devices, got = _runs_on(compiled)
        self.runs_on = got
        self.provider = (f"OpenVINO {opts.device}" + (f" ({devices})" if devices and devices != opts.device else "")
                         + f", {got.get('precision') or opts.precision}, {opts.hint}")
        n = max(1, int(got.get("streams") or 1))
        self._requests: queue.Queue = queue.Queue()
        for _ in range(n):
            self._requests.put(compiled.create_infer_request())

    def run(self, batch: np.ndarray) -> np.ndarray:
        req = self._requests.get()
        try:
            req.infer({0: np.ascontiguousarray(batch, dtype=np.float32)})
            return np.array(req.get_output_tensor(0).data, dtype=np.float32, copy=True)
        finally:
            self._requests.put(req)


def resolve_options(options: OpenVINOOptions | None, artifact_precision: str,
                    intra_op_threads: int | None) -> OpenVINOOptions:
    """Explicit options over $EDGEKILN_OPENVINO_*, over the defaults for this artifact."""
    base = OpenVINOOptions(device="CPU", precision=default_precision(artifact_precision),
                           hint="latency", threads=intra_op_threads or None)
    return (options or OpenVINOOptions()).over(OpenVINOOptions.from_env().over(base))


def open_openvino(path: str | os.PathLike, opts: OpenVINOOptions, label: str = "backend 'openvino'") -> OpenVINOSession:
    """An OpenVINOSession on an ONNX or IR (.xml) file, with fully resolved options."""
    ov = _openvino()
    core = ov.Core()
    check_device(core, opts.device)
    check_precision(core, opts.device, opts.precision)
    try:
        compiled = core.compile_model(str(path), opts.device, _config(ov, opts))
    except RuntimeError as e:  # OpenVINO raises RuntimeError for unreadable models and broken devices alike
        msg = next((ln for ln in str(e).splitlines() if ln.strip() and "Exception from" not in ln), str(e))[:300]
        raise BundleError(f"{path}: OpenVINO cannot compile it on {opts.device} ({msg.strip()})") from None
    sess = OpenVINOSession(compiled, os.path.basename(path), opts)
    got = sess.runs_on.get("precision")
    if got is not None and got != opts.precision:
        raise BackendError(f"{label}: asked for inference precision {opts.precision} on {opts.device}, but OpenVINO "
                           f"compiled {got}; use precision {got} or another device")
    log.info("edgekiln runtime: openvino runs %s on %s (inference precision %s, hint %s, streams %s, threads %s)",
             sess.model_file, ",".join(sess.runs_on.get("devices") or [opts.device]), got or opts.precision,
             opts.hint, sess.runs_on.get("streams"), sess.runs_on.get("threads"))
    return sess


@register_backend("openvino", "", "OpenVINO (CPU/GPU/NPU/AUTO; ONNX or OpenVINO IR; f32/bf16/f16 inference)",
                  takes_options=True)
def _openvino_backend(bundle: Bundle, artifact: str = "onnx", intra_op_threads: int | None = None,
                      device_id: int = 0, options: OpenVINOOptions | None = None) -> OpenVINOSession:
    art = bundle.artifact(artifact)
    if art.format not in ("onnx", "openvino"):
        raise BackendError(f"backend 'openvino' runs ONNX and OpenVINO IR artifacts, not '{artifact}' ({art.format})")
    _openvino()  # the missing-package error before anything else
    opts = resolve_options(options, art.precision, intra_op_threads)
    return open_openvino(bundle.path(artifact), opts)
