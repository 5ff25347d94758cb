"""The artifact-builder registry: one builder per bundle artifact, keyed by its name in
bundle.json's "artifacts".

    onnx        model.onnx        fp32   (always; the others are built from it)
    onnx_fp16   model.fp16.onnx   fp16   (export.precisions)
    onnx_int8   model.int8.onnx   int8   (export.precisions; QDQ, accuracy-guarded)
    tensorrt    model.plan        fp32|fp16|int8 (export.tensorrt.enabled; fingerprinted)
    openvino*   model*.xml        fp32|fp16|bf16|int8 (export.openvino.precisions; exporters.openvino)

A builder is a function `build(ctx: BuildContext) -> runtime.bundle.Artifact` that writes its
file into `ctx.out_dir`; `register_builder` adds it with its file name, when the export settings
want it, and whether it needs the calibration set. Adding an artifact (OpenVINO, say) is one
registered function; exporters.bundle.build_bundle builds whatever is registered and wanted,
in registration order.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from exporters.calibration import CalibrationSet, ImageSource
from exporters.config import ExportConfig, ValidateConfig, resolved_precisions
from exporters.errors import BuilderError
from exporters.resources import release_freed_memory
from exporters.specs import ExportSpec
from exporters.thresholds import resolve_thresholds
from runtime.backends import u8s8_saturates
from runtime.bundle import Artifact, Trust
from runtime.preprocess import PreprocessSpec, preprocess
from runtime.registry import Registry

log = logging.getLogger("edgekiln")


@dataclass(frozen=True)
class BuildContext:
    """What every builder gets: the checkpoint, the FP32 ONNX model, the bundle being built,
    the calibration set, the export settings and the architecture's export spec."""

    model: Any  # the checkpoint's torch.nn.Module, in eval mode
    arch: str
    preprocess: PreprocessSpec
    role: str
    out_dir: Path  # the temporary bundle directory
    fp32_onnx: Path  # the FP32 ONNX model (written by the 'onnx' builder, first)
    settings: ExportConfig
    validate: ValidateConfig
    spec: type[ExportSpec]
    check_images: list[Path]  # a few test images: the FP32 simplification check
    guard_images: list[Path]  # labeled validation images: the INT8 accuracy guard
    guard_labels: list[int]
    cache_dir: Path  # TensorRT timing and calibration caches, kept across exports
    calibration: CalibrationSet | None = None
    trust: Trust | None = None  # bundle.json's trust section: the INT8 guard judges decisions through it

    def guard_set(self) -> tuple[np.ndarray, np.ndarray]:
        return preprocess(self.guard_images, self.preprocess), np.asarray(self.guard_labels)


@dataclass(frozen=True)
class BuilderSpec:
    name: str  # the artifact's key in bundle.json
    file: str  # its file name in the bundle
    build: Callable[[BuildContext], Artifact]
    wanted: Callable[[ExportConfig], bool]
    needs_calibration: Callable[[ExportConfig], bool] = field(default=lambda s: False)


BUILDERS: Registry[BuilderSpec] = Registry("artifact builder", BuilderError)


def register_builder(name: str, file: str, wanted: Callable[[ExportConfig], bool],
                     needs_calibration: Callable[[ExportConfig], bool] = lambda s: False):
    """Decorator: register `build(ctx) -> Artifact` as the builder of artifact `name`; a duplicate name raises."""

    def deco(fn: Callable[[BuildContext], Artifact]) -> Callable[[BuildContext], Artifact]:
        BUILDERS.add(name, BuilderSpec(name, file, fn, wanted, needs_calibration))
        return fn

    return deco


def builder_names() -> list[str]:
    return BUILDERS.names()


def get_builder(name: str) -> BuilderSpec:
    return BUILDERS.get(name)


def wanted_builders(settings: ExportConfig) -> list[BuilderSpec]:
    """The builders these export settings ask for (default precisions resolved for this machine),
    in registration order ('onnx' first)."""
    settings = settings.model_copy(update={"precisions": resolved_precisions(settings)})
    return [b for b in BUILDERS.values() if b.wanted(settings)]


# --------------------------------------------------------------------------- the builders


@register_builder("onnx", "model.onnx", wanted=lambda s: True)
def build_onnx(ctx: BuildContext) -> Artifact:
    """FP32 ONNX with a dynamic batch axis, simplified only when outputs stay within the FP32 tolerance."""
    from exporters.onnx_export import export_onnx, simplify_onnx

    export_onnx(ctx.model, ctx.preprocess.crop, ctx.fp32_onnx, ctx.settings.opset, ctx.settings.dynamic_batch, ctx.spec)
    release_freed_memory()  # the exporter's graphs are garbage now; hand their pages back before INT8 starts
    simplified = None
    if ctx.settings.simplify:
        check_x = preprocess(ctx.check_images, ctx.preprocess)
        simplified = simplify_onnx(ctx.fp32_onnx, check_x, atol=ctx.validate.max_abs_logit_diff / 10)
    return Artifact(file=ctx.fp32_onnx.name, format="onnx", precision="fp32", details={"simplify": simplified})


