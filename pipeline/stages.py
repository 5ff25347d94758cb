"""The pipeline's stages. Each reads and writes files in the run directory, so
any stage can be re-run alone:

    runs/<name>/config.yaml            snapshot of the config
    runs/<name>/split.json             the exact train/val/test files
    runs/<name>/checkpoints/*.safetensors
    runs/<name>/metrics.json           every stage adds its section
    runs/<name>/bundle/                bundle.json + model.onnx (the deployable)
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline import __version__
from pipeline.checkpoint import CheckpointMeta, load_checkpoint, save_checkpoint
from pipeline.config import DistillConfig, PipelineConfig, dump_config
from pipeline.data import Split, demo_data_dir, load_tensors, make_split
from pipeline.errors import EdgekilnError
from pipeline.models import create_model
from pipeline.train import accuracy, fit, kd_loss, predict_logits, set_seed, tensor_loader
from runtime.bundle import atomic_write_text, read_bundle, write_bundle_json

log = logging.getLogger("edgekiln")

TEACHER = "teacher.safetensors"
STUDENT = "student.safetensors"


# --------------------------------------------------------------------------- helpers


def checkpoint_path(cfg: PipelineConfig, role: str) -> Path:
    return cfg.run_dir / "checkpoints" / (TEACHER if role == "teacher" else STUDENT)


def update_metrics(run_dir: Path, section: str, values: dict[str, Any]) -> dict[str, Any]:
    """Read-modify-write metrics.json atomically."""
    path = run_dir / "metrics.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    data[section] = values
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")
    return data


def read_metrics(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _prepare_run_dir(cfg: PipelineConfig) -> None:
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cfg.run_dir / "config.yaml", dump_config(cfg))


def data_root(cfg: PipelineConfig) -> Path:
    return demo_data_dir() if cfg.data.demo else Path(cfg.data.root)


def _split(cfg: PipelineConfig, create: bool) -> Split:
    path = cfg.run_dir / "split.json"
    if create:
        split = make_split(data_root(cfg), cfg.data.val_fraction, cfg.data.test_fraction, cfg.seed)
        split.save(path)
        return split
    return Split.load(path)


def _count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _size_mb(path: Path) -> float:
    return path.stat().st_size / 1e6


# --------------------------------------------------------------------------- adapt


def adapt_resume_dir(cfg: PipelineConfig) -> Path:
    return cfg.run_dir / "checkpoints" / "adapt-resume"


def run_adapt(cfg: PipelineConfig, resume: bool = False) -> dict[str, Any]:
    """Adapt the pretrained model with the strategy `adapt.strategy` names (see pipeline.strategies),
    evaluate it on the test split, optionally against the baselines, and write the run report.

    A resumable checkpoint is kept in checkpoints/adapt-resume/ while training runs
    (removed when the stage completes); resume=True continues from it.
    """
    from dataclasses import replace

    from pipeline import evaluation
    from pipeline.report import write_run_report
    from pipeline.strategies import AdaptContext, AdaptData, adapt_model, linear_probe_baseline, train_from_scratch
    from pipeline.train import init_distributed

    a = cfg.adapt
    info = init_distributed()
    set_seed(cfg.seed)
    resume_dir = adapt_resume_dir(cfg)
    if resume:
        from pipeline.train import load_resume_state

        saved = load_resume_state(resume_dir)[0].get("config", {})
        if saved and (saved.get("adapt", {}).get("strategy"), saved.get("model")) != (a.strategy, cfg.model.model_dump(mode="json")):
            raise EdgekilnError(f"{resume_dir}: the checkpoint was made with another model or strategy; run without --resume")
    if info.is_main:
        _prepare_run_dir(cfg)
    if info.is_main:
        split = _split(cfg, create=not (resume and (cfg.run_dir / "split.json").is_file()))
    if info.enabled:
        import torch.distributed as dist

        dist.barrier()  # rank 0 has written split.json
        split = _split(cfg, create=False)
    n_classes = len(split.class_names)
    model = create_model(cfg.model.name, n_classes, cfg.model.weights)
    spec = model.defaults.preprocess(cfg.model.input_size, cfg.model.crop_pct)
    log.info("adapt: %s, strategy %s, %d classes, input %d", cfg.model.name, a.strategy, n_classes, spec.crop)
    data = AdaptData.from_split(split, spec)
    ctx = AdaptContext(
        arch=cfg.model.name, seed=cfg.seed, batch_size=cfg.data.batch_size, num_workers=cfg.data.num_workers,
        run_dir=cfg.run_dir, checkpoint_dir=resume_dir, resume=resume,
        run_config=cfg.model_dump(mode="json", by_alias=True), is_main=info.is_main, desc=f"adapt ({a.strategy})",
    )
    params = _count_params(model)
    t0 = time.perf_counter()
    out = adapt_model(model, data, a, ctx)
    train_seconds = time.perf_counter() - t0
    y_test = data.y("test")
    ev = evaluation.classification_metrics(out.test_logits, y_test, split.class_names)

    metrics: dict[str, Any] = {
        "model": cfg.model.name,
        "strategy": a.strategy,
        "val_accuracy": out.val_accuracy,
        "test_accuracy": ev["accuracy"],
        "macro_f1": ev["macro_f1"],
        "auc_roc_ovr": ev["auc_roc_ovr"],
        "best_epoch": out.fit.best_epoch if out.fit else None,
        "stopped_early": out.fit.stopped_early if out.fit else False,
        "params": params,
        "trainable_params": out.trainable_params,
        "trainable_fraction": out.trainable_params / params,
        "train_seconds": train_seconds,
        **out.extra,
        "per_class": ev["per_class"],
        "confusion_matrix": ev["confusion_matrix"],
        "history": out.fit.history if out.fit else [],
    }
    path = checkpoint_path(cfg, "teacher")
    if info.is_main:  # saved before the (optional, slow) baselines, so an interruption there loses nothing
        meta = CheckpointMeta(
            arch=cfg.model.name, class_names=split.class_names, preprocess=spec, role="teacher", extra={"strategy": a.strategy}
        )
        save_checkpoint(out.model, meta, path)
        shutil.rmtree(resume_dir, ignore_errors=True)
    scratch = None
    if a.baselines:
        base_ctx = replace(ctx, run_dir=None, checkpoint_dir=None, resume=False, desc="baseline (scratch)")
        set_seed(cfg.seed)
        t1 = time.perf_counter()
        scratch = train_from_scratch(cfg.model.name, data, a, base_ctx)
        sev = evaluation.classification_metrics(scratch.test_logits, y_test, split.class_names)
        scratch_s = time.perf_counter() - t1
        t1 = time.perf_counter()
        probe = linear_probe_baseline(create_model(cfg.model.name, n_classes, cfg.model.weights), data, cfg.model.name, cfg.seed)
        pev = evaluation.classification_metrics(probe["test_logits"], y_test, split.class_names)
        metrics["baselines"] = {
            "scratch": {"val_accuracy": scratch.val_accuracy, "test_accuracy": sev["accuracy"], "macro_f1": sev["macro_f1"],
                        "auc_roc_ovr": sev["auc_roc_ovr"], "trainable_params": scratch.trainable_params,
                        "train_seconds": scratch_s},
            "linear_probe": {"val_accuracy": probe["val_accuracy"], "test_accuracy": pev["accuracy"], "macro_f1": pev["macro_f1"],
                             "auc_roc_ovr": pev["auc_roc_ovr"], "train_seconds": time.perf_counter() - t1},
        }
    if not info.is_main:
        return metrics

    metrics["size_mb"] = _size_mb(path)
    plots = {"confusion_matrix": evaluation.CONFUSION_PNG}
    evaluation.plot_confusion_matrix(ev["confusion_matrix"], split.class_names, cfg.run_dir / evaluation.CONFUSION_PNG,
                                     title=f"{cfg.model.name} ({a.strategy}), test split")
    curves = {a.strategy: metrics["history"]}
    if scratch is not None and scratch.fit:
        curves["scratch (baseline)"] = scratch.fit.history
    if any(curves.values()):
        evaluation.plot_training_curves(curves, cfg.run_dir / evaluation.CURVES_PNG)
        plots["training_curves"] = evaluation.CURVES_PNG
    metrics["plots"] = plots
    all_metrics = update_metrics(cfg.run_dir, "teacher", metrics)
    write_run_report(cfg.run_dir, all_metrics)
    return metrics


# --------------------------------------------------------------------------- distill


def _reset_bn_momentum(model: nn.Module, momentum: float = 0.1) -> None:
    # torchvision's MobileNetV3 uses BN momentum 0.01, tuned for long ImageNet
    # schedules; in a few hundred steps from scratch its running statistics do
    # not converge and eval-mode accuracy collapses to chance. 0.1 is PyTorch's default.
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = momentum


def run_distill(cfg: PipelineConfig) -> dict[str, Any]:
    """Train a smaller student with Hinton KD against the adapted teacher."""
    dcfg: DistillConfig = cfg.distill
    set_seed(cfg.seed)
    split = _split(cfg, create=False)
    teacher, tmeta = load_checkpoint(checkpoint_path(cfg, "teacher"))
    spec = tmeta.preprocess
    student = create_model(dcfg.student, len(split.class_names), dcfg.weights)
    if dcfg.weights == "none":
        _reset_bn_momentum(student)

    x, y = load_tensors(split.paths("train"), split.labels("train"), spec, desc="loading train images")
    vx, vy = load_tensors(split.paths("val"), split.labels("val"), spec, desc="loading val images")
    tx, ty = load_tensors(split.paths("test"), split.labels("test"), spec, desc="loading test images")
    # No augmentation: the teacher's logits are a fixed function of each image, so compute them once.
    teacher_logits = predict_logits(teacher, x, desc="teacher logits")
    teacher_test_acc = accuracy(predict_logits(teacher, tx), ty)
    del teacher

    def loss_fn(out, labels, t_logits):
        return kd_loss(out, t_logits, labels, dcfg.temperature, dcfg.alpha)

    t0 = time.perf_counter()
    result = fit(
        student,
        tensor_loader(x, y, teacher_logits, batch_size=cfg.data.batch_size, shuffle=True, seed=cfg.seed),
        vx,
        vy,
        loss_fn=loss_fn,
        epochs=dcfg.epochs,
        lr=dcfg.lr,
        weight_decay=dcfg.weight_decay,
        desc="distill (student)",
        warmup_epochs=1.0,
    )
    test_acc = accuracy(predict_logits(student, tx), ty)
    path = checkpoint_path(cfg, "student")
    meta = CheckpointMeta(
        arch=dcfg.student,
        class_names=split.class_names,
        preprocess=spec,
        role="student",
        extra={"teacher": tmeta.arch, "temperature": dcfg.temperature, "alpha": dcfg.alpha},
    )
    save_checkpoint(student, meta, path)
    metrics = {
        "model": dcfg.student,
        "val_accuracy": result.best_val_accuracy,
        "test_accuracy": test_acc,
        "teacher_test_accuracy": teacher_test_acc,
        "accuracy_retained": test_acc / teacher_test_acc if teacher_test_acc else None,
        "best_epoch": result.best_epoch,
        "params": _count_params(student),
        "size_mb": _size_mb(path),
        "train_seconds": time.perf_counter() - t0,
        "history": result.history,
    }
    update_metrics(cfg.run_dir, "student", metrics)
    return metrics


# --------------------------------------------------------------------------- export + validate


def pytorch_reference(model: nn.Module, split: Split, spec, part: str = "test") -> tuple[np.ndarray, np.ndarray]:
    x, y = load_tensors(split.paths(part), split.labels(part), spec, desc=f"loading {part} images")
    return predict_logits(model, x, desc="pytorch logits").numpy(), y.numpy()


def parity_check(bundle_dir: Path, model: nn.Module, spec, split: Split, thresholds, part: str = "test"):
    """PyTorch with the checkpoint's own preprocessing (torchvision) vs the bundle through the
    runtime (its bundle.json preprocessing in numpy + onnxruntime), on the same image files."""
    import runtime
    from exporters.parity import compare_logits

    clf = runtime.load(bundle_dir)
    ref, labels = pytorch_reference(model, split, spec, part)
    paths = split.paths(part)
    cand = clf.logits(paths)
    names = [p for p, _ in getattr(split, part)]
    return compare_logits("model.onnx", ref, cand, labels, thresholds, names)


def _thresholds(cfg: PipelineConfig):
    from exporters.parity import Thresholds

    v = cfg.validate_
    return Thresholds(min_agreement=v.min_agreement, max_abs_logit_diff=v.max_abs_logit_diff, min_accuracy=v.min_accuracy)


def default_export_role(cfg: PipelineConfig) -> str:
    return "student" if cfg.distill.enabled else "teacher"


def run_export(cfg: PipelineConfig, role: str | None = None, out: Path | None = None) -> dict[str, Any]:
    """Export a checkpoint to a bundle directory, written in a temp dir and renamed into place."""
    from exporters.onnx_export import OUTPUT_NAME, INPUT_NAME, export_onnx

    role = role or default_export_role(cfg)
    out = Path(out) if out else cfg.run_dir / "bundle"
    model, meta = load_checkpoint(checkpoint_path(cfg, role))
    split = _split(cfg, create=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        onnx_path = tmp / "model.onnx"
        opset = export_onnx(model, meta.preprocess.crop, onnx_path, cfg.export.opset, cfg.export.dynamic_batch)
        bundle_meta = {
            "edgekiln_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "model": {"arch": meta.arch, "role": role, "params": _count_params(model), **meta.extra},
            "class_names": meta.class_names,
            "preprocess": meta.preprocess.to_dict(),
            "input": {"name": INPUT_NAME, "shape": ["batch", 3, meta.preprocess.crop, meta.preprocess.crop], "dtype": "float32"},
            "output": {"name": OUTPUT_NAME, "shape": ["batch", len(meta.class_names)], "dtype": "float32"},
            "opset": opset,
            "artifacts": {"onnx": {"file": "model.onnx", "format": "onnx", "precision": "fp32"}},
            "metrics": {k: v for k, v in read_metrics(cfg.run_dir).get(role, {}).items() if k != "history"},
        }
        write_bundle_json(tmp, bundle_meta)
        # Parity on the held-out test split, through the real runtime, recorded in the bundle.
        report = parity_check(tmp, model, meta.preprocess, split, _thresholds(cfg))
        bundle_meta["parity"] = {"test": report.to_dict()}
        write_bundle_json(tmp, bundle_meta)
        tmp.chmod(0o755)  # mkdtemp creates 0700
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    metrics = {
        "role": role,
        "bundle": str(out),
        "size_mb": _size_mb(out / "model.onnx"),
        "opset": opset,
        "accuracy": report.artifact_accuracy,
        "agreement": report.agreement,
        "max_abs_logit_diff": report.max_abs_logit_diff,
    }
    update_metrics(cfg.run_dir, "onnx", metrics)
    return metrics


def run_validate(cfg: PipelineConfig, bundle_dir: Path | None = None, role: str | None = None):
    """Re-check a bundle against its PyTorch checkpoint on the test split; returns the ParityReport."""
    bundle_dir = Path(bundle_dir) if bundle_dir else cfg.run_dir / "bundle"
    bundle = read_bundle(bundle_dir, verify=True)
    role = role or bundle.meta.get("model", {}).get("role") or default_export_role(cfg)
    model, meta = load_checkpoint(checkpoint_path(cfg, role))
    if meta.class_names != bundle.class_names:
        raise EdgekilnError(f"{bundle_dir}: class names differ from the {role} checkpoint's")
    split = _split(cfg, create=False)
    report = parity_check(bundle_dir, model, meta.preprocess, split, _thresholds(cfg))
    update_metrics(cfg.run_dir, "validate", report.to_dict())
    return report


def run_pipeline(cfg: PipelineConfig) -> dict[str, Any]:
    run_adapt(cfg)
    if cfg.distill.enabled:
        run_distill(cfg)
    run_export(cfg)
    report = run_validate(cfg)
    from pipeline.report import write_run_report

    write_run_report(cfg.run_dir, read_metrics(cfg.run_dir))
    return {"metrics": read_metrics(cfg.run_dir), "parity": report}
