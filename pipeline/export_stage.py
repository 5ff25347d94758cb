"""The export and validate stages: load each candidate checkpoint, compute its PyTorch reference
logits, hand both to the exporters (exporters.bundle.build_bundle / check_bundle), choose the
deployable by measurement (exporters.deploy), and record the result in the run's metrics.json.
Everything about artifacts, golden images, bundle.json, the parity gate and the measurements
lives in exporters/.

    result = run_export(cfg)          # teacher + adopted student; runs/<name>/bundle = the chosen model's
    result = run_export(cfg, role="teacher", out=Path("/tmp/teacher-bundle"))   # one model only
    gate = run_validate(cfg)          # exporters.parity.GateResult; gate.passed, gate.failures

Layout: the shipped bundle (runs/<name>/bundle) holds the winning model's passing artifacts with
the winner as `default_artifact`; every other candidate model's bundle stays, loadable, at
runs/<name>/candidates/<role>/.
"""

from __future__ import annotations

import functools
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import nn

from exporters.parity import GateResult
from pipeline.checkpoint import load_checkpoint
from pipeline.config import PipelineConfig
from pipeline.data import Split, load_tensors
from pipeline.errors import DataError, EdgekilnError
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
    agreement_n: int = 0
    n_images: int = 0
    drop_interval: tuple[float, float] | None = None  # 95% CI of the accuracy drop (exporters.stats)


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
    default_artifact: str = "onnx"  # the deployable: the shipped bundle's default artifact and backend
    default_backend: str | None = None
    seconds: float = 0.0  # the export stage's own time (every candidate built, checked and measured)
    # The shipped bundle's build: wall time, peak resident memory and the step that reached it, per step
    # (bundle.json's metrics["export"]).
    cost: dict[str, Any] | None = None
    gate: GateResult | None = field(default=None, repr=False)
    deploy: dict[str, Any] | None = field(default=None, repr=False)  # metrics.json's `deploy` section

    @classmethod
    def from_metrics(cls, d: dict[str, Any], deploy: dict[str, Any] | None = None) -> "ExportResult":
        """Back from the `onnx` (and `deploy`) sections of metrics.json (without the gate object)."""
        named = {f.name for f in fields(cls)} - {"artifacts", "gate", "deploy"}
        return cls(artifacts={k: ArtifactSummary(**a) for k, a in d["artifacts"].items()}, deploy=deploy,
                   **{k: v for k, v in d.items() if k in named})

    def to_metrics(self) -> dict[str, Any]:
        m = {f.name: getattr(self, f.name) for f in fields(self)
             if f.name not in ("gate", "int8", "triton_model", "deploy")}
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
                   export=ExportResult.from_metrics(metrics["onnx"], metrics.get("deploy")) if metrics.get("onnx")
                   else None)


PARETO_PNG = "pareto.png"


def candidate_roles(cfg: PipelineConfig) -> tuple[list[str], dict[str, str]]:
    """The models export builds: the teacher always, the student when distillation is enabled, its
    checkpoint exists and the retention gate adopted it (metrics.json["student"]["adopted"], missing =
    adopted); and {role: why it is not a candidate}."""
    run, refused = cfg.run, {}
    roles = ["teacher"]
    if cfg.distill.enabled:
        student = run.read_metrics().get("student") or {}
        if not run.checkpoint("student").is_file():
            refused["student"] = "no student checkpoint (run distill first)"
        elif not student.get("adopted", True):
            refused["student"] = student.get("refusal") or "refused by the retention gate"
        else:
            roles.append("student")
    return roles, refused


def ood_images(cfg: PipelineConfig) -> list[Path]:
    """The images of `data.ood` ([] when unset); DataError when it is not a folder of images."""
    from exporters.agreement import list_images

    folder = cfg.data.ood
    if folder is None:
        return []
    if not Path(folder).is_dir():
        raise DataError(f"data.ood: {folder} is not a folder; point it at a folder of out-of-distribution images")
    found = list_images(folder)
    if not found:
        raise DataError(f"data.ood: {folder} holds no images (.png, .jpg, ...); add some or unset data.ood")
    return found


