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
   split (validation images, never the test split the parity gate reports on).
   Over budget, nodes are ranked by how much quantization noise they add (the
   drop in signal-to-quantization-noise ratio from their input to their output,
   float model vs QDQ model on a few images) and the worst are kept in float
   (`nodes_to_exclude`), 1, 2, 4, ... nodes, until the budget holds or
   `max_excluded_nodes` is reached. Then the result says the budget cannot be met and
   the fully quantized model is kept (a half-float model over budget would be neither
   small nor accurate); the parity gate judges it on the test split.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import shutil
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx

from exporters.calibration import ArrayCalibrationReader
from pipeline.errors import EdgekilnError

log = logging.getLogger("edgekiln")

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
_WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


class QuantizationError(EdgekilnError):
    pass


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

    @property
    def accuracy_drop(self) -> float:
        return self.fp32_accuracy - self.int8_accuracy

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("path")
        d["accuracy_drop"] = self.accuracy_drop
        return d


def _session(path: Path, threads: int | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def run_onnx(path: Path, x: np.ndarray, batch: int = 64) -> np.ndarray:
    sess = _session(path)
    name = sess.get_inputs()[0].name
    outs = [sess.run(None, {name: x[i : i + batch]})[0] for i in range(0, len(x), batch)]
    return np.concatenate(outs).astype(np.float32) if outs else np.zeros((0, 0), np.float32)


def preprocess_for_quantization(src: Path, dst: Path) -> dict:
    """onnxruntime's recommended pre-processing; falls back to ONNX shape inference only
    when symbolic shape inference cannot handle the graph."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        with _quiet():
            quant_pre_process(str(src), str(dst), skip_symbolic_shape=False)
        return {"quant_pre_process": True, "symbolic_shape_inference": True}
    except Exception as e:  # symbolic shape inference fails on some exotic ops
        log.info("quant_pre_process with symbolic shape inference failed (%s); retrying without", e.__class__.__name__)
        with _quiet():
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
    with _quiet():
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


def _sqnr(ref: np.ndarray, x: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB (higher is better; 100 for identical tensors)."""
    noise = float(np.linalg.norm((ref - x).ravel()))
    signal = float(np.linalg.norm(ref.ravel()))
    if noise == 0.0:
        return 100.0
    return 20 * math.log10(max(signal, 1e-12) / noise)


def _with_all_outputs(path: Path, names: list[str], dst: Path) -> None:
    m = onnx.load(str(path))
    have = {o.name for o in m.graph.output}
    for n in names:
        if n not in have:
            m.graph.output.append(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None))
    onnx.save(m, str(dst))


def rank_sensitive_nodes(float_path: Path, qdq_path: Path, x: np.ndarray, work: Path) -> list[tuple[str, float]]:
    """Nodes of the float model ranked by the SQNR they lose under quantization (worst first).

    For a node, loss = SQNR(its activation input) - SQNR(its output), both measured between
    the float model and the QDQ model on `x`: the noise the node's own quantization adds.
    """
    fm = onnx.load(str(float_path), load_external_data=False)
    float_tensors = {vi.name for vi in [*fm.graph.value_info, *fm.graph.output]
                     if vi.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
    qm = onnx.load(str(qdq_path), load_external_data=False)
    qdq_produced = {o for n in qm.graph.node for o in n.output}
    shared = sorted(t for t in float_tensors if t in qdq_produced)
    fa, qa = work / "float_all.onnx", work / "qdq_all.onnx"
    _with_all_outputs(float_path, shared, fa)
    _with_all_outputs(qdq_path, shared, qa)
    fs, qs = _session(fa), _session(qa)
    name = fs.get_inputs()[0].name
    f_out = dict(zip([o.name for o in fs.get_outputs()], fs.run(None, {name: x})))
    q_out = dict(zip([o.name for o in qs.get_outputs()], qs.run(None, {name: x})))
    sqnr = {t: _sqnr(f_out[t], q_out[t]) for t in shared if t in f_out and t in q_out}
    graph_inputs = {i.name for i in fm.graph.input}
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
        if out not in sqnr:
            continue
        src = node.input[0]
        before = 100.0 if src in graph_inputs else sqnr.get(src, 100.0)
        ranked.append((node.name, before - sqnr[out]))
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
    input_name = _session(fp32_path).get_inputs()[0].name
    work = Path(tempfile.mkdtemp(prefix=".int8-", dir=Path(out_path).parent))
    try:
        pre = work / "pre.onnx"
        pre_info = preprocess_for_quantization(fp32_path, pre)
        fp32_acc = float((run_onnx(fp32_path, guard_x).argmax(1) == guard_y).mean())

        def attempt(exclude: list[str]) -> tuple[Path, float]:
            dst = work / f"int8-{len(exclude)}.onnx"
            quantize_qdq(pre, dst, calibration, input_name, method, per_channel, exclude, op_types_to_keep_float)
            acc = float((run_onnx(dst, guard_x).argmax(1) == guard_y).mean())
            log.info("int8: %d node(s) kept in float: accuracy %.4f (fp32 %.4f)", len(exclude), acc, fp32_acc)
            return dst, acc

        attempts = []
        path, acc = attempt([])
        attempts.append({"excluded": 0, "accuracy": acc, "accuracy_drop": fp32_acc - acc})
        best = first = (fp32_acc - acc, 0, path, acc, [])
        if fp32_acc - acc > max_accuracy_drop + 1e-12 and max_excluded_nodes > 0:
            ranked = rank_sensitive_nodes(pre, path, guard_x[:sensitivity_images], work)
            cap = min(max_excluded_nodes, len(ranked))
            steps = sorted({min(2**i, cap) for i in range(cap.bit_length() + 1)} - {0})
            for k in steps:
                exclude = [n for n, _ in ranked[:k]]
                path, acc = attempt(exclude)
                attempts.append({"excluded": k, "accuracy": acc, "accuracy_drop": fp32_acc - acc, "nodes": exclude})
                if (fp32_acc - acc, k) < best[:2]:
                    best = (fp32_acc - acc, k, path, acc, exclude)
                if fp32_acc - acc <= max_accuracy_drop + 1e-12:
                    break
        drop, _, path, acc, exclude = best
        if drop > max_accuracy_drop + 1e-12:
            # Over budget whatever we keep in float: keep the fully quantized model (the smallest and
            # fastest) rather than a half-float one that is still over budget; the report says so.
            drop, _, path, acc, exclude = first
        shutil.copyfile(path, out_path)
        return Int8Result(
            path=str(out_path),
            budget=max_accuracy_drop,
            budget_met=drop <= max_accuracy_drop + 1e-12,
            fp32_accuracy=fp32_acc,
            int8_accuracy=acc,
            guard_images=len(guard_y),
            excluded_nodes=exclude,
            attempts=attempts,
            preprocess=pre_info,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


@contextlib.contextmanager
def _quiet():
    sink = io.StringIO()
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer logs every tensor it skips at INFO/WARNING
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)
