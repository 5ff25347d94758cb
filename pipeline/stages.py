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
from torch import nn

from pipeline import __version__
from pipeline.checkpoint import CheckpointMeta, load_checkpoint, save_checkpoint
from pipeline.config import DistillConfig, PipelineConfig, dump_config
from pipeline.data import Split, demo_data_dir, load_tensors, make_split
from pipeline.errors import EdgekilnError
from pipeline.models import create_model
from pipeline.train import accuracy, predict_logits, set_seed, train_device
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


def run_distill(cfg: PipelineConfig) -> dict[str, Any]:
    """Train a smaller student with Hinton KD (+ optional hint loss) against the adapted teacher,
    and justify it: accuracy retained, parameters, ONNX size and latency relative to the teacher,
    and (optionally) the same student trained without KD."""
    from pipeline.distill import KDSettings, build_student, choose_student, onnx_costs, STUDENTS, teacher_outputs, train_student

    dcfg: DistillConfig = cfg.distill
    set_seed(cfg.seed)
    split = _split(cfg, create=False)
    teacher, tmeta = load_checkpoint(checkpoint_path(cfg, "teacher"))
    teacher.to(train_device())  # its logits (cached or live) come from the training device
    spec = tmeta.preprocess
    n_classes = len(split.class_names)

    x, y = load_tensors(split.paths("train"), split.labels("train"), spec, desc="loading train images")
    vx, vy = load_tensors(split.paths("val"), split.labels("val"), spec, desc="loading val images")
    tx, ty = load_tensors(split.paths("test"), split.labels("test"), spec, desc="loading test images")
    teacher_test_acc = accuracy(predict_logits(teacher, tx), ty)
    kd = KDSettings(dcfg.temperature, dcfg.alpha, dcfg.hint_weight)
    common = dict(
        epochs=dcfg.epochs, lr=dcfg.lr, weight_decay=dcfg.weight_decay, batch_size=cfg.data.batch_size, seed=cfg.seed
    )

    auto_table = None
    names = [dcfg.student]
    if dcfg.student == "auto":
        auto_table, fits = choose_student(
            list(dcfg.candidates or STUDENTS), n_classes, spec.crop, dcfg.max_latency_ms, dcfg.max_size_mb
        )
        if not fits:
            raise EdgekilnError(
                "distill: no candidate student fits max_latency_ms/max_size_mb on this machine; "
                + ", ".join(f"{r['student']}: {r['latency_b1_ms']:.1f} ms, {r['size_mb']:.1f} MB" for r in auto_table)
            )
        names = fits[: dcfg.auto_max_trained]

    best = None
    t0 = time.perf_counter()
    # Several `auto` candidates share one pass of the teacher over the training images.
    shared = teacher_outputs(teacher, x, features=kd.hint_weight > 0) if dcfg.cache_teacher and len(names) > 1 else None
    for name in names:
        student = build_student(name, n_classes, dcfg.weights)
        result = train_student(
            student, x, y, vx, vy, kd=kd, teacher=teacher, cache_teacher=dcfg.cache_teacher, teacher_cache=shared,
            desc=f"distill ({name})", **common,
        )
        if best is None or result.best_val_accuracy > best[2].best_val_accuracy:
            best = (name, student, result)
    name, student, result = best
    train_seconds = time.perf_counter() - t0
    test_acc = accuracy(predict_logits(student, tx), ty)

    metrics: dict[str, Any] = {
        "model": name,
        "val_accuracy": result.best_val_accuracy,
        "test_accuracy": test_acc,
        "teacher_model": tmeta.arch,
        "teacher_test_accuracy": teacher_test_acc,
        "accuracy_retained": test_acc / teacher_test_acc if teacher_test_acc else None,
        "best_epoch": result.best_epoch,
        "params": _count_params(student),
        "teacher_params": _count_params(teacher),
        "params_ratio": _count_params(student) / _count_params(teacher),
        "kd": {"temperature": dcfg.temperature, "alpha": dcfg.alpha, "hint_weight": dcfg.hint_weight},
        "train_seconds": train_seconds,
        "history": result.history,
    }
    if auto_table is not None:
        metrics["auto"] = {"candidates": auto_table, "trained": names}
    if dcfg.compare_without_kd:
        control = build_student(name, n_classes, dcfg.weights)
        c_res = train_student(control, x, y, vx, vy, kd=None, desc=f"control, no KD ({name})", **common)
        metrics["without_kd"] = {
            "test_accuracy": accuracy(predict_logits(control, tx), ty),
            "val_accuracy": c_res.best_val_accuracy,
        }
        metrics["kd_gain"] = metrics["test_accuracy"] - metrics["without_kd"]["test_accuracy"]
    teacher.cpu()  # ONNX export (cost measurement) traces on the CPU
    if dcfg.measure_cost:
        costs = onnx_costs({"student": student, "teacher": teacher}, spec.crop)
        s_cost, t_cost = costs["student"], costs["teacher"]
        metrics["onnx_cost"] = {"student": s_cost.__dict__, "teacher": t_cost.__dict__}
        metrics["onnx_size_ratio"] = s_cost.size_mb / t_cost.size_mb
        metrics["latency_b1_ratio"] = s_cost.latency_b1_ms / t_cost.latency_b1_ms
        metrics["latency_b32_ratio"] = s_cost.latency_b32_ms / t_cost.latency_b32_ms
    del teacher

    path = checkpoint_path(cfg, "student")
    meta = CheckpointMeta(
        arch=name,
        class_names=split.class_names,
        preprocess=spec,
        role="student",
        extra={"teacher": tmeta.arch, "temperature": dcfg.temperature, "alpha": dcfg.alpha},
    )
    save_checkpoint(student, meta, path)
    metrics["size_mb"] = _size_mb(path)
    update_metrics(cfg.run_dir, "student", metrics)
    return metrics