def fit_model_trust(cfg: PipelineConfig, role: str, model: nn.Module, meta, split: Split,
                    test: tuple[np.ndarray, np.ndarray], ood: list[Path]):
    """The model's calibration temperature and OOD threshold, fitted on the validation split, with ECE
    before/after, the unknown rate and (given OOD images) AUROC / FPR@95TPR; the reliability diagram
    beside metrics.json (an exporters.trust.TrustFit)."""
    from exporters.trust import fit_trust, plot_reliability

    val = pytorch_reference(model, split, meta.preprocess, part="val")
    ood_logits = None
    if ood:
        x, _ = load_tensors(ood, [0] * len(ood), meta.preprocess, desc="loading OOD images")
        from pipeline.training import predict_logits

        ood_logits = predict_logits(model, x, desc="pytorch logits (OOD)").numpy()
    fit = fit_trust(cfg.trust, val, test, ood_logits, ood_source=str(cfg.data.ood) if ood else None,
                    target=target_logits(cfg, model, split, meta) if cfg.trust.ood.enabled else None,
                    proxy=proxy_logits(cfg, model, meta) if cfg.trust.ood.enabled and not ood else None)
    png = cfg.run.reliability_png(role)
    if plot_reliability(fit, png, title=f"{role} ({meta.arch})"):
        fit.metrics["plot"] = png.name
    return fit


PROXY_IMAGES = 200


def proxy_logits(cfg: PipelineConfig, model: nn.Module, meta) -> np.ndarray:
    """The model's logits on PROXY_IMAGES generated images of no class (pipeline.synthetic, a stream no
    student trained on): without data.ood, a floor for the unknown answer that needs no outlier data. Students
    distilled without generated images let a third to nine tenths of real photos of other subjects through on
    three photo sets, with no report saying so; a model that answers noise with a class will not reject real
    outliers either."""
    from pipeline.training import predict_logits

    x = _proxy_images(meta.preprocess, cfg.seed)
    return predict_logits(model, x, desc="pytorch logits (generated images)").numpy()


@functools.lru_cache(maxsize=1)
def _proxy_images(spec, seed: int):
    """The generated images of proxy_logits, made once for every candidate model of an export (same
    preprocessing: ~1 s per 200 images at 224 px)."""
    from pipeline.synthetic import synthetic_tensors

    return synthetic_tensors(PROXY_IMAGES, spec, seed=seed, stream=1)


def gate_settings(cfg: PipelineConfig):
    """The parity gate's settings: with data.target and no validate.unlabeled, the deployment camera's
    images join the agreement set (each artifact's top-1 against PyTorch's; no labels needed). Source-camera
    images alone can certify an artifact that is not the model on the device: textures -> dusk, the
    teacher's INT8 agreed with PyTorch on 100 % of 64 source images and on 64 % of 45 dusk images."""
    v = cfg.validate_
    if cfg.data.target is None or v.unlabeled is not None:
        return v
    return v.model_copy(update={"unlabeled": Path(cfg.data.target)})


def target_logits(cfg: PipelineConfig, model: nn.Module, split: Split, meta) -> np.ndarray | None:
    """The model's logits on data.target (the deployment camera's unlabeled images, up to
    MAX_TARGET_IMAGES, seeded; the held-out half: target_paths), for the OOD threshold; None without data.target."""
    if cfg.data.target is None:
        return None
    from pipeline.domain import load_target
    from pipeline.training import predict_logits

    # the half no model trained on (pipeline.domain.target.target_paths)
    target = load_target(Path(cfg.data.target), None, split.class_names, meta.preprocess, cfg.seed, "check")
    return predict_logits(model, target.x(), desc="pytorch logits (data.target)").numpy()


def fit_model_thresholds(cfg: PipelineConfig, role: str, model: nn.Module, meta, split: Split,
                         test: tuple[np.ndarray, np.ndarray]):
    """Task multilabel: per-label thresholds maximising each label's F1 on the validation split (for
    bundle.json's `multilabel` section), with the test split's figures at 0.5 and at those thresholds;
    an exporters.trust.TrustFit holding no trust section, so the export stage records it the same way."""
    from exporters.multilabel import choose_thresholds, multilabel_metrics
    from exporters.trust import TrustFit
    from runtime.bundle import MultiLabel
    from runtime.multilabel import sigmoid

    vz, vy = pytorch_reference(model, split, meta.preprocess, part="val")
    thresholds = choose_thresholds(sigmoid(vz), vy)
    tz, ty = test
    at_half = multilabel_metrics(tz, ty, split.class_names)
    at_t = multilabel_metrics(tz, ty, split.class_names, thresholds)
    val_f1 = multilabel_metrics(vz, vy, split.class_names, thresholds)
    figures = {"task": "multilabel", "thresholds": dict(zip(split.class_names, thresholds)), "fitted_on": "val",
               "n_val": len(vy), "n_test": len(ty), "val": {k: val_f1[k] for k in ("micro_f1", "macro_f1")},
               "test": {"map": at_t["map"], **{f"{k}_at_0.5": at_half[k] for k in ("micro_f1", "macro_f1", "exact_match")},
                        **{k: at_t[k] for k in ("micro_f1", "macro_f1", "exact_match")}}}
    multilabel = MultiLabel(thresholds=thresholds, fit={k: figures[k] for k in ("fitted_on", "n_val", "val")})
    return TrustFit(trust=None, metrics=figures), multilabel


