"""ONNX INT8: onnxruntime static quantization (QDQ, per-channel INT8 weights,
UINT8 activations), guarded by an accuracy budget.

    result = quantize_int8(fp32, out, calib, guard_x, guard_y, max_accuracy_drop=0.01)

1. `quant_pre_process` (symbolic + ONNX shape inference and onnxruntime's basic
   graph optimizations): BatchNorm folds into Conv so the weights that get
   quantized are the folded ones, and every tensor has the shape the quantizer needs.
   https://onnxruntime.ai/docs/performance/model-optimizations/quantization.html#pre-processing
2. `quantize_static` in QDQ format. Clip(0,6)/Relu right after a quantized Conv
   are removed by the QDQ quantizer (the UINT8 range of the Conv output already
   clamps), so EfficientNet-Lite's Conv+ReLU6 runs as one integer conv.
3. The accuracy guard: accuracy of the INT8 model vs the FP32 model on a guard
   split (validation images, never the test split the parity gate reports on), judged like
   the parity gate judges it (exporters.stats): over budget only when the lower bound of the
   drop's paired 95% interval is above the budget, so a flip or two on a small split is not
   chased. Over budget, nodes are ranked by how much quantization noise they add (the
   drop in signal-to-quantization-noise ratio from their input to their output,
   float model vs QDQ model on a few images) and the worst are kept in float
   (`nodes_to_exclude`), 1, 2, 4, ... nodes, until the budget holds or
   `max_excluded_nodes` is reached. Then the result says the budget cannot be met and
   the fully quantized model is kept (a half-float model over budget would be neither
   small nor accurate); the parity gate judges it on the test split.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx

from exporters.calibration import ArrayCalibrationReader
from exporters.stats import paired_drop
from exporters.errors import QuantizationError  # noqa: F401  (raised here; importable from here as before)
from exporters.quiet import quiet
from runtime.backends.ort import onnx_runner

log = logging.getLogger("edgekiln")

_WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass
class Int8Result:
    path: str
    budget: float
    budget_met: bool
    fp32_accuracy: float
    int8_accuracy: float
    guard_images: int
    excluded_nodes: list[str] = field(default_factory=list)
    attempts: list[dict] = field(default_factory=list)
    preprocess: dict = field(default_factory=dict)
    drop_stats: dict = field(default_factory=dict)  # the kept model's drop, exporters.stats.DropStats

    @property
    def accuracy_drop(self) -> float:
        return self.fp32_accuracy - self.int8_accuracy

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("path")
        d["accuracy_drop"] = self.accuracy_drop
        return d


def _input_name(path: Path) -> str:
    """The model's first real input (read from the graph: no session needed)."""
    graph = onnx.load(str(path), load_external_data=False).graph
    inits = {t.name for t in graph.initializer}
    return next(i.name for i in graph.input if i.name not in inits)


def run_onnx(path: Path, x: np.ndarray, batch: int = 64) -> np.ndarray:
    """Logits of an ONNX file (not in a bundle yet) on the CPU, in chunks of `batch`."""
    sess = onnx_runner(path)
    outs = [sess.run(x[i : i + batch]) for i in range(0, len(x), batch)]
    return np.concatenate(outs).astype(np.float32) if outs else np.zeros((0, 0), np.float32)


def preprocess_for_quantization(src: Path, dst: Path) -> dict:
    """onnxruntime's recommended pre-processing; falls back to ONNX shape inference only
    when symbolic shape inference cannot handle the graph."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        with quiet(root_logger=True):
            quant_pre_process(str(src), str(dst), skip_symbolic_shape=False)
        return {"quant_pre_process": True, "symbolic_shape_inference": True}
    except Exception as e:  # symbolic shape inference fails on some exotic ops
        log.info("quant_pre_process with symbolic shape inference failed (%s); retrying without", e.__class__.__name__)
        with quiet(root_logger=True):
            quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
        return {"quant_pre_process": True, "symbolic_shape_inference": False}


def quantize_qdq(
    src: Path,
    dst: Path,
    calibration: np.ndarray,
    input_name: str,
    method: str = "minmax",
    per_channel: bool = True,
    nodes_to_exclude: list[str] | None = None,
    op_types_to_keep_float: tuple[str, ...] = (),
) -> None:
    """One quantize_static run (QDQ, S8 weights, U8 activations) of a pre-processed model."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    if method not in methods:
        raise QuantizationError(f"calibration method '{method}' is not one of {', '.join(methods)}")
    exclude = list(nodes_to_exclude or [])
    if op_types_to_keep_float:
        exclude += [n.name for n in onnx.load(str(src), load_external_data=False).graph.node
                    if n.op_type in op_types_to_keep_float]
    with quiet(root_logger=True):
        quantize_static(
            str(src),
            str(dst),
            ArrayCalibrationReader(calibration, input_name),
            quant_format=QuantFormat.QDQ,
            per_channel=per_channel,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=methods[method],
            nodes_to_exclude=sorted(set(exclude)),
        )


