"""The export and validate sections of the pipeline config (pydantic, validated once at the
edge; pipeline.config assembles them into PipelineConfig). The exporters receive these
sections, never the whole pipeline config."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


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
    """What `export` writes into each candidate's bundle. FP32 ONNX always; by default (precisions
    None) also INT8, and FP16 where a GPU backend is available here (`resolved_precisions`)."""

    opset: int | None = Field(None, ge=17, le=23, description="None: the architecture spec's opset (exporters.specs).")
    dynamic_batch: bool = True
    simplify: bool = Field(True, description="onnxslim, kept only when outputs stay within the FP32 tolerance.")
    precisions: list[Literal["fp32", "fp16", "int8"]] | None = Field(
        None, description="ONNX artifacts to write; fp32 is always written. None: fp32 + int8, + fp16 with a GPU backend."
    )
    fp16_keep_io_types: bool = Field(True, description="FP16 model keeps float32 inputs/outputs.")
    calibration_size: int = Field(200, ge=1, description="INT8 calibration images, stratified over classes (train split).")
    calibration_method: Literal["minmax", "entropy", "percentile"] = "minmax"
    max_excluded_nodes: int = Field(16, ge=0, description="INT8 accuracy guard: most nodes it may keep in float.")
    int8_reduce_range: bool = Field(
        True, description="INT8 weights in 7 bits: no integer saturation on x86 CPUs without VNNI (onnxruntime's "
                          "advice); false: 8-bit weights, for VNNI or ARM targets only.")
    int8_bias_correction: bool = Field(
        True, description="INT8: subtract the output shift each node's rounded weights cause, measured on the "
                          "calibration images (kept when the INT8 logits on the validation images get closer to "
                          "the FP32 model's).")
    int8_rounding: Literal["auto", "adaptive", "nearest"] = Field(
        "auto", description="INT8 convolution weights: adaptive rounds each weight up or down so that every "
                            "node's output on the calibration images stays closest to the float model's "
                            "(AdaRound; minutes on a CPU), kept when the INT8 logits on the validation images "
                            "get closer to the FP32 model's; auto does so unless every validation image already "
                            "gets the FP32 model's answer; nearest: onnxruntime's rounding only.")
    golden_images: int = Field(4, ge=0, le=64, description="Test images stored in the bundle with PyTorch logits.")
    tensorrt: TensorRTConfig = TensorRTConfig()
    openvino: OpenVINOConfig = OpenVINOConfig()

    @model_validator(mode="after")
    def _fp32_always(self) -> "ExportConfig":
        if self.precisions is None:
            return self
        if "fp32" not in self.precisions:
            self.precisions = ["fp32", *self.precisions]
        if len(set(self.precisions)) != len(self.precisions):
            raise ValueError("precisions: each precision at most once")
        return self


def gpu_backend_available() -> bool:
    """Whether onnxruntime can run on a GPU here (CUDA or TensorRT execution provider)."""
    from runtime.backends import available_providers

    return bool({"CUDAExecutionProvider", "TensorrtExecutionProvider"} & set(available_providers()))


def resolved_precisions(settings: ExportConfig) -> list[str]:
    """The precisions an export writes: the configured ones, or by default fp32 + int8 (+ fp16 with a GPU)."""
    if settings.precisions is not None:
        return list(settings.precisions)
    return ["fp32", "int8"] + (["fp16"] if gpu_backend_available() else [])


class DeployConfig(_Strict):
    """Which candidate ships: every exported artifact of every candidate model, on every runtime
    backend available here, is measured on this machine (accuracy, agreement, size, latency p50 at
    batch 1, throughput at `batch`); those that passed their parity gates and meet every budget
    are ranked by `objective`, and the best becomes the bundle's default artifact."""

    max_latency_ms: float | None = Field(None, gt=0, description="Budget: latency p50 at batch 1, on this machine.")
    max_size_mb: float | None = Field(None, gt=0, description="Budget: model file size (MB).")
    min_accuracy: float | None = Field(None, ge=0, le=1, description="Budget: test accuracy of the artifact.")
    min_ood_auroc: float | None = Field(
        None, ge=0, le=1, description="Budget: AUROC of the model's OOD score, test split vs data.ood's images "
                                      "(exporters.trust; needs data.ood).")
    objective: Literal["latency", "size", "accuracy"] = Field(
        "latency", description="What the choice minimises (latency, size) or maximises (accuracy) within budgets.")
    metric: Literal["accuracy", "macro_f1"] | None = Field(
        None, description="The quality figure the choice maximises (objective accuracy) and breaks ties and draws "
                          "the Pareto front with: accuracy, or macro_f1 (every class weighs the same; for "
                          "imbalanced data). None: data.select_metric.")
    batch: int = Field(16, ge=1, le=1024, description="Batch size of the throughput measurement.")
    latency_rounds: int = Field(30, ge=5, le=10_000, description="Timed batch-1 runs per candidate (median kept).")
    threads: int | None = Field(None, ge=1, description="onnxruntime intra-op threads while timing (None: its default).")


