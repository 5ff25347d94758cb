"""The export and validate sections of the pipeline config (pydantic, validated once at the
edge; pipeline.config assembles them into PipelineConfig). The exporters receive these
sections, never the whole pipeline config."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TensorRTConfig(_Strict):
    """A TensorRT engine built from the FP32 ONNX model (needs tensorrt >= 10 and a CUDA GPU)."""

    enabled: bool = False
    precision: Literal["fp32", "fp16", "int8"] = "fp16"
    min_batch: int = Field(1, ge=1)
    opt_batch: int = Field(8, ge=1)
    max_batch: int = Field(32, ge=1)
    workspace_mb: int = Field(1024, ge=16)

    @model_validator(mode="after")
    def _batches(self) -> "TensorRTConfig":
        if not self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError("min_batch <= opt_batch <= max_batch must hold")
        return self


class OpenVINOConfig(_Strict):
    """OpenVINO IR artifacts (exporters.openvino; needs `pip install 'edgekiln[openvino]'`). Empty: none.
    fp32 IR is always written with any other; bf16 = the FP32 IR run with OpenVINO's bf16 inference
    precision, parity-checked as its own precision (needs a CPU with AVX512-BF16 or AMX)."""

    precisions: list[Literal["fp32", "fp16", "bf16", "int8"]] = Field(
        [], description="OpenVINO artifacts to write: fp32 IR, fp16-compressed IR, bf16 inference, NNCF INT8.")
    int8_method: Literal["accuracy_control", "ptq"] = Field(
        "accuracy_control", description="NNCF: quantize_with_accuracy_control (validation split, the INT8 "
                                         "accuracy budget) or plain quantize.")

    @model_validator(mode="after")
    def _fp32_first(self) -> "OpenVINOConfig":
        if self.precisions and "fp32" not in self.precisions:
            self.precisions = ["fp32", *self.precisions]
        if len(set(self.precisions)) != len(self.precisions):
            raise ValueError("precisions: each precision at most once")
        return self


class ExportConfig(_Strict):
    """What `export` writes into the bundle. FP32 ONNX always; the rest is opt-in."""

    opset: int | None = Field(None, ge=17, le=23, description="None: the architecture spec's opset (exporters.specs).")
    dynamic_batch: bool = True
    simplify: bool = Field(True, description="onnxslim, kept only when outputs stay within the FP32 tolerance.")
    precisions: list[Literal["fp32", "fp16", "int8"]] = Field(
        ["fp32"], description="ONNX artifacts to write; fp32 is always written."
    )
    fp16_keep_io_types: bool = Field(True, description="FP16 model keeps float32 inputs/outputs.")
    calibration_size: int = Field(200, ge=1, description="INT8 calibration images, stratified over classes (train split).")
    calibration_method: Literal["minmax", "entropy", "percentile"] = "minmax"
    max_excluded_nodes: int = Field(16, ge=0, description="INT8 accuracy guard: most nodes it may keep in float.")
    golden_images: int = Field(4, ge=0, le=64, description="Test images stored in the bundle with PyTorch logits.")
    tensorrt: TensorRTConfig = TensorRTConfig()
    openvino: OpenVINOConfig = OpenVINOConfig()

    @model_validator(mode="after")
    def _fp32_always(self) -> "ExportConfig":
        if "fp32" not in self.precisions:
            self.precisions = ["fp32", *self.precisions]
        if len(set(self.precisions)) != len(self.precisions):
            raise ValueError("precisions: each precision at most once")
        return self


class PrecisionThresholds(_Strict):
    """The config's overrides of one precision's parity thresholds (exporters.thresholds.Thresholds,
    same fields); None keeps the architecture spec's default (exporters.specs: FP16 agreement
    >= 99.5%, INT8 accuracy drop <= 1 point)."""

    min_agreement: float | None = Field(None, ge=0, le=1)
    max_abs_logit_diff: float | None = Field(None, gt=0)
    max_accuracy_drop: float | None = Field(None, ge=0, le=1, description="0.01 = 1 accuracy point.")
    max_kl: float | None = Field(None, gt=0)
    min_accuracy: float | None = Field(None, ge=0, le=1)


class ValidateConfig(_Strict):
    """Parity thresholds between PyTorch and each exported artifact, per precision.

    The top-level keys are the FP32 thresholds; `fp16` and `int8` hold theirs. The INT8
    accuracy guard at export uses `int8.max_accuracy_drop` as its budget.
    """

    min_agreement: float = Field(1.0, ge=0, le=1, description="FP32 top-1 agreement required (1.0 = 100%).")
    max_abs_logit_diff: float = Field(1e-3, gt=0, description="FP32 max |Δlogit|.")
    min_accuracy: float | None = Field(None, ge=0, le=1, description="Optional floor on artifact accuracy.")
    fp16: PrecisionThresholds = PrecisionThresholds()
    int8: PrecisionThresholds = PrecisionThresholds()
    bf16: PrecisionThresholds = PrecisionThresholds()
