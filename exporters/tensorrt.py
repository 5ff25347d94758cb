"""TensorRT engines from the bundle's ONNX model, written against the TensorRT 10
Python API. Every call below is named as NVIDIA documents it; references:

  [PY]  Python API guide, "The Build Phase" / "Deserializing a Plan" / "Performing Inference":
        https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/python-api-docs.html
  [BLD] tensorrt.Builder / NetworkDefinitionCreationFlag:
        https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/Builder.html
  [CFG] tensorrt.IBuilderConfig (set_memory_pool_limit, set_flag, add_optimization_profile,
        create_timing_cache / set_timing_cache / get_timing_cache, int8_calibrator):
        https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/BuilderConfig.html
  [CAL] tensorrt.IInt8EntropyCalibrator2 (get_batch_size, get_batch, read_calibration_cache,
        write_calibration_cache):
        https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Int8/EntropyCalibrator2.html
  [ENG] tensorrt.ICudaEngine / IExecutionContext (set_input_shape, set_tensor_address,
        execute_async_v3):
        https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/ExecutionContext.html

Notes for TensorRT 10:
  * Explicit batch is the only mode: `create_network(0)`; the EXPLICIT_BATCH flag is
    deprecated and ignored [BLD]. The batch range comes from one optimization profile
    (min/opt/max) on the input [PY "Dynamic Shapes"].
  * `build_serialized_network` returns an IHostMemory plan (None on failure) [PY].
  * Implicit INT8 calibration (`int8_calibrator`) is deprecated in TensorRT 10 in favour of
    explicit Q/DQ models but still supported; edgekiln uses it so the engine is calibrated
    on the same class-stratified subset as the ONNX INT8 model. (The ONNX INT8 QDQ model
    itself can also be built directly, with BuilderFlag.INT8 and no calibrator.)
  * Engines are specific to the TensorRT version and the GPU's compute capability, so the
    bundle records a fingerprint and the runtime refuses an engine that does not match.
  * TensorRT 11 removed implicit INT8 calibration and BuilderFlag.FP16/INT8 (networks are
    always strongly typed there), so only major version 10 is accepted.

Device memory comes from torch (a training-side dependency already), so no
pycuda / cuda-python is needed.

Where `tensorrt` does not import, `require_tensorrt()` raises TensorRTUnavailable
with a one-line install hint; the CLI prints it and exits 1.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from exporters.errors import TensorRTBuildError, TensorRTUnavailable
from runtime.gpu_info import engine_fingerprint, fingerprint_mismatch  # noqa: F401  (one comparison, exporter and runtime)

log = logging.getLogger("edgekiln")

INSTALL_HINT = (
    "the 'tensorrt' target needs NVIDIA TensorRT 10 and a CUDA GPU: "
    "pip install 'tensorrt>=10,<11' (Linux x86_64/aarch64 with an NVIDIA driver), then re-run the export"
)


def require_tensorrt():
    """Import tensorrt 10.x or raise TensorRTUnavailable with the install hint."""
    try:
        import tensorrt as trt
    except ImportError:
        raise TensorRTUnavailable(INSTALL_HINT) from None
    major = int(str(trt.__version__).split(".")[0])
    # < 10 lacks the name-based IO API used here; 11 removed int8_calibrator, set_calibration_profile and
    # BuilderFlag.FP16/INT8, so build_engine would fail with an AttributeError mid-build.
    if major != 10:
        raise TensorRTUnavailable(f"{INSTALL_HINT} (found tensorrt {trt.__version__})")
    return trt


def tensorrt_available() -> tuple[bool, str]:
    """(True, "") when engines can be built here, else (False, why) — for pytest skip reasons."""
    try:
        require_tensorrt()
        _cuda_device()
    except TensorRTUnavailable as e:
        return False, str(e)
    return True, ""


def _cuda_device():
    try:
        import torch
    except ImportError:
        raise TensorRTUnavailable("the 'tensorrt' target needs torch with CUDA for device buffers (pip install torch)") from None
    if not torch.cuda.is_available():
        raise TensorRTUnavailable("the 'tensorrt' target needs a CUDA GPU; torch.cuda.is_available() is False here")
    return torch


def gpu_fingerprint() -> dict[str, Any]:
    """What an engine is tied to: TensorRT version, GPU name and compute capability, read from
    the CUDA driver by the same function the runtime checks engines with, so the two always agree."""
    trt = require_tensorrt()
    fingerprint = engine_fingerprint(str(trt.__version__), 0)
    if fingerprint is None:
        raise TensorRTUnavailable("the 'tensorrt' target needs a CUDA GPU; the CUDA driver reports none here")
    return fingerprint


@dataclass(frozen=True)
class EngineSettings:
    precision: str = "fp16"  # fp32 | fp16 | int8
    min_batch: int = 1
    opt_batch: int = 8
    max_batch: int = 32
    workspace_mb: int = 1024


class EntropyCalibrator:
    """Factory for an IInt8EntropyCalibrator2 subclass over a float32 NCHW array, with a cache file.

    Defined lazily because the base class only exists where tensorrt imports.
    """

    def __new__(cls, images: np.ndarray, batch_size: int, cache_path: Path):
        trt = require_tensorrt()
        torch = _cuda_device()

        class _Calibrator(trt.IInt8EntropyCalibrator2):
            def __init__(self):
                # [CAL]: a Python calibrator must call the base constructor explicitly.
                trt.IInt8EntropyCalibrator2.__init__(self)
                self.images = images
                self.batch_size = batch_size
                self.cache_path = Path(cache_path)
                self.pos = 0
                self.device = torch.empty((batch_size, *images.shape[1:]), dtype=torch.float32, device="cuda")

            def get_batch_size(self) -> int:  # [CAL]
                return self.batch_size

            def get_batch(self, names):  # [CAL]: list of device pointers, or None when exhausted
                if self.pos + self.batch_size > len(self.images):
                    return None
                chunk = self.images[self.pos : self.pos + self.batch_size]
                self.pos += self.batch_size
                self.device.copy_(torch.from_numpy(np.ascontiguousarray(chunk)))
                torch.cuda.synchronize()
                return [int(self.device.data_ptr())]

            def read_calibration_cache(self):  # [CAL]: bytes, or None to calibrate
                return self.cache_path.read_bytes() if self.cache_path.is_file() else None

            def write_calibration_cache(self, cache) -> None:  # [CAL]
                self.cache_path.write_bytes(bytes(cache))

        return _Calibrator()


def build_engine(
    onnx_path: Path,
    engine_path: Path,
    input_name: str,
    input_shape_chw: tuple[int, int, int],
    settings: EngineSettings,
    calibration: np.ndarray | None = None,
    timing_cache_path: Path | None = None,
    calibration_cache_path: Path | None = None,
) -> dict[str, Any]:
    """Build and serialize an engine for `onnx_path`; return bundle.json's artifact entry extras."""
    trt = require_tensorrt()
    _cuda_device()
    if settings.precision not in ("fp32", "fp16", "int8"):
        raise TensorRTBuildError(f"tensorrt precision '{settings.precision}' is not one of fp32, fp16, int8")
    if not settings.min_batch <= settings.opt_batch <= settings.max_batch:
        raise TensorRTBuildError("tensorrt batch sizes must satisfy min_batch <= opt_batch <= max_batch")
    if settings.precision == "int8" and (calibration is None or len(calibration) < settings.opt_batch):
        raise TensorRTBuildError("tensorrt int8 needs at least opt_batch calibration images")

    logger = trt.Logger(trt.Logger.WARNING)  # [PY]
    builder = trt.Builder(logger)  # [BLD]
    network = builder.create_network(0)  # [BLD]: explicit batch is implied in TensorRT 10
    parser = trt.OnnxParser(network, logger)  # [PY]
    if not parser.parse_from_file(str(onnx_path)):  # [PY]
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise TensorRTBuildError(f"TensorRT's ONNX parser rejected {onnx_path.name}: {errors}")

    config = builder.create_builder_config()  # [PY]
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_mb << 20)  # [CFG]

    profile = builder.create_optimization_profile()  # [PY "Dynamic Shapes"]
    c, h, w = input_shape_chw
    profile.set_shape(input_name, (settings.min_batch, c, h, w), (settings.opt_batch, c, h, w),
                      (settings.max_batch, c, h, w))
    config.add_optimization_profile(profile)  # [CFG]

    if settings.precision == "fp32":
        # TF32 is on by default on Ampere and later; it would cost FP32 parity (|Δlogit| ~1e-3) [CFG].
        config.clear_flag(trt.BuilderFlag.TF32)
    if settings.precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)  # [CFG]: FP16 kernels allowed (INT8 engines fall back to FP16)
    if settings.precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)  # [CFG]
        calib_cache = calibration_cache_path or engine_path.with_suffix(".calib")
        # Hold the calibrator in a local: the builder does not keep the Python object alive by itself.
        calibrator = EntropyCalibrator(calibration, settings.opt_batch, calib_cache)
        config.int8_calibrator = calibrator  # [CFG] (deprecated in 10, still supported)
        config.set_calibration_profile(profile)  # [CFG]: calibrate with the same shapes

    # Timing cache: layer timings reused across builds on the same GPU make rebuilds fast [CFG].
    blob = timing_cache_path.read_bytes() if timing_cache_path and timing_cache_path.is_file() else b""
    cache = config.create_timing_cache(blob)  # [CFG]
    config.set_timing_cache(cache, ignore_mismatch=False)  # [CFG]

    plan = builder.build_serialized_network(network, config)  # [PY]: IHostMemory or None
    if plan is None:
        raise TensorRTBuildError(f"TensorRT could not build an engine from {onnx_path.name} (see the log above)")
    engine_path.write_bytes(bytes(plan))
    if timing_cache_path:
        timing_cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))  # [CFG]
    return {
        "precision": settings.precision,
        "profile": {"min": settings.min_batch, "opt": settings.opt_batch, "max": settings.max_batch},
        "workspace_mb": settings.workspace_mb,
        "fingerprint": gpu_fingerprint(),
    }