# --------------------------------------------------------------------------- export + validate


def pytorch_reference(model: nn.Module, split: Split, spec, part: str = "test") -> tuple[np.ndarray, np.ndarray]:
    x, y = load_tensors(split.paths(part), split.labels(part), spec, desc=f"loading {part} images")
    return predict_logits(model, x, desc="pytorch logits").numpy(), y.numpy()


def parity_check(bundle_dir: Path, model: nn.Module, spec, split: Split, cfg: PipelineConfig, part: str = "test",
                 reference: tuple[np.ndarray, np.ndarray] | None = None):
    """The parity gate: PyTorch with the checkpoint's own preprocessing (torchvision) vs every
    artifact of the bundle with its bundle.json preprocessing (numpy), on the same image files.
    The FP32 ONNX model goes through the real runtime. Returns an exporters.parity.GateResult."""
    import runtime
    from exporters.artifacts import parity_gate, resolve_thresholds
    from exporters.specs import export_spec_for

    bundle = read_bundle(bundle_dir, verify=True)
    espec = export_spec_for(bundle.meta.get("model", {}).get("arch", ""))
    ref, labels = reference or pytorch_reference(model, split, spec, part)
    clf = runtime.Classifier(bundle)  # the bundle verified just above (runtime.load would hash it again)
    return parity_gate(
        Path(bundle_dir), bundle.meta, ref, labels, split.paths(part), [p for p, _ in getattr(split, part)],
        thresholds_for=lambda precision: resolve_thresholds(cfg.validate_, precision, espec),
        onnx_run=clf.run,
    )


def default_export_role(cfg: PipelineConfig) -> str:
    return "student" if cfg.distill.enabled else "teacher"


def _check_export_options(cfg: PipelineConfig) -> None:
    """Fail on what cannot work before any slow step starts."""
    if cfg.export.tensorrt.enabled:
        from exporters.tensorrt import TensorRTUnavailable, tensorrt_available

        ok, why = tensorrt_available()
        if not ok:
            raise TensorRTUnavailable(why)