def _build(cfg: PipelineConfig, role: str, loaded: tuple, split: Split, out: Path, ood: list[Path]):
    """One model's bundle with every artifact, parity-checked (an exporters.bundle.BuildResult), and
    its fitted trust section (exporters.trust.TrustFit)."""
    from pipeline import __version__
    from exporters.bundle import ExportJob, build_bundle

    run = cfg.run
    model, meta = loaded
    trained = {k: v for k, v in run.read_metrics().get(role, {}).items() if k != "history"}
    reference = pytorch_reference(model, split, meta.preprocess)
    multilabel = None
    if split.multilabel:  # no calibration or OOD (softmax figures): thresholds per label instead
        fit, multilabel = fit_model_thresholds(cfg, role, model, meta, split, reference)
    else:
        fit = fit_model_trust(cfg, role, model, meta, split, reference, ood)
    job = ExportJob(model=model, checkpoint=meta, role=role, split=split, settings=cfg.export,
                    validate=gate_settings(cfg), reference=reference, seed=cfg.seed, cache_dir=run.tensorrt_cache,
                    version=__version__, metrics=trained, trust=fit.trust, multilabel=multilabel)
    return build_bundle(out, job), fit


def run_export(cfg: PipelineConfig, role: str | None = None, out: Path | None = None,
               triton_repo: Path | None = None) -> ExportResult:
    """Export every candidate model (or just `role`) to a bundle (every artifact the config asks for,
    golden images, parity of each artifact), measure every artifact on every backend available here,
    and ship the best within the `deploy` budgets: its model's passing artifacts at `out` (default
    runs/<name>/bundle) with it as the default artifact. exporters.deploy.DeployError when no candidate
    passed its gate and met the budgets (metrics.json's `deploy` section still lists every figure)."""
    from exporters.bundle import check_export_options
    from exporters.deploy import choose, gate_candidates, measure, no_candidate_error, set_default, ship
    from pipeline.report import write_run_report

    check_export_options(cfg.export)
    t0 = time.perf_counter()
    run = cfg.run
    roles, refused = ([role], {}) if role else candidate_roles(cfg)
    ood = ood_images(cfg)
    loaded = {r: load_checkpoint(run.checkpoint(r)) for r in roles}  # every checkpoint readable before slow work
    staging = run.root / "candidates"
    if role is None:
        shutil.rmtree(staging, ignore_errors=True)  # candidates of an earlier run
    split = load_split(run)
    built, fits = {}, {}
    for r in roles:
        built[r], fits[r] = _build(cfg, r, loaded.pop(r), split, staging / r, ood)
    _proxy_images.cache_clear()  # every candidate has been checked: 200 images at 224 px are ~120 MB to keep
    section = "multilabel" if split.multilabel else "trust"  # per-label thresholds, or calibration and OOD
    run.update_metrics(section, {r: f.to_metrics() for r, f in fits.items()})
    bundles = {r: read_bundle(b.out, verify=False) for r, b in built.items()}
    cands = [c for r, b in built.items() for c in gate_candidates(r, bundles[r], b.gate)]
    for c in cands:  # the model's OOD quality, for the deploy.min_ood_auroc budget
        c.ood_auroc = (fits[c.model].metrics.get("ood") or {}).get("auroc")
    deploy = cfg.deploy if cfg.deploy.metric else cfg.deploy.model_copy(update={"metric": cfg.data.select_metric})
    measure(cands, {str(b.root): b for b in bundles.values()}, deploy)
    choice = choose(cands, deploy)
    record = {**choice.to_dict(), "refused_models": refused}
    from exporters.deploy import plot_pareto

    if plot_pareto(record["candidates"], run.root / PARETO_PNG):
        record["plot"] = PARETO_PNG
    run.update_metrics("deploy", record)
    if choice.chosen is None:
        write_run_report(run, run.read_metrics())  # the report shows every candidate and what it missed
        raise no_candidate_error(choice)
    win = choice.chosen
    for r in roles:  # the other models stay as loadable candidate bundles, each with its own best as default
        best = next((c for c in sorted(choice.candidates, key=lambda c: (not c.eligible, c.latency_p50_ms))
                     if c.model == r), None)
        if r != win.model and best is not None:
            set_default(staging / r, best.artifact, best.backend, None)
    gate = built[win.model].gate
    keep = [k for k, rep in gate.reports.items() if "@" not in k and rep.passed]
    keep += [win.artifact] if win.artifact not in keep else []
    shipped = ship(staging / win.model, Path(out) if out else run.bundle, win, keep, record)
    shutil.rmtree(staging / win.model)
    if staging.is_dir() and not any(staging.iterdir()):
        staging.rmdir()
    # What ships is judged on what ships: a kept artifact's failure on another backend stays in its parity
    # record (bundle.json), and runtime.load refuses that artifact on that backend (runtime.backends.check_parity_on).
    kept = GateResult(reports={k: r for k, r in gate.reports.items()
                               if k.partition("@")[0] in keep and ("@" not in k or r.passed)}, golden=gate.golden)
    result = export_result(shipped.root, shipped.manifest, kept, win.model)
    result.deploy, result.seconds = record, round(time.perf_counter() - t0, 1)
    if triton_repo:
        from exporters.triton import write_triton_repo

        result.triton_model = str(write_triton_repo(shipped.root, Path(triton_repo)))
    run.update_metrics("onnx", result.to_metrics())
    # report.md follows every export, not only `edgekiln run`: after `edgekiln export` alone it showed the
    # deploy table and trust figures of the export before.
    write_run_report(run, run.update_metrics(section, {**{r: f.to_metrics() for r, f in fits.items()},
                                                         "shipped": win.model}))
    return result


