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

Bounded memory and time: calibration runs once (its ranges cached in a JSON file that every guard
attempt reuses: onnxruntime's `calibration_cache_path`), streams its images a batch at a time, and
reduces the ranges after every batch (`extra_options["CalibStridedMinMax"]` with a reader that
answers `len()`/`set_range()`), so its peak does not grow with the number of images: without it
onnxruntime keeps every batch's outputs until the end. The guard and the sensitivity ranking stream
too (the ranking sums signal and noise power per tensor, a batch at a time, over only the tensors it
compares). The batch is sized from the model's activation footprint and the memory available; a model
whose weights and one image's activations do not fit is refused before calibration starts.
Transformers quantize their MatMul/Gemm/Conv only (exporters.specs: `int8_op_types`), keeping
LayerNorm, Softmax and GELU in float.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx

from exporters.calibration import ImageSource, SourceCalibrationReader, as_source
from exporters.stats import paired_drop
from exporters.errors import QuantizationError  # noqa: F401  (raised here; importable from here as before)
from exporters.quiet import quiet
from exporters.resources import require_memory
from runtime.backends.ort import onnx_runner, open_onnx

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


def run_onnx(path: Path, x: "np.ndarray | ImageSource", batch: int = 64) -> np.ndarray:
    """Logits of an ONNX file (not in a bundle yet) on the CPU, in chunks of `batch` (images from an
    ImageSource are preprocessed a chunk at a time)."""
    sess = onnx_runner(path)
    outs = [sess.run(b) for b in as_source(x).batches(batch)]
    return np.concatenate(outs).astype(np.float32) if outs else np.zeros((0, 0), np.float32)


def _float_tensor_bytes(graph: onnx.GraphProto) -> tuple[int, int]:
    """(bytes of the weights, bytes of every float activation of one image) of a shape-inferred graph.
    The activation sum is an upper bound of what one image needs: onnxruntime reuses buffers."""
    weights = sum(int(np.prod(t.dims)) * 4 for t in graph.initializer)
    per_image = 0
    for vi in list(graph.value_info) + list(graph.output):
        tt = vi.type.tensor_type
        if tt.elem_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16) or not tt.HasField("shape"):
            continue
        dims = [d.dim_value if d.HasField("dim_value") else 1 for d in tt.shape.dim][1:]  # drop the batch axis
        per_image += int(np.prod(dims)) * (4 if tt.elem_type == onnx.TensorProto.FLOAT else 2) if dims else 0
    return weights, per_image


@dataclass(frozen=True)
class MemoryPlan:
    """How big a batch calibration and the guard use, from the model's footprint and the memory here."""

    weights_bytes: int
    activation_bytes_per_image: int
    batch: int

    def to_dict(self) -> dict:
        return {"weights_mb": round(self.weights_bytes / 1e6, 1),
                "activations_mb_per_image": round(self.activation_bytes_per_image / 1e6, 1), "batch": self.batch}


# Copies of the weights alive at once while quantizing: the float model's session, the augmented
# calibration model's session, the quantizer's in-memory model and the QDQ model it writes (whose float
# tensors it still holds), the PyTorch model of the caller.
_WEIGHT_COPIES = 5
# Activations of one image, counted once for the float model and once for the QDQ model (sensitivity).
_ACTIVATION_COPIES = 2


# Activations of a calibration/guard batch are kept under this, whatever the machine has: a bigger batch
# buys little speed on a CPU and the export's peak should not depend on the memory that happens to be free.
ACTIVATION_BUDGET = 1_000_000_000