def rank_sensitive_nodes(float_path: Path, qdq_path: Path, x: np.ndarray, work: Path) -> list[tuple[str, float]]:
    """Nodes of the float model ranked by the SQNR they lose under quantization (worst first).

    For a node, loss = SQNR(its activation input) - SQNR(its output): the noise its own
    quantization adds. Activations of both models on `x` are collected, and SQNRs computed, by
    onnxruntime's QDQ debugging tools (onnxruntime.quantization.qdq_loss_debug). Each float tensor
    is compared with the QDQ model's tensor of the same name, i.e. *before* its own QuantizeLinear
    (the matching's "pre_qdq"), capped at 100 dB for identical tensors: the library's default
    comparison (float vs "post_qdq", and no cap, so an unquantized input scores ~300 dB) ranked
    the classifier first on the test model and kept one more node in float for the same accuracy.
    """
    from onnxruntime.quantization.qdq_loss_debug import (
        collect_activations, compute_signal_to_quantization_noice_ratio, modify_model_output_intermediate_tensors,
    )

    name = _input_name(float_path)
    acts = {}
    for tag, path in (("float", float_path), ("qdq", qdq_path)):
        augmented = work / f"{tag}_all.onnx"
        with quiet(root_logger=True):
            modify_model_output_intermediate_tensors(str(path), str(augmented))
            acts[tag] = collect_activations(str(augmented), ArrayCalibrationReader(x, name, batch_size=len(x)))
    sqnr = {t: min(100.0, compute_signal_to_quantization_noice_ratio(acts["float"][t], acts["qdq"][t]))
            for t in acts["float"].keys() & acts["qdq"].keys()}
    fm = onnx.load(str(float_path), load_external_data=False)
    consumers: dict[str, list] = {}
    for node in fm.graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    ranked = []
    for node in fm.graph.node:
        if node.op_type not in _WEIGHTED_OPS or not node.output:
            continue
        out = node.output[0]
        # The QDQ quantizer removes a Relu/Clip that only follows a quantized node and renames
        # the node's output to the activation's: measure there.
        nxt = consumers.get(out, [])
        if out not in sqnr and len(nxt) == 1 and nxt[0].op_type in ("Relu", "Clip") and nxt[0].output[0] in sqnr:
            out = nxt[0].output[0]
        if out in sqnr:
            ranked.append((node.name, sqnr.get(node.input[0], 100.0) - sqnr[out]))
    ranked.sort(key=lambda t: -t[1])
    return ranked


def quantize_int8(
    fp32_path: Path,
    out_path: Path,
    calibration: np.ndarray,
    guard_x: np.ndarray,
    guard_y: np.ndarray,
    max_accuracy_drop: float = 0.01,
    method: str = "minmax",
    per_channel: bool = True,
    max_excluded_nodes: int = 16,
    op_types_to_keep_float: tuple[str, ...] = (),
    sensitivity_images: int = 16,
) -> Int8Result:
    """Quantize `fp32_path` to `out_path`; exclude sensitive nodes until the accuracy drop on
    (guard_x, guard_y) is within `max_accuracy_drop`, or report (budget_met=False) that it can't."""
    if len(calibration) == 0:
        raise QuantizationError("INT8 calibration needs at least one image (export.calibration_size)")
    if len(guard_x) != len(guard_y) or len(guard_x) == 0:
        raise QuantizationError("INT8 accuracy guard needs labeled images (the validation split is empty)")
    input_name = _input_name(fp32_path)
    work = Path(tempfile.mkdtemp(prefix=".int8-", dir=Path(out_path).parent))
    try:
        pre = work / "pre.onnx"
        pre_info = preprocess_for_quantization(fp32_path, pre)
        fp32_right = run_onnx(fp32_path, guard_x).argmax(1) == guard_y
        fp32_acc = float(fp32_right.mean())
        stats_of: dict[int, dict] = {}

        def attempt(exclude: list[str]) -> tuple[Path, float]:
            dst = work / f"int8-{len(exclude)}.onnx"
            quantize_qdq(pre, dst, calibration, input_name, method, per_channel, exclude, op_types_to_keep_float)
            right = run_onnx(dst, guard_x).argmax(1) == guard_y
            stats = paired_drop(fp32_right, right)
            stats_of[len(exclude)] = {"over": stats.exceeds(max_accuracy_drop), **stats.to_dict()}
            log.info("int8: %d node(s) kept in float: accuracy %.4f (fp32 %.4f; %s)", len(exclude), right.mean(),
                     fp32_acc, stats.describe())
            return dst, float(right.mean())

        def over(k: int) -> bool:
            return stats_of[k]["over"]

        attempts = []
        path, acc = attempt([])
        attempts.append({"excluded": 0, "accuracy": acc, "accuracy_drop": fp32_acc - acc})
        best = first = (fp32_acc - acc, 0, path, acc, [])
        if over(0) and max_excluded_nodes > 0:
            ranked = rank_sensitive_nodes(pre, path, guard_x[:sensitivity_images], work)
            cap = min(max_excluded_nodes, len(ranked))
            steps = sorted({min(2**i, cap) for i in range(cap.bit_length() + 1)} - {0})
            for k in steps:
                exclude = [n for n, _ in ranked[:k]]
                path, acc = attempt(exclude)
                attempts.append({"excluded": k, "accuracy": acc, "accuracy_drop": fp32_acc - acc, "nodes": exclude})
                if (fp32_acc - acc, k) < best[:2]:
                    best = (fp32_acc - acc, k, path, acc, exclude)
                if not over(k):
                    break
        drop, _, path, acc, exclude = best
        if over(len(exclude)):
            # Over budget whatever we keep in float: keep the fully quantized model (the smallest and
            # fastest) rather than a half-float one that is still over budget; the report says so.
            drop, _, path, acc, exclude = first
        shutil.copyfile(path, out_path)
        return Int8Result(
            path=str(out_path),
            budget=max_accuracy_drop,
            budget_met=not over(len(exclude)),
            fp32_accuracy=fp32_acc,
            int8_accuracy=acc,
            guard_images=len(guard_y),
            excluded_nodes=exclude,
            attempts=attempts,
            preprocess=pre_info,
            drop_stats={k: v for k, v in stats_of[len(exclude)].items() if k != "over"},
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
