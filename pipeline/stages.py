"""The pipeline's stages. Each reads and writes files in the run directory (pipeline.rundir), so
any stage can be re-run alone: adapt (pipeline.adapt_stage), distill (pipeline.distill_stage),
export and validate (here), and `run_pipeline`, all of them in order.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from pipeline import __version__
from pipeline.adapt_stage import make_run_split, run_adapt
from pipeline.checkpoint import load_checkpoint
from pipeline.config import PipelineConfig
from pipeline.data import Split, load_tensors
from pipeline.distill_stage import run_distill
from pipeline.errors import EdgekilnError
from pipeline.rundir import RunDir, load_split
from pipeline.train import predict_logits
from runtime.bundle import read_bundle, write_bundle_json

log = logging.getLogger("edgekiln")


# --------------------------------------------------------------------------- helpers (RunDir has them all)


def checkpoint_path(cfg: PipelineConfig, role: str) -> Path:
    return cfg.run.checkpoint(role)


def update_metrics(run_dir: Path, section: str, values: dict[str, Any]) -> dict[str, Any]:
    return RunDir(run_dir).update_metrics(section, values)


def read_metrics(run_dir: Path) -> dict[str, Any]:
    return RunDir(run_dir).read_metrics()


def _split(cfg: PipelineConfig, create: bool) -> Split:
    return make_run_split(cfg, cfg.run) if create else load_split(cfg.run)


def _count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _size_mb(path: Path) -> float:
    return path.stat().st_size / 1e6


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
