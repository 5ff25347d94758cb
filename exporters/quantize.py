"""ONNX INT8: onnxruntime static quantization (QDQ, per-channel INT8 weights,
UINT8 activations), guarded by an accuracy budget.

    result = quantize_int8(fp32, out, calib, guard_x, guard_y, max_accuracy_drop=0.01)

1. `quant_pre_process` (symbolic + ONNX shape inference and onnxruntime's basic
   graph optimizations): BatchNorm folds into Conv so the weights that get
   quantized are the folded ones, and every tensor has the shape the quantizer needs.
   https://onnxruntime.ai/docs/performance/model-optimizations/quantization.html#pre-processing
2. `quantize_static` in QDQ format. Clip(0,6)/Relu right after a quantized Conv
   are removed by the QDQ quantizer (the UINT8 range of the Conv output already
   clamps), so EfficientNet-Lite's Conv+ReLU6 runs as one integer conv. Weights in 7 bits by
   default (`reduce_range`; see quantize_qdq): 8-bit ones saturate the x86 kernels without VNNI.
3. Bias correction (exporters.bias_correction; `bias_correction=True`): each Conv/Gemm's bias loses the
   mean output shift its rounded weights cause on the calibration images, and the model is quantized
   again with the cached ranges; kept when its logits on the guard split are not further from the FP32
   model's (mean |difference|: `_closer`).
4. The accuracy guard: accuracy of the INT8 model vs the FP32 model on a guard
   split (validation images, never the test split the parity gate reports on), judged like
   the parity gate judges it (exporters.stats): over budget only when the lower bound of the
   drop's paired 95% interval is above the budget, so a flip or two on a small split is not
   chased. With `min_decision_agreement` (the gate's decision floor) it also holds the decisions,
   label or unknown through bundle.json's `trust` (exporters.decisions), to that floor by the Wilson
   upper bound, as the gate does. Over budget, nodes are ranked two ways, taken in turn: by how far their
   INT8 weights alone move the logits (exporters.bias_correction.rank_by_weight_error) and by how much
   quantization noise they add (the drop in signal-to-quantization-noise ratio from their input to their
   output, float model vs QDQ model on a few images; exporters.sensitivity); the worst are kept in float
   (`nodes_to_exclude`), each with the node feeding it through a Relu/Clip
   (sensitivity.with_activation_producers), 1, 2, 4, ... nodes, until the budget holds or
   `max_excluded_nodes` is reached. Then the result says the budget cannot be met and
   the fully quantized model is kept (a half-float model over budget would be neither
   small nor accurate); the parity gate judges it on the test split.
5. Adaptive rounding (exporters.adaround), on the nodes the guard left quantized: each convolution weight
   is rounded up or down so that every node's output on the calibration images stays closest to the float
   model's, and the model is quantized again from those weights, without bias correction; kept, and
   judged again, when its logits on the guard split are closer to the FP32 model's. `rounding="auto"` (the
   default) skips it when every guard image already gets the FP32 model's label and decision, "adaptive"
   always runs it, "nearest" never.

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

from exporters.adaround import ADAROUND_IMAGES, adaptive_rounding, apply_rounding
from exporters.bias_correction import apply_shifts, bias_shifts, rank_by_weight_error
from exporters.calibration import ImageSource, SourceCalibrationReader, as_source
from exporters.decisions import same_decisions
from exporters.sensitivity import onnx_input_name, rank_sensitive_nodes, with_activation_producers
from exporters.stats import DropStats, agreement_interval, paired_drop
from exporters.errors import QuantizationError  # noqa: F401  (raised here; importable from here as before)
from exporters.quiet import quiet
from exporters.resources import require_memory
from runtime.backends.ort import onnx_runner
from runtime.bundle import Trust

log = logging.getLogger("edgekiln")

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
    min_decision_agreement: float | None = None  # the floor the guard held the decisions to (None: not judged)
    decision_agreement: float | None = None  # the kept model's decisions vs the FP32 model's, guard split
    decision_interval: list[float] | None = None  # its Wilson 95% interval
    bias_correction: dict = field(default_factory=dict)  # nodes corrected, used or not, the first attempt without / with it
    rounding: dict = field(default_factory=dict)  # adaptive rounding: what it did, used or not, the attempt before / with it

    @property
    def accuracy_drop(self) -> float:
        return self.fp32_accuracy - self.int8_accuracy

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("path")
        d["accuracy_drop"] = self.accuracy_drop
        return d


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
    reduce_range: bool = True,
) -> None:
    """One quantize_static run (QDQ, S8 weights, U8 activations) of a pre-processed model.

    `reduce_range` quantizes the weights to 7 bits (-64..63). onnxruntime's x86 kernels for U8 x S8
    (VPMADDUBSW on SSE4.1/AVX2/AVX-512 without VNNI) add pairs of products in int16 and saturate when
    |a1*w1 + a2*w2| > 32767, which 8-bit weights and full-range activations reach: the digits demo's
    EfficientNet-Lite0 lost 12 points on this AVX2 CPU where the same QDQ file, run without the integer
    kernels, lost 3.7 (bench/RESULTS.md, "INT8 regression (issues 14/17)"). 7-bit weights cannot
    saturate, cost no speed, and onnxruntime's quantize_static docs advise them for CPUs without VNNI;
    the bundle does not know which CPU will serve it, so they are the default.

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
            reduce_range=reduce_range,
            calibrate_method=methods[method],
            nodes_to_exclude=sorted(set(exclude)),
            op_types_to_quantize=list(op_types_to_quantize) if op_types_to_quantize else None,
            # One batch per collect step: ranges (or histograms) are reduced after every batch.
            extra_options={"CalibStridedMinMax": 1} if reader is not None else {},
            calibration_cache_path=str(calibration_cache) if calibration_cache is not None else None,
        )