@register_builder("onnx_fp16", "model.fp16.onnx", wanted=lambda s: "fp16" in s.precisions)
def build_onnx_fp16(ctx: BuildContext) -> Artifact:
    from exporters.fp16 import convert_fp16

    file = get_builder("onnx_fp16").file
    info = convert_fp16(ctx.fp32_onnx, ctx.out_dir / file, keep_io_types=ctx.settings.fp16_keep_io_types)
    return Artifact(file=file, format="onnx", precision="fp16", details=info)


@register_builder("onnx_int8", "model.int8.onnx", wanted=lambda s: "int8" in s.precisions,
                  needs_calibration=lambda s: "int8" in s.precisions)
def build_onnx_int8(ctx: BuildContext) -> Artifact:
    """onnxruntime static QDQ quantization, accuracy-guarded on the validation split (exporters.quantize)."""
    from exporters.quantize import quantize_int8

    s, calib, file = ctx.settings, ctx.calibration, get_builder("onnx_int8").file
    thresholds = resolve_thresholds(ctx.validate, "int8", ctx.spec)
    budget = thresholds.max_accuracy_drop
    if not s.int8_reduce_range and u8s8_saturates():
        log.warning("int8: 8-bit weights (export.int8_reduce_range: false) on this x86 CPU without VNNI, whose "
                    "integer kernels saturate them: the guard measures them saturated, and the parity gate cannot "
                    "check the artifact on the cpu backend here")
    log.info("int8: calibrating on %d train images (%s per class: %s)", len(calib.files), s.calibration_method,
             ", ".join(f"{k}={v}" for k, v in calib.per_class.items()))
    # Both image sets stream: decoded and preprocessed a batch at a time (exporters.calibration.ImageSource).
    res = quantize_int8(ctx.fp32_onnx, ctx.out_dir / file, calib.source(),
                        ImageSource(ctx.guard_images, ctx.preprocess), np.asarray(ctx.guard_labels),
                        max_accuracy_drop=budget if budget is not None else 1.0, method=s.calibration_method,
                        per_channel=ctx.spec.int8_per_channel, max_excluded_nodes=s.max_excluded_nodes,
                        op_types_to_keep_float=ctx.spec.int8_keep_float_op_types,
                        op_types_to_quantize=ctx.spec.int8_op_types, reduce_range=s.int8_reduce_range,
                        # The parity gate's decision floor, held on the validation split (the gate judges
                        # decisions only with a trust section, so the guard does too).
                        min_decision_agreement=thresholds.min_decision_agreement if ctx.trust else None,
                        trust=ctx.trust, bias_correction=s.int8_bias_correction, rounding=s.int8_rounding)
    if not res.budget_met:
        missed = []
        if res.drop_stats.get("low", 0.0) > res.budget + 1e-12:
            missed.append(f"accuracy drop {res.accuracy_drop * 100:.2f} points over the budget {res.budget * 100:.2f}")
        if res.decision_interval is not None and res.decision_interval[1] < res.min_decision_agreement - 1e-12:
            missed.append(f"decisions agree {res.decision_agreement:.2%} < {res.min_decision_agreement:.0%}")
        log.warning("int8: %s on the validation split whatever the guard keeps in float (up to %d nodes); the fully "
                    "quantized model is kept and the parity gate will judge it on the test split",
                    " and ".join(missed), s.max_excluded_nodes)
    quantization = {
        "tool": "onnxruntime.quantization.quantize_static", "format": "QDQ",
        "op_types": list(ctx.spec.int8_op_types) if ctx.spec.int8_op_types else "all",
        "weights": ("int8" + (" (7-bit range)" if s.int8_reduce_range else "")
                    + (", per-channel" if ctx.spec.int8_per_channel else ", per-tensor")), "activations": "uint8",
        # read by the runtime's cpu backend, which refuses 8-bit weights where its kernels saturate them
        "weight_bits": 7 if s.int8_reduce_range else 8,
        "calibration": {**calib.summary(), "method": s.calibration_method},
        "guard": {"split": "val", **res.to_dict()},
    }
    return Artifact(file=file, format="onnx", precision="int8", details={"quantization": quantization})


@register_builder("tensorrt", "model.plan", wanted=lambda s: s.tensorrt.enabled,
                  needs_calibration=lambda s: s.tensorrt.enabled and s.tensorrt.precision == "int8")
def build_tensorrt(ctx: BuildContext) -> Artifact:
    """A TensorRT engine from the FP32 ONNX model, fingerprinted to this GPU (exporters.tensorrt)."""
    from exporters.tensorrt import EngineSettings, build_engine

    t, file = ctx.settings.tensorrt, get_builder("tensorrt").file
    ctx.cache_dir.mkdir(parents=True, exist_ok=True)
    info = build_engine(ctx.fp32_onnx, ctx.out_dir / file, ctx.spec.input_name(),
                        (3, *ctx.preprocess.hw),
                        EngineSettings(t.precision, t.min_batch, t.opt_batch, t.max_batch, t.workspace_mb),
                        calibration=ctx.calibration.images if ctx.calibration else None,
                        timing_cache_path=ctx.cache_dir / "timing.cache",
                        calibration_cache_path=ctx.cache_dir / f"{ctx.role}.calib")
    precision, fingerprint = info.pop("precision"), info.pop("fingerprint")
    return Artifact(file=file, format="tensorrt", precision=precision, fingerprint=fingerprint, details=info)


import exporters.openvino  # noqa: E402,F401  registers the OpenVINO builders, after the ONNX ones they build from
