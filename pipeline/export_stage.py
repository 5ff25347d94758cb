"""The export and validate stages: load the checkpoint, compute its PyTorch reference logits,
hand both to the exporters (exporters.bundle.build_bundle / check_bundle), and record the
result in the run's metrics.json. Everything about artifacts, golden images, bundle.json and
the parity gate lives in exporters/.

    result = run_export(cfg, role="teacher", out=Path("/tmp/teacher-bundle"))   # an ExportResult
    gate = run_validate(cfg)          # exporters.parity.GateResult; gate.passed, gate.failures
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import nn

from exporters.parity import GateResult
from pipeline.checkpoint import load_checkpoint
from pipeline.config import PipelineConfig
from pipeline.data import Split, load_tensors
from pipeline.errors import EdgekilnError
from pipeline.rundir import load_split

if TYPE_CHECKING:
    from pipeline.adapt_stage import AdaptResult
    from pipeline.distill_stage import DistillResult
from runtime.bundle import read_bundle


def pytorch_reference(model: nn.Module, split: Split, spec, part: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """The checkpoint's logits on a split part, with its own (torchvision) preprocessing, and the labels."""
    from pipeline.training import predict_logits

    x, y = load_tensors(split.paths(part), split.labels(part), spec, desc=f"loading {part} images")
    return predict_logits(model, x, desc="pytorch logits").numpy(), y.numpy()


def default_export_role(cfg: PipelineConfig) -> str:
    """The student when distillation ran and its retention gate adopted it, else the teacher."""
    if not cfg.distill.enabled or not cfg.run.checkpoint("student").is_file():
        return "teacher"
    return "student" if cfg.run.read_metrics().get("student", {}).get("adopted", True) else "teacher"


@dataclass
class ArtifactSummary:
    """One artifact of an exported bundle, as the export stage reports it."""

    file: str
    precision: str
    size_mb: float
    accuracy: float
    accuracy_delta: float
    agreement: float
    passed: bool


@dataclass
class ExportResult:
    """What the export stage built and measured; `to_metrics()` is the `onnx` section of metrics.json."""

    role: str
    bundle: str
    size_mb: float  # of the FP32 ONNX model
    opset: int | None
    accuracy: float
    agreement: float
    max_abs_logit_diff: float
    artifacts: dict[str, ArtifactSummary]
    passed: bool
    failures: list[str]
    int8: dict[str, Any] | None = None  # the INT8 artifact's quantization record (calibration, guard)
    triton_model: str | None = None
    gate: GateResult | None = field(default=None, repr=False)

    @classmethod
    def from_metrics(cls, d: dict[str, Any]) -> "ExportResult":
        """Back from the `onnx` section of metrics.json (without the gate object)."""
        named = {f.name for f in fields(cls)} - {"artifacts", "gate"}
        return cls(artifacts={k: ArtifactSummary(**a) for k, a in d["artifacts"].items()},
                   **{k: v for k, v in d.items() if k in named})

    def to_metrics(self) -> dict[str, Any]:
        m = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("gate", "int8", "triton_model")}
        m["artifacts"] = {k: asdict(a) for k, a in self.artifacts.items()}
        if self.int8 is not None:
            m["int8"] = self.int8
        if self.triton_model is not None:
            m["triton_model"] = self.triton_model
        return m


@dataclass
class PipelineResult:
    """Every stage's result of one `run_pipeline`; `parity` is the export's gate (the validation)."""

    adapt: "AdaptResult | None"
    distill: "DistillResult | None"
    export: ExportResult | None

    @property
    def parity(self) -> GateResult | None:
        return self.export.gate if self.export else None

    @classmethod
    def from_metrics(cls, metrics: dict[str, Any]) -> "PipelineResult":
        """Back from metrics.json (sections that are missing stay None)."""
        from pipeline.adapt_stage import AdaptResult
        from pipeline.distill_stage import DistillResult

        return cls(adapt=AdaptResult.from_metrics(metrics["teacher"]) if metrics.get("teacher") else None,
                   distill=DistillResult.from_metrics(metrics["student"]) if metrics.get("student") else None,
                   export=ExportResult.from_metrics(metrics["onnx"]) if metrics.get("onnx") else None)


