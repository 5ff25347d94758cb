"""Inference backends: one registry, one factory, no silent fallback.

    session = create_session("cuda", bundle, intra_op_threads=4)
    session = session_for_artifact(bundle, "onnx_int8")     # the backend the artifact's format needs
    sess = open_onnx("student.onnx", intra_op_threads=1)    # an ONNX file outside a bundle

base             the Session protocol, the registry, create_session, session_for_artifact
ort              cpu / cuda / tensorrt (onnxruntime execution providers); open_onnx, onnx_runner
tensorrt_engine  tensorrt-engine: the bundle's native TensorRT engine, fingerprint-checked
openvino         openvino: ONNX or OpenVINO IR on CPU/GPU/NPU/AUTO, f32/bf16/f16 (optional extra)
policy           `auto` and the allowed engine -> ONNX fallback
"""

from runtime.backends.base import (
    BackendSpec, Session, backend_names, backend_spec, create_session, register_backend, session_for_artifact,
)
from runtime.backends.ort import (  # registers cpu, cuda, tensorrt (in this order)
    OPTIMIZATION_LEVELS, Int8KernelsSaturate, IOBindingSession, OrtSession, available_providers, int8_weight_bits,
    onnx_runner, open_onnx, u8s8_saturates,
)
from runtime.backends.tensorrt_engine import (  # registers tensorrt-engine
    EngineUnavailable, TensorRTEngineSession, check_engine_fingerprint, run_in_profile_batches,
)
from runtime.backends.openvino import OpenVINOOptions, OpenVINOSession  # registers openvino (imports it lazily)
from runtime.backends.policy import AUTO_ORDER, ENGINE_FALLBACK_ENV, engine_fallback_from_env

__all__ = [
    "AUTO_ORDER", "ENGINE_FALLBACK_ENV", "OPTIMIZATION_LEVELS", "BackendSpec", "EngineUnavailable",
    "Int8KernelsSaturate", "IOBindingSession", "OpenVINOOptions", "OpenVINOSession", "OrtSession", "Session", "TensorRTEngineSession", "available_providers", "backend_names",
    "backend_spec", "check_engine_fingerprint", "create_session", "engine_fallback_from_env", "onnx_runner",
    "int8_weight_bits", "open_onnx", "register_backend", "run_in_profile_batches", "session_for_artifact",
    "u8s8_saturates",
]