def _build_int8(cfg: PipelineConfig, tmp: Path, onnx_path: Path, split: Split, meta, espec, calib) -> dict[str, Any]:
    from exporters.artifacts import FILES, resolve_thresholds
    from exporters.quantize import quantize_int8
    from runtime.preprocess import preprocess

    ecfg = cfg.export
    budget = resolve_thresholds(cfg.validate_, "int8", espec).max_accuracy_drop
    vx = preprocess(split.paths("val"), meta.preprocess)
    vy = np.asarray(split.labels("val"))
    log.info("int8: calibrating on %d train images (%s per class: %s)", len(calib.files), ecfg.calibration_method,
             ", ".join(f"{k}={v}" for k, v in calib.per_class.items()))
    res = quantize_int8(onnx_path, tmp / FILES["onnx_int8"], calib.images, vx, vy,
                        max_accuracy_drop=budget if budget is not None else 1.0, method=ecfg.calibration_method,
                        per_channel=espec.int8_per_channel, max_excluded_nodes=ecfg.max_excluded_nodes,
                        op_types_to_keep_float=espec.int8_keep_float_op_types)
    if not res.budget_met:
        log.warning("int8: accuracy drop %.2f points on the validation split exceeds the budget %.2f even with %d "
                    "node(s) kept in float; the parity gate will judge it on the test split",
                    res.accuracy_drop * 100, res.budget * 100, len(res.excluded_nodes))
    return {
        "file": FILES["onnx_int8"], "format": "onnx", "precision": "int8",
        "quantization": {
            "tool": "onnxruntime.quantization.quantize_static", "format": "QDQ",
            "weights": "int8, per-channel" if espec.int8_per_channel else "int8, per-tensor", "activations": "uint8",
            "calibration": {**calib.summary(), "method": ecfg.calibration_method},
            "guard": {"split": "val", **res.to_dict()},
        },
    }


def run_export(cfg: PipelineConfig, role: str | None = None, out: Path | None = None,
               triton_repo: Path | None = None) -> dict[str, Any]:
    """Export a checkpoint to a bundle directory (every artifact the config asks for, golden
    images, parity of each artifact), written in a temp dir and renamed into place."""
    return _export(cfg, role, out, triton_repo)[0]


def _export(cfg: PipelineConfig, role: str | None, out: Path | None, triton_repo: Path | None):
    """run_export's work; also returns the parity gate it ran (an exporters.parity.GateResult)."""
    from exporters.artifacts import FILES
    from exporters.calibration import calibration_set
    from exporters.golden import pick_golden, write_golden
    from exporters.onnx_export import export_onnx, simplify_onnx
    from exporters.specs import export_spec_for
    from runtime.preprocess import preprocess

    _check_export_options(cfg)
    ecfg = cfg.export
    role = role or default_export_role(cfg)
    out = Path(out) if out else cfg.run_dir / "bundle"
    model, meta = load_checkpoint(checkpoint_path(cfg, role))
    split = _split(cfg, create=False)
    espec = export_spec_for(meta.arch)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        onnx_path = tmp / FILES["onnx"]
        opset = export_onnx(model, meta.preprocess.crop, onnx_path, ecfg.opset, ecfg.dynamic_batch, espec)
        simplified = None
        if ecfg.simplify:
            check_x = preprocess(split.paths("test")[:16], meta.preprocess)
            simplified = simplify_onnx(onnx_path, check_x, atol=cfg.validate_.max_abs_logit_diff / 10)
        artifacts: dict[str, Any] = {"onnx": {"file": FILES["onnx"], "format": "onnx", "precision": "fp32",
                                              "simplify": simplified}}
        if "fp16" in ecfg.precisions:
            from exporters.fp16 import convert_fp16

            info = convert_fp16(onnx_path, tmp / FILES["onnx_fp16"], keep_io_types=ecfg.fp16_keep_io_types)
            artifacts["onnx_fp16"] = {"file": FILES["onnx_fp16"], "format": "onnx", "precision": "fp16", **info}
        trt_cfg = ecfg.tensorrt
        calib = None
        if "int8" in ecfg.precisions or (trt_cfg.enabled and trt_cfg.precision == "int8"):
            calib = calibration_set(split.train, split.root, split.class_names, meta.preprocess, ecfg.calibration_size,
                                    cfg.seed)
        if "int8" in ecfg.precisions:
            artifacts["onnx_int8"] = _build_int8(cfg, tmp, onnx_path, split, meta, espec, calib)
        if trt_cfg.enabled:
            from exporters.tensorrt import EngineSettings, build_engine

            settings = EngineSettings(trt_cfg.precision, trt_cfg.min_batch, trt_cfg.opt_batch, trt_cfg.max_batch,
                                      trt_cfg.workspace_mb)
            cache_dir = cfg.run_dir / "tensorrt-cache"
            cache_dir.mkdir(parents=True, exist_ok=True)
            info = build_engine(onnx_path, tmp / FILES["tensorrt"], espec.input_name(),
                                (3, meta.preprocess.crop, meta.preprocess.crop), settings,
                                calibration=calib.images if calib else None,
                                timing_cache_path=cache_dir / "timing.cache",
                                calibration_cache_path=cache_dir / f"{role}.calib")
            artifacts["tensorrt"] = {"file": FILES["tensorrt"], "format": "tensorrt", **info}

        # The PyTorch reference on the held-out test split: parity of every artifact and the golden logits.
        ref, labels = pytorch_reference(model, split, meta.preprocess)
        test_paths = split.paths("test")
        golden_idx = pick_golden(split.test, len(split.class_names), ecfg.golden_images)
        golden = write_golden(tmp, [test_paths[i] for i in golden_idx], ref[golden_idx], espec.golden_atol) \
            if golden_idx else None
        bundle_meta = {
            "edgekiln_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "model": {"arch": meta.arch, "role": role, "params": _count_params(model), **meta.extra},
            "class_names": meta.class_names,
            "preprocess": meta.preprocess.to_dict(),
            "input": {"name": espec.input_name(), "shape": ["batch", 3, meta.preprocess.crop, meta.preprocess.crop],
                      "dtype": "float32"},
            "output": {"name": espec.output_name(), "shape": ["batch", len(meta.class_names)], "dtype": "float32"},
            "opset": opset,
            "export_spec": espec.family,
            "artifacts": artifacts,
            "metrics": {k: v for k, v in read_metrics(cfg.run_dir).get(role, {}).items() if k != "history"},
        }
        if golden:
            bundle_meta["golden"] = golden
        write_bundle_json(tmp, bundle_meta)
        gate = parity_check(tmp, model, meta.preprocess, split, cfg, reference=(ref, labels))
        bundle_meta["parity"] = {"test": gate.primary.to_dict(),
                                 "artifacts": {k: r.to_dict() for k, r in gate.reports.items()},
                                 "golden": gate.golden, "passed": gate.passed}
        write_bundle_json(tmp, bundle_meta)
        tmp.chmod(0o755)  # mkdtemp creates 0700
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report = gate.primary
    metrics = {
        "role": role,
        "bundle": str(out),
        "size_mb": _size_mb(out / FILES["onnx"]),
        "opset": opset,
        "accuracy": report.artifact_accuracy,
        "agreement": report.agreement,
        "max_abs_logit_diff": report.max_abs_logit_diff,
        "artifacts": {
            k: {"file": artifacts[k]["file"], "precision": artifacts[k].get("precision"),
                "size_mb": _size_mb(out / artifacts[k]["file"]), "accuracy": r.artifact_accuracy,
                "accuracy_delta": r.accuracy_delta, "agreement": r.agreement, "passed": r.passed}
            for k, r in gate.reports.items()
        },
        "passed": gate.passed,
        "failures": gate.failures,
    }
    if "onnx_int8" in artifacts:
        metrics["int8"] = artifacts["onnx_int8"]["quantization"]
    if triton_repo:
        from exporters.triton import write_triton_repo

        metrics["triton_model"] = str(write_triton_repo(out, Path(triton_repo)))
    update_metrics(cfg.run_dir, "onnx", metrics)
    return metrics, gate