def run_export(cfg: PipelineConfig, role: str | None = None, out: Path | None = None,
               triton_repo: Path | None = None) -> ExportResult:
    """Export a checkpoint to a bundle directory (every artifact the config asks for, golden
    images, parity of each artifact), written in a temp dir and renamed into place."""
    from pipeline import __version__
    from exporters.bundle import ExportJob, build_bundle, check_export_options

    check_export_options(cfg.export)
    run = cfg.run
    role = role or default_export_role(cfg)
    model, meta = load_checkpoint(run.checkpoint(role))
    split = load_split(run)
    trained = {k: v for k, v in run.read_metrics().get(role, {}).items() if k != "history"}
    job = ExportJob(model=model, checkpoint=meta, role=role, split=split, settings=cfg.export,
                    validate=cfg.validate_, reference=pytorch_reference(model, split, meta.preprocess),
                    seed=cfg.seed, cache_dir=run.tensorrt_cache, version=__version__, metrics=trained)
    built = build_bundle(Path(out) if out else run.bundle, job)
    result = export_result(built, role)
    if triton_repo:
        from exporters.triton import write_triton_repo

        result.triton_model = str(write_triton_repo(built.out, Path(triton_repo)))
    run.update_metrics("onnx", result.to_metrics())
    return result


def export_result(built, role: str) -> ExportResult:
    """The export stage's report of a built bundle (an exporters.bundle.BuildResult)."""
    out, m, gate = built.out, built.manifest, built.gate
    report = gate.primary
    return ExportResult(
        role=role, bundle=str(out), size_mb=_size_mb(out / m.artifacts["onnx"].file), opset=m.opset,
        accuracy=report.artifact_accuracy, agreement=report.agreement, max_abs_logit_diff=report.max_abs_logit_diff,
        artifacts={k: ArtifactSummary(file=m.artifacts[k].file, precision=m.artifacts[k].precision,
                                      size_mb=_size_mb(out / m.artifacts[k].file), accuracy=r.artifact_accuracy,
                                      accuracy_delta=r.accuracy_delta, agreement=r.agreement, passed=r.passed)
                   for k, r in gate.reports.items()},
        passed=gate.passed, failures=gate.failures,
        int8=m.artifacts["onnx_int8"].details["quantization"] if "onnx_int8" in m.artifacts else None,
        gate=gate,
    )


def _size_mb(path: Path) -> float:
    weights = path.with_suffix(".bin") if path.suffix == ".xml" else None  # an OpenVINO IR's weights
    return (path.stat().st_size + (weights.stat().st_size if weights and weights.is_file() else 0)) / 1e6


def run_validate(cfg: PipelineConfig, bundle_dir: Path | None = None, role: str | None = None) -> GateResult:
    """Re-check every artifact of a bundle against its PyTorch checkpoint on the test split
    (and the bundle's golden images)."""
    from exporters.bundle import check_bundle

    run = cfg.run
    bundle_dir = Path(bundle_dir) if bundle_dir else run.bundle
    bundle = read_bundle(bundle_dir, verify=True)
    role = role or bundle.manifest.model.role or default_export_role(cfg)
    model, meta = load_checkpoint(run.checkpoint(role))
    if meta.class_names != bundle.class_names:
        raise EdgekilnError(f"{bundle_dir}: class names differ from the {role} checkpoint's")
    split = load_split(run)
    reference, labels = pytorch_reference(model, split, meta.preprocess)
    gate = check_bundle(bundle, reference, labels, split, cfg.validate_)
    run.update_metrics("validate", gate.to_dict())
    return gate


def run_pipeline(cfg: PipelineConfig) -> PipelineResult:
    """Every stage in order: adapt, distill (when enabled), export (whose parity gate is the validation)."""
    from pipeline.adapt_stage import run_adapt
    from pipeline.distill_stage import run_distill
    from pipeline.report import write_run_report

    adapted = run_adapt(cfg)
    distilled = run_distill(cfg) if cfg.distill.enabled else None
    # The export's own gate is the validation: the bundle it checked is the one renamed into place,
    # so running run_validate here would only recompute the same parity over again.
    exported = run_export(cfg)
    cfg.run.update_metrics("validate", exported.gate.to_dict())
    write_run_report(cfg.run, cfg.run.read_metrics())
    return PipelineResult(adapted, distilled, exported)