@dataclass
class _Attempt:
    """One quantized model judged by the guard."""

    path: Path
    excluded: list[str]
    accuracy: float
    stats: DropStats
    decision_agreement: float | None
    decision_interval: tuple[float, float] | None
    over: bool
    logit_error: float  # mean |logit - FP32 logit| on the guard split
    same_answers: bool  # every guard image gets the FP32 model's label (and decision, when judged)

    def record(self, fp32_accuracy: float) -> dict:
        d = {"excluded": len(self.excluded), "accuracy": self.accuracy, "accuracy_drop": fp32_accuracy - self.accuracy,
             "logit_error": self.logit_error}
        if self.decision_agreement is not None:
            d["decision_agreement"] = self.decision_agreement
        return {**d, "nodes": self.excluded} if self.excluded else d


def _closer(a: _Attempt, b: _Attempt) -> bool:
    """Whether `a`'s logits are at least as close to the FP32 model's as `b`'s on the guard split. The mean
    |difference| over every image and class, not the decisions: on a few hundred images the decisions of two
    variants differ by one or two flips, which is noise, while the mean logit error moves with every image
    (the digits demo student: bias correction and adaptive rounding both at 100 % / 99.6 % of validation
    decisions, 0.072 and 0.062 mean |dlogit|)."""
    return a.logit_error <= b.logit_error


class _Guard:
    """Judges a quantized model on the guard split the way the parity gate judges the test split: the
    accuracy drop over budget only when its paired interval's lower bound is (exporters.stats), and with a
    decision floor, the decisions (label or unknown, through `trust`) of the FP32 model and the INT8 one
    agreeing less than the floor only when the Wilson upper bound is below it (exporters.decisions)."""

    def __init__(self, x: ImageSource, y: np.ndarray, fp32_logits: np.ndarray, batch: int, budget: float,
                 floor: float | None, trust: "Trust | None"):
        self.x, self.y, self.fp32_logits, self.batch = x, y, fp32_logits, batch
        self.budget, self.floor, self.trust = budget, floor, trust
        self.fp32_right = fp32_logits.argmax(1) == y
        self.fp32_accuracy = float(self.fp32_right.mean())

    def judge(self, path: Path, excluded: list[str]) -> _Attempt:
        logits = run_onnx(path, self.x, batch=self.batch)
        right = logits.argmax(1) == self.y
        stats = paired_drop(self.fp32_right, right)
        over, agreement, interval, said = stats.exceeds(self.budget), None, None, ""
        if self.floor is not None:
            same = same_decisions(self.fp32_logits, logits, self.trust)
            agreement, interval = float(same.mean()), agreement_interval(int(same.sum()), len(same))
            over = over or interval[1] < self.floor - 1e-12
            said = f"; decisions agree {agreement:.2%} [{interval[0]:.2%}, {interval[1]:.2%}], floor {self.floor:.0%}"
        error = float(np.abs(logits - self.fp32_logits).mean())
        same = bool(np.all(logits.argmax(1) == self.fp32_logits.argmax(1))) and agreement in (None, 1.0)
        log.info("int8: %d node(s) kept in float: accuracy %.4f (fp32 %.4f; %s%s; mean |dlogit| %.3f)", len(excluded),
                 right.mean(), self.fp32_accuracy, stats.describe(), said, error)
        return _Attempt(path, excluded, float(right.mean()), stats, agreement, interval, over, error, same)