def export_result(out: Path, m, gate: GateResult, role: str) -> ExportResult:
    """The export stage's report of a shipped bundle (its manifest and the gate of its artifacts)."""
    fp32 = gate.primary
    arts = {}
    for k, r in gate.reports.items():
        if "@" in k:
            continue
        s = r.drop_stats or {}
        arts[k] = ArtifactSummary(file=m.artifacts[k].file, precision=m.artifacts[k].precision,
                                  size_mb=_size_mb(out / m.artifacts[k].file), accuracy=r.artifact_accuracy,
                                  accuracy_delta=r.accuracy_delta, agreement=r.agreement, passed=r.passed,
                                  agreement_n=r.agreement_n, n_images=r.n_images,
                                  drop_interval=(s["low"], s["high"]) if s else None)
    main = m.artifacts.get("onnx") or m.artifacts[m.default_artifact]
    return ExportResult(
        role=role, bundle=str(out), size_mb=_size_mb(out / main.file), opset=m.opset,
        accuracy=fp32.artifact_accuracy, agreement=fp32.agreement, max_abs_logit_diff=fp32.max_abs_logit_diff,
        artifacts=arts, passed=gate.passed, failures=gate.failures,
        int8=m.artifacts["onnx_int8"].details["quantization"] if "onnx_int8" in m.artifacts else None,
        default_artifact=m.default_artifact, default_backend=m.default_backend, gate=gate,
        cost=m.metrics.get("export"),
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
    gate = check_bundle(bundle, reference, labels, split, gate_settings(cfg), model=model, seed=cfg.seed)
    run.update_metrics("validate", gate.to_dict())
    return gate


def run_pipeline(cfg: PipelineConfig) -> PipelineResult:
    """Every stage in order: adapt, distill (when enabled), export (whose parity gate is the validation)."""
    from pipeline.adapt_stage import run_adapt
    from pipeline.distill_stage import run_distill
    from pipeline.report import write_run_report

    ood_images(cfg)  # a bad data.ood fails now, not after training
    adapted = run_adapt(cfg)
    distilled = run_distill(cfg) if cfg.distill.enabled else None
    # The export's own gate is the validation: the bundle it checked is the one renamed into place,
    # so running run_validate here would only recompute the same parity over again.
    exported = run_export(cfg)  # writes report.md, also when no candidate can ship (DeployError)
    write_run_report(cfg.run, cfg.run.update_metrics("validate", exported.gate.to_dict()))
    return PipelineResult(adapted, distilled, exported)