def run_validate(cfg: PipelineConfig, bundle_dir: Path | None = None, role: str | None = None):
    """Re-check every artifact of a bundle against its PyTorch checkpoint on the test split
    (and the bundle's golden images); returns an exporters.parity.GateResult."""
    bundle_dir = Path(bundle_dir) if bundle_dir else cfg.run_dir / "bundle"
    bundle = read_bundle(bundle_dir, verify=True)
    role = role or bundle.meta.get("model", {}).get("role") or default_export_role(cfg)
    model, meta = load_checkpoint(checkpoint_path(cfg, role))
    if meta.class_names != bundle.class_names:
        raise EdgekilnError(f"{bundle_dir}: class names differ from the {role} checkpoint's")
    split = _split(cfg, create=False)
    gate = parity_check(bundle_dir, model, meta.preprocess, split, cfg)
    update_metrics(cfg.run_dir, "validate", gate.to_dict())
    return gate


def run_pipeline(cfg: PipelineConfig) -> dict[str, Any]:
    run_adapt(cfg)
    if cfg.distill.enabled:
        run_distill(cfg)
    # The export's own gate is the validation: the bundle it checked is the one renamed into place,
    # so running run_validate here would only recompute the same parity over again.
    _, report = _export(cfg, None, None, None)
    update_metrics(cfg.run_dir, "validate", report.to_dict())
    from pipeline.report import write_run_report

    write_run_report(cfg.run_dir, read_metrics(cfg.run_dir))
    return {"metrics": read_metrics(cfg.run_dir), "parity": report}