def _exclusion_steps(cap: int) -> list[int]:
    """1, 2, 4, ... nodes kept in float, ending at `cap`."""
    return sorted({min(2**i, cap) for i in range(cap.bit_length() + 1)} - {0})


def _interleave(*rankings: list[tuple[str, float]]) -> list[str]:
    """Node names taken in turn from each ranking, each name once."""
    out: dict[str, None] = {}
    for tier in zip(*[[name for name, _ in r] for r in rankings]):
        out.update(dict.fromkeys(tier))
    for r in rankings:  # the longer rankings' tails
        out.update(dict.fromkeys(name for name, _ in r))
    return list(out)


def _float_sets(pre: Path, ranked: list[str], cap: int) -> list[list[str]]:
    """The node sets the guard tries in float: the top 1, 2, 4, ... of `ranked`, each with the nodes that
    feed it through a Relu/Clip (sensitivity.with_activation_producers), at most `cap` nodes, each set once."""
    graph = onnx.load(str(pre), load_external_data=False).graph  # read once, not per set
    sets: list[list[str]] = []
    for k in _exclusion_steps(min(cap, len(ranked))):
        names = with_activation_producers(graph, ranked[:k])
        while len(names) > cap and k > 1:
            k -= 1
            names = with_activation_producers(graph, ranked[:k])
        if len(names) <= cap and (not sets or set(names) != set(sets[-1])):
            sets.append(names)
    return sets


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
    reduce_range: bool = True,
    min_decision_agreement: float | None = None,
    trust: "Trust | None" = None,
    bias_correction: bool = True,
    rounding: str = "auto",
) -> Int8Result:
    """Quantize `fp32_path` to `out_path`; keep the fewest sensitive nodes in float that bring the accuracy
    drop on (guard_x, guard_y) within `max_accuracy_drop` and, with `min_decision_agreement`, the decisions
    (label or unknown through `trust`; labels alone without it) to that floor, or report (budget_met=False)
    that it can't. Images may be arrays or ImageSources (preprocessed a batch at a time)."""
    calibration, guard_x = as_source(calibration), as_source(guard_x)
    guard_y = np.asarray(guard_y)
    if len(calibration) == 0:
        raise QuantizationError("INT8 calibration needs at least one image (export.calibration_size)")
    if len(guard_x) != len(guard_y) or len(guard_x) == 0:
        raise QuantizationError("INT8 accuracy guard needs labeled images (the validation split is empty)")
    input_name = onnx_input_name(fp32_path)
    work = Path(tempfile.mkdtemp(prefix=".int8-", dir=Path(out_path).parent))
    try:
        pre = work / "pre.onnx"
        pre_info = preprocess_for_quantization(fp32_path, pre)
        plan = plan_memory(pre)  # refuses here, before calibration, when the model cannot fit
        pre_info = {**pre_info, "memory": plan.to_dict(), "reduce_range": reduce_range}
        guard = _Guard(guard_x, guard_y, run_onnx(fp32_path, guard_x, batch=plan.batch), plan.batch,
                       max_accuracy_drop, min_decision_agreement, trust)

        shifts: dict[str, np.ndarray] = {}
        rounded: dict[str, np.ndarray] = {}

        def quantize(exclude: list[str]) -> _Attempt:
            # The nodes kept in float keep their own weights and bias: they are exact. The corrected and rounded
            # models reuse the first model's calibrated ranges (the cache): their changes are a fraction of them.
            if rounded:
                src, tag = apply_rounding(pre, work / "pre-rounded.onnx", rounded, exclude), "-rounded"
            elif shifts:
                src, tag = apply_shifts(pre, work / "pre-corrected.onnx", shifts, exclude), "-corrected"
            else:
                src, tag = pre, ""
            return guard.judge(write(src, work / f"int8-{len(exclude)}{tag}.onnx", exclude), exclude)

        def write(src: Path, dst: Path, exclude: list[str]) -> Path:
            quantize_qdq(src, dst, calibration, input_name, method, per_channel, exclude, op_types_to_keep_float,
                         op_types_to_quantize, calibration_cache=work / "calibration.json", batch_size=plan.batch,
                         reduce_range=reduce_range)
            return dst

        def quantize_plain(exclude: list[str]) -> Path:
            """Nearest rounding, no bias correction: the grid adaptive rounding starts from (the first attempt's
            file when no node is kept in float)."""
            if not exclude:
                return work / "int8-0.onnx"
            return write(pre, work / f"int8-{len(exclude)}-nearest.onnx", exclude)

        attempts = [quantize([])]
        correction: dict = {}
        if bias_correction:
            shifts.update(bias_shifts(pre, attempts[0].path, calibration, plan.batch))
            correction = {"nodes": len(shifts), "used": False}
            if shifts:
                log.info("int8: bias correction of %d node(s) (Nagel et al. 2019), quantized again", len(shifts))
                corrected = quantize([])
                # Kept only when its logits are not further from the FP32 model's on the guard split.
                correction.update({"used": _closer(corrected, attempts[0]),
                                   "without": attempts[0].record(guard.fp32_accuracy),
                                   "with": corrected.record(guard.fp32_accuracy)})
                if correction["used"]:
                    attempts = [corrected]
                else:
                    shifts.clear()
        if attempts[0].over and max_excluded_nodes > 0:
            n = min(sensitivity_images, len(guard_x))
            probe = guard_x.slice(0, n)
            # Two rankings taken in turn: by how far a node's INT8 weights alone move the logits, and by the
            # quantization noise it adds (activations included).
            ranked = _interleave(rank_by_weight_error(pre, attempts[0].path, probe, work),
                                 rank_sensitive_nodes(pre, attempts[0].path, ImageSource(array=probe),
                                                      batch_size=max(1, min(4, plan.batch))))
            for names in _float_sets(pre, ranked, max_excluded_nodes):
                attempts.append(quantize(names))
                if not attempts[-1].over:
                    break
        # Over budget whatever we keep in float: keep the fully quantized model (the smallest and fastest)
        # rather than a half-float one that is still over budget; the report and the parity gate say so.
        kept = attempts[-1] if not attempts[-1].over else attempts[0]
        adaptive: dict = {}
        if rounding == "auto" and kept.same_answers:
            # Nothing the guard split can show to fix, and it costs minutes on a CPU (bench/RESULTS.md).
            adaptive = {"skipped": "every validation image already gets the FP32 model's answer"}
            log.info("int8: adaptive rounding skipped: %s", adaptive["skipped"])
        elif rounding in ("auto", "adaptive"):
            # Last, on the nodes the guard left quantized: the rounding of each node makes up for what the
            # quantized nodes before it left, so it is chosen once the float nodes are known (rounding first
            # and keeping nodes in float afterwards undid it: the demo teacher's logit error 0.22 -> 0.93).
            # Its grid and ranges are those of the nearest-rounded model with the same nodes in float.
            shifts.clear()  # the rounding holds each channel's mean already: no bias correction on top
            base = quantize_plain(kept.excluded)
            log.info("int8: adaptive rounding of the convolution weights (AdaRound) on %d calibration images",
                     min(len(calibration), ADAROUND_IMAGES))
            chosen, rep = adaptive_rounding(pre, base, calibration, work, reduce_range=reduce_range,
                                            io_batch=plan.batch, memory_budget=ACTIVATION_BUDGET)
            adaptive = {**rep.to_dict(), "used": False}
            if chosen:
                rounded.update(chosen)
                candidate = quantize(kept.excluded)
                adaptive.update({"used": _closer(candidate, kept), "before": kept.record(guard.fp32_accuracy),
                                 "with": candidate.record(guard.fp32_accuracy)})
                if adaptive["used"]:
                    attempts.append(candidate)
                    kept = candidate
        shutil.copyfile(kept.path, out_path)
        return Int8Result(
            path=str(out_path), budget=max_accuracy_drop, budget_met=not kept.over,
            fp32_accuracy=guard.fp32_accuracy, int8_accuracy=kept.accuracy, guard_images=len(guard_y),
            excluded_nodes=kept.excluded, attempts=[a.record(guard.fp32_accuracy) for a in attempts],
            preprocess=pre_info, drop_stats=kept.stats.to_dict(), min_decision_agreement=min_decision_agreement,
            decision_agreement=kept.decision_agreement,
            decision_interval=list(kept.decision_interval) if kept.decision_interval else None,
            bias_correction=correction, rounding=adaptive,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