class OODConfig(_Strict):
    """The "unknown" answer: an out-of-distribution score from the logits and a threshold chosen on the
    validation split (exporters.trust); the runtime answers `unknown_label` below it."""

    enabled: bool = Field(True, description="Off: the bundle gets no OOD section and never answers unknown.")
    score: Literal["energy", "max_logit"] = Field("energy", description="energy = logsumexp(logits); max_logit.")
    target_recall: float = Field(0.95, gt=0, lt=1, description="Share of in-distribution images that stay known.")
    confidence: float | None = Field(
        0.8, gt=0, lt=1, description="Keep target_recall of in-distribution images known with this confidence: a "
        "lower tolerance bound from every validation score (exporters.trust.fit_threshold). null: the empirical "
        "quantile of the validation scores, which rests on one or two of them (a 14-image validation split then "
        "called 6 of 18 test images unknown).")
    unknown_label: str = Field("unknown", min_length=1, description="The label of an unknown answer.")


class TrustConfig(_Strict):
    """Calibrated probabilities and the "unknown" answer, fitted per exported model on the validation
    split and written into bundle.json's `trust` section, which the runtime applies (runtime.trust)."""

    calibration: Literal["temperature", "vector", "none"] = Field(
        "temperature", description="temperature: one temperature fitted on the validation NLL; vector: a scale and "
                                   "a bias per class (may change the best class); none: raw softmax.")
    vector_l2: float = Field(0.01, ge=0, description="vector: L2 pull of scale and bias towards the temperature fit.")
    bins: int = Field(15, ge=2, le=100, description="Confidence bins of the expected calibration error.")
    ood: OODConfig = OODConfig()


class PrecisionThresholds(_Strict):
    """The config's overrides of one precision's parity thresholds (exporters.thresholds.Thresholds,
    same fields); None keeps the architecture spec's default (exporters.specs: FP16 agreement
    >= 99.5%, INT8 accuracy drop <= 1 point and agreement >= 75%)."""

    min_agreement: float | None = Field(None, ge=0, le=1)
    max_abs_logit_diff: float | None = Field(None, gt=0)
    max_accuracy_drop: float | None = Field(None, ge=0, le=1, description="0.01 = 1 accuracy point.")
    max_kl: float | None = Field(None, gt=0)
    min_accuracy: float | None = Field(None, ge=0, le=1)
    min_decision_agreement: float | None = Field(None, ge=0, le=1, description="Same answer (label or unknown).")
    max_abs_prob_diff: float | None = Field(None, gt=0, description="Max |Δ calibrated probability|.")
    max_abs_score_diff: float | None = Field(None, gt=0, description="Max |Δ OOD score|.")


class ValidateConfig(_Strict):
    """Parity thresholds between PyTorch and each exported artifact, per precision.

    The top-level keys are the FP32 thresholds; `fp16` and `int8` hold theirs. The INT8
    accuracy guard at export uses `int8.max_accuracy_drop` as its budget.

    An accuracy drop fails only when the data show it is over the budget: the lower bound of its
    paired 95% confidence interval on the test split is above `max_accuracy_drop` (exporters.stats),
    so one flipped image in 40 does not fail a build and a true 2-point drop over 2,000 images does.
    Top-1 agreement needs no labels: it is measured on the test split plus an agreement set (the
    validation images, `agreement_views` seeded augmented views of every held-out image, and every
    image under `unlabeled`; exporters.agreement).
    """

    min_agreement: float = Field(1.0, ge=0, le=1, description="FP32 top-1 agreement required (1.0 = 100%).")
    max_abs_logit_diff: float = Field(1e-3, gt=0, description="FP32 max |Δlogit|.")
    min_accuracy: float | None = Field(None, ge=0, le=1, description="Optional floor on artifact accuracy.")
    min_decision_agreement: float | None = Field(
        None, ge=0, le=1, description="FP32: the same answer (label, or unknown) as PyTorch; None: the spec's (100%).")
    max_abs_prob_diff: float | None = Field(None, gt=0, description="FP32 max |Δ calibrated probability| (spec: 1e-4).")
    max_abs_score_diff: float | None = Field(None, gt=0, description="FP32 max |Δ OOD score| (spec: 1e-4).")
    agreement_views: int = Field(1, ge=0, le=16, description="Augmented views of each held-out image in the agreement set.")
    unlabeled: Path | None = Field(None, description="A folder of unlabeled images, added to the agreement set.")
    fp16: PrecisionThresholds = PrecisionThresholds()
    int8: PrecisionThresholds = PrecisionThresholds()
    bf16: PrecisionThresholds = PrecisionThresholds()

    @field_validator("unlabeled")
    @classmethod
    def _folder(cls, v: Path | None) -> Path | None:
        if v is not None and not Path(v).is_dir():
            raise ValueError(f"{v} is not a folder of images")
        return v