def plan_memory(pre_path: Path, max_batch: int = 16, available: int | None = None) -> MemoryPlan:
    """The largest batch (<= max_batch) whose estimated activations fit in ACTIVATION_BUDGET and whose
    estimated peak fits in half the memory available; a MemoryBudgetError, before any calibration,
    when not even one image fits."""
    from exporters.resources import available_memory_bytes

    graph = onnx.load(str(pre_path), load_external_data=False).graph
    weights, per_image = _float_tensor_bytes(graph)
    have = available_memory_bytes() if available is None else available
    fixed = _WEIGHT_COPIES * weights
    one = fixed + _ACTIVATION_COPIES * per_image
    require_memory(one, f"INT8 quantization of {Path(pre_path).name} ({weights / 1e6:.0f} MB of weights, "
                   f"{per_image / 1e6:.0f} MB of activations per image)",
                   "lower model.input_size, or export without int8 (export.precisions: [fp32])", available=have)
    room = min(ACTIVATION_BUDGET, max(0, have // 2 - fixed))
    batch = int(max(1, min(max_batch, room // max(1, _ACTIVATION_COPIES * per_image))))
    return MemoryPlan(weights, per_image, batch)


def preprocess_for_quantization(src: Path, dst: Path) -> dict:
    """onnxruntime's recommended pre-processing; falls back to ONNX shape inference only
    when symbolic shape inference cannot handle the graph."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        with quiet(root_logger=True):
            quant_pre_process(str(src), str(dst), skip_symbolic_shape=False)
        return {"quant_pre_process": True, "symbolic_shape_inference": True}
    except OSError:  # disk full, permissions: retrying would only read back a half-written file
        raise
    except Exception as e:  # symbolic shape inference fails on some exotic ops
        log.info("quant_pre_process with symbolic shape inference failed (%s); retrying without", e.__class__.__name__)
        with quiet(root_logger=True):
            quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
        return {"quant_pre_process": True, "symbolic_shape_inference": False}


def quantize_qdq(
    src: Path,
    dst: Path,
    calibration: "np.ndarray | ImageSource | None",
    input_name: str,
    method: str = "minmax",
    per_channel: bool = True,
    nodes_to_exclude: list[str] | None = None,
    op_types_to_keep_float: tuple[str, ...] = (),
    op_types_to_quantize: tuple[str, ...] | None = None,
    calibration_cache: Path | None = None,
    batch_size: int | None = None,
) -> None:
    """One quantize_static run (QDQ, S8 weights, U8 activations) of a pre-processed model.

    With `calibration_cache`, the first run calibrates and saves the tensor ranges there; later runs
    read them and need no calibration images (`calibration` may then be None). Calibration streams a
    batch at a time and reduces the ranges after each batch (strided calibration)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    if method not in methods:
        raise QuantizationError(f"calibration method '{method}' is not one of {', '.join(methods)}")
    exclude = list(nodes_to_exclude or [])
    if op_types_to_keep_float:
        exclude += [n.name for n in onnx.load(str(src), load_external_data=False).graph.node
                    if n.op_type in op_types_to_keep_float]
    cached = calibration_cache is not None and Path(calibration_cache).is_file()
    reader = None
    if not cached:
        if calibration is None:
            raise QuantizationError("INT8 calibration needs images (no cached calibration ranges)")
        source = as_source(calibration)
        reader = SourceCalibrationReader(source, input_name, batch_size or min(8, len(source)))
    with quiet(root_logger=True):
        quantize_static(
            str(src),
            str(dst),
            reader,
            quant_format=QuantFormat.QDQ,
            per_channel=per_channel,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=methods[method],
            nodes_to_exclude=sorted(set(exclude)),
            op_types_to_quantize=list(op_types_to_quantize) if op_types_to_quantize else None,
            # One batch per collect step: ranges (or histograms) are reduced after every batch.
            extra_options={"CalibStridedMinMax": 1} if reader is not None else {},
            calibration_cache_path=str(calibration_cache) if calibration_cache is not None else None,
        )


def _with_outputs(src: Path, names: list[str], dst: Path) -> list[str]:
    """A copy of `src` that also outputs the tensors `names` (those it has); returns the ones added.
    Written beside `src`, so external weight data still resolves."""
    from onnx import helper

    model = onnx.load(str(src), load_external_data=False)
    outputs = {o.name for o in model.graph.output}
    have = {o for n in model.graph.node for o in n.output}
    added = [n for n in dict.fromkeys(names) if n in have and n not in outputs]
    model.graph.output.extend(helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in added)
    onnx.save(model, str(dst))
    return added + [n for n in dict.fromkeys(names) if n in outputs]


def rank_sensitive_nodes(float_path: Path, qdq_path: Path, x: "np.ndarray | ImageSource", work: Path,
                         batch_size: int = 4) -> list[tuple[str, float]]:
    """Nodes of the float model ranked by the SQNR they lose under quantization (worst first).

    For a node, loss = SQNR(its activation input) - SQNR(its output): the noise its own
    quantization adds. Each float tensor is compared with the QDQ model's tensor of the same name,
    i.e. *before* its own QuantizeLinear (the "pre_qdq" matching of onnxruntime's
    quantization.qdq_loss_debug), capped at 100 dB for identical tensors: the library's default
    comparison (float vs "post_qdq", and no cap, so an unquantized input scores ~300 dB) ranked
    the classifier first on the test model and kept one more node in float for the same accuracy.
    SQNR = 10 log10(sum f^2 / sum (f - q)^2), the signal and noise powers summed a batch at a time over
    only the tensors compared, so memory stays at one batch of those tensors whatever the image count
    (qdq_loss_debug.collect_activations keeps every tensor of every image).
    """
    fm = onnx.load(str(float_path), load_external_data=False)
    consumers: dict[str, list] = {}
    for node in fm.graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    # node -> (its activation input, the tensor where its quantized output is measured)
    probes: dict[str, tuple[str, list[str]]] = {}
    for node in fm.graph.node:
        if node.op_type not in _WEIGHTED_OPS or not node.output:
            continue
        out = node.output[0]
        nxt = consumers.get(out, [])
        # The QDQ quantizer removes a Relu/Clip that only follows a quantized node and renames the
        # node's output to the activation's: measure there when the node's own output is gone.
        alt = [nxt[0].output[0]] if len(nxt) == 1 and nxt[0].op_type in ("Relu", "Clip") else []
        probes[node.name] = (node.input[0], [out, *alt])
    wanted = [t for inp, outs in probes.values() for t in (inp, *outs)]
    paths = {}
    for tag, path in (("float", float_path), ("qdq", qdq_path)):
        paths[tag] = Path(path).with_name(f".{tag}_probes.onnx")
        added = _with_outputs(Path(path), wanted, paths[tag])
        if tag == "float":
            common = set(added)
        else:
            common &= set(added)
    names = sorted(common)
    sessions = {tag: open_onnx(p) for tag, p in paths.items()}
    input_name = _input_name(float_path)
    signal = dict.fromkeys(names, 0.0)
    noise = dict.fromkeys(names, 0.0)
    for batch in as_source(x).batches(batch_size):
        f = dict(zip(names, sessions["float"].run(names, {input_name: batch})))
        q = dict(zip(names, sessions["qdq"].run(names, {input_name: batch})))
        for n in names:
            a = f[n].astype(np.float64)
            signal[n] += float(np.square(a).sum())
            noise[n] += float(np.square(a - q[n]).sum())
    del sessions
    for p in paths.values():
        p.unlink(missing_ok=True)

    def sqnr(t: str) -> float:
        if t not in signal:
            return 100.0
        return 100.0 if noise[t] == 0 else min(100.0, 10 * np.log10(max(signal[t], 1e-30) / noise[t]))

    ranked = []
    for node, (inp, outs) in probes.items():
        out = next((o for o in outs if o in signal), None)
        if out is not None:
            ranked.append((node, sqnr(inp) - sqnr(out)))
    ranked.sort(key=lambda t: -t[1])
    return ranked


def quantize_int8(
    fp32_path: Path,
    out_path: Path,
    calibration: "np.ndarray | ImageSource",
    guard_x: "np.ndarray | ImageSource",
    guard_y: np.ndarray,
    max_accuracy_drop: float = 0.01,
    method: str = "minmax",
    per_channel: bool = True,
    max_excluded_nodes: int = 16,
    op_types_to_keep_float: tuple[str, ...] = (),
    sensitivity_images: int = 16,
    op_types_to_quantize: tuple[str, ...] | None = None,
) -> Int8Result:
    """Quantize `fp32_path` to `out_path`; exclude sensitive nodes until the accuracy drop on
    (guard_x, guard_y) is within `max_accuracy_drop`, or report (budget_met=False) that it can't.
    Images may be arrays or ImageSources (preprocessed a batch at a time)."""
    calibration, guard_x = as_source(calibration), as_source(guard_x)
    guard_y = np.asarray(guard_y)
    if len(calibration) == 0:
        raise QuantizationError("INT8 calibration needs at least one image (export.calibration_size)")
    if len(guard_x) != len(guard_y) or len(guard_x) == 0:
        raise QuantizationError("INT8 accuracy guard needs labeled images (the validation split is empty)")
    input_name = _input_name(fp32_path)
    work = Path(tempfile.mkdtemp(prefix=".int8-", dir=Path(out_path).parent))
    try:
        pre = work / "pre.onnx"
        pre_info = preprocess_for_quantization(fp32_path, pre)
        plan = plan_memory(pre)  # refuses here, before calibration, when the model cannot fit
        pre_info = {**pre_info, "memory": plan.to_dict()}
        cache = work / "calibration.json"
        fp32_right = run_onnx(fp32_path, guard_x, batch=plan.batch).argmax(1) == guard_y
        fp32_acc = float(fp32_right.mean())
        stats_of: dict[int, dict] = {}

        def attempt(exclude: list[str]) -> tuple[Path, float]:
            dst = work / f"int8-{len(exclude)}.onnx"
            quantize_qdq(pre, dst, calibration, input_name, method, per_channel, exclude, op_types_to_keep_float,
                         op_types_to_quantize, calibration_cache=cache, batch_size=plan.batch)
            right = run_onnx(dst, guard_x, batch=plan.batch).argmax(1) == guard_y
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
            n = min(sensitivity_images, len(guard_x))
            ranked = rank_sensitive_nodes(pre, path, ImageSource(array=guard_x.slice(0, n)), work,
                                          batch_size=max(1, min(4, plan.batch)))
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
