"""OpenVINO artifacts: IR from the FP32 ONNX model, FP16-compressed IR, bf16 inference, NNCF INT8.

    openvino       model.xml (+ model.bin)          fp32  (any export.openvino.precisions)
    openvino_fp16  model.fp16.xml (+ .bin)          fp16  (weights compressed to FP16, f32 inference)
    openvino_bf16  model.xml, run with bf16         bf16  (the FP32 IR; OpenVINO's bf16 inference precision)
    openvino_int8  model.int8.xml (+ .bin)          int8  (NNCF PTQ, or its accuracy-control variant)

Every one is registered with exporters.builders, recorded in bundle.json with `runtimes: ["openvino"]`,
and so checked by the parity gate and the golden self-test through runtime backend `openvino`
(runtime.backends.openvino), the code that serves it. An IR is two files: OpenVINO reads the .bin
next to the .xml, and bundle.json's `files` table hashes both.

INT8: NNCF quantizes the FP32 IR on the calibration set (the same stratified train images as the
onnxruntime INT8 artifact). With `int8_method: accuracy_control` (default) it is
`nncf.quantize_with_accuracy_control` fed with our validation split, top-1 accuracy as the metric
and our INT8 accuracy budget as `max_drop`, so NNCF reverts the most harmful operations to float
until the drop fits, at most `export.max_excluded_nodes` of them - the same budget and limit as our
onnxruntime guard (exporters.quantize), so the two can be compared side by side (`int8_side_by_side`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from exporters.builders import BuildContext, get_builder, register_builder
from exporters.config import ExportConfig, OpenVINOConfig
from exporters.errors import BuilderError
from exporters.thresholds import resolve_thresholds
from runtime.backends.openvino import INSTALL_HINT, OpenVINOOptions, check_precision, open_openvino
from runtime.bundle import Artifact, Bundle

log = logging.getLogger("edgekiln")

# Operations whose activations NNCF quantizes in a CNN; one without a FakeQuantize on its input runs in float.
_COMPUTE_OPS = ("Convolution", "GroupConvolution", "MatMul", "ConvolutionBackpropData")


def check_openvino_export(cfg: OpenVINOConfig) -> None:
    """Fail before any slow step when the OpenVINO artifacts asked for cannot be built or checked here."""
    if not cfg.precisions:
        return
    try:
        import openvino
    except ImportError:
        raise BuilderError(f"export.openvino needs the openvino package, which is not installed; {INSTALL_HINT}") from None
    if "int8" in cfg.precisions:
        try:
            import nncf  # noqa: F401
        except ImportError:
            raise BuilderError(f"export.openvino int8 needs NNCF, which is not installed; {INSTALL_HINT}") from None
    if "bf16" in cfg.precisions:  # the parity gate must run it here, on this CPU
        check_precision(openvino.Core(), "CPU", "bf16")


def _wants(precision: str):
    return lambda s: precision in s.openvino.precisions


def _save_ir(ctx: BuildContext, key: str, compress_to_fp16: bool) -> Path:
    import openvino as ov

    out = ctx.out_dir / get_builder(key).file
    model = ov.convert_model(str(ctx.fp32_onnx))
    ov.save_model(model, str(out), compress_to_fp16=compress_to_fp16)  # its default is True: FP16 weights
    return out


def _ir_details(xml: Path, **extra: Any) -> dict:
    import openvino as ov

    return {"weights": xml.with_suffix(".bin").name, "tool": f"openvino {ov.get_version().split('-')[0]}",
            "source": "model.onnx", **extra}


@register_builder("openvino", "model.xml", wanted=lambda s: bool(s.openvino.precisions))
def build_openvino(ctx: BuildContext) -> Artifact:
    """FP32 OpenVINO IR (openvino.convert_model of the FP32 ONNX model, saved without FP16 compression)."""
    xml = _save_ir(ctx, "openvino", compress_to_fp16=False)
    return Artifact(file=xml.name, format="openvino", precision="fp32",
                    details=_ir_details(xml, inference_precision="f32"))


@register_builder("openvino_fp16", "model.fp16.xml", wanted=_wants("fp16"))
def build_openvino_fp16(ctx: BuildContext) -> Artifact:
    """OpenVINO IR with FP16-compressed weights (half the size; decompressed to f32 for inference on a CPU)."""
    xml = _save_ir(ctx, "openvino_fp16", compress_to_fp16=True)
    return Artifact(file=xml.name, format="openvino", precision="fp16",
                    details=_ir_details(xml, weights_precision="fp16", inference_precision="f32"))


@register_builder("openvino_bf16", "model.xml", wanted=_wants("bf16"))
def build_openvino_bf16(ctx: BuildContext) -> Artifact:
    """The FP32 IR, run with OpenVINO's bf16 inference precision: no file of its own, a precision of its own
    (backend `openvino` runs a bf16 artifact with the bf16 hint, and the parity gate judges it as bf16)."""
    xml = ctx.out_dir / get_builder("openvino").file
    if not xml.is_file():
        raise BuilderError("openvino_bf16 runs the FP32 IR, which was not built (export.openvino.precisions: fp32)")
    return Artifact(file=xml.name, format="openvino", precision="bf16",
                    details=_ir_details(xml, inference_precision="bf16", same_file_as="openvino"))


def float_compute_ops(model: Any) -> tuple[list[str], int]:
    """(names of the convolutions/matmuls whose input is not fake-quantized, count of those that are)."""
    kept, quantized = [], 0
    for op in model.get_ordered_ops():
        if op.get_type_name() not in _COMPUTE_OPS:
            continue
        src = op.input_value(0).get_node()
        if src.get_type_name() == "FakeQuantize":
            quantized += 1
        else:
            kept.append(op.get_friendly_name())
    return kept, quantized


def _accuracy(path: Path, x: np.ndarray, y: np.ndarray, batch: int = 64) -> float:
    sess = open_openvino(path, OpenVINOOptions(device="CPU", precision="f32", hint="latency"), "int8 guard")
    pred = np.concatenate([sess.run(x[i : i + batch]).argmax(1) for i in range(0, len(x), batch)])
    return float((pred == y).mean())


def _nncf_quantize(model: Any, calib: np.ndarray, vx: np.ndarray, vy: np.ndarray, method: str, budget: float,
                   max_reverted: int) -> Any:
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters

    calib_ds = nncf.Dataset([calib[i : i + 1] for i in range(len(calib))])
    if method == "ptq":
        return nncf.quantize(model, calib_ds, subset_size=len(calib))
    def top1(compiled: Any, items: Any) -> tuple[float, list[float]]:
        # NNCF's validation_fn: (metric, one value per item), so it can rank operations by their harm
        hits = [float(np.argmax(compiled(x)[0]) == y) for x, y in items]
        return (float(np.mean(hits)) if hits else 0.0), hits

    val_ds = nncf.Dataset([(vx[i : i + 1], int(vy[i])) for i in range(len(vx))], lambda item: item[0])
    return nncf.quantize_with_accuracy_control(
        model, calib_ds, val_ds, top1, max_drop=budget, drop_type=nncf.DropType.ABSOLUTE, subset_size=len(calib),
        advanced_accuracy_restorer_parameters=AdvancedAccuracyRestorerParameters(max_num_iterations=max_reverted))


@register_builder("openvino_int8", "model.int8.xml", wanted=_wants("int8"), needs_calibration=_wants("int8"))
def build_openvino_int8(ctx: BuildContext) -> Artifact:
    """NNCF INT8 from the FP32 IR: plain PTQ or accuracy control on the validation split (module docstring)."""
    import openvino as ov

    s: ExportConfig = ctx.settings
    method, calib = s.openvino.int8_method, ctx.calibration
    budget = resolve_thresholds(ctx.validate, "int8", ctx.spec).max_accuracy_drop
    budget = 1.0 if budget is None else budget
    vx, vy = ctx.guard_set()
    fp32_xml = ctx.out_dir / get_builder("openvino").file
    model = ov.Core().read_model(str(fp32_xml))
    log.info("openvino int8: NNCF %s on %d calibration images, %d validation images, budget %.2f points",
             method, len(calib.images), len(vx), budget * 100)
    try:
        qmodel = _nncf_quantize(model, calib.images, vx, vy, method, budget, s.max_excluded_nodes)
    except (RuntimeError, ValueError) as e:  # NNCF raises plain errors for models it cannot quantize
        raise BuilderError(f"openvino int8: NNCF could not quantize the model ({str(e).splitlines()[0][:200]})") from None
    kept, quantized = float_compute_ops(qmodel)
    xml = ctx.out_dir / get_builder("openvino_int8").file
    ov.save_model(qmodel, str(xml), compress_to_fp16=False)
    fp32_acc, int8_acc = _accuracy(fp32_xml, vx, vy), _accuracy(xml, vx, vy)
    drop = fp32_acc - int8_acc
    if drop > budget + 1e-12:
        log.warning("openvino int8: accuracy drop %.2f points on the validation split exceeds the budget %.2f; "
                    "the parity gate will judge it on the test split", drop * 100, budget * 100)
    import nncf

    quantization = {
        "tool": f"nncf {nncf.__version__} {'quantize_with_accuracy_control' if method != 'ptq' else 'quantize'}",
        "format": "FakeQuantize", "weights": "int8", "activations": "int8 (NNCF default preset)",
        "calibration": calib.summary(),
        "guard": {"split": "val", "method": method, "budget": budget, "budget_met": drop <= budget + 1e-12,
                  "fp32_accuracy": fp32_acc, "int8_accuracy": int8_acc, "accuracy_drop": drop,
                  "guard_images": len(vx), "kept_in_float": kept, "quantized_ops": quantized},
    }
    return Artifact(file=xml.name, format="openvino", precision="int8",
                    details=_ir_details(xml, inference_precision="f32", quantization=quantization))


def int8_side_by_side(bundle: Bundle, latency_ms: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """Our onnxruntime INT8 guard and NNCF's, one row each: validation-split guard, test-split parity
    (accuracy, agreement), nodes kept in float and, when given, latency."""
    rows = []
    for key, tool in (("onnx_int8", "onnxruntime + edgekiln guard"), ("openvino_int8", "NNCF")):
        art = bundle.manifest.artifacts.get(key)
        if art is None:
            continue
        guard = (art.details.get("quantization") or {}).get("guard", {})
        kept = guard.get("kept_in_float", guard.get("excluded_nodes", []))
        p = art.parity or {}
        rows.append({"artifact": key, "tool": tool, "method": guard.get("method", "guard"),
                     "val_accuracy_drop": guard.get("accuracy_drop"), "budget": guard.get("budget"),
                     "test_accuracy": p.get("artifact_accuracy"), "test_accuracy_delta": p.get("accuracy_delta"),
                     "agreement": p.get("agreement"), "kept_in_float": len(kept),
                     "latency_ms": (latency_ms or {}).get(key), "parity": p.get("passed")})
    return rows

