"""Adaptive rounding of INT8 convolution weights (AdaRound: Nagel et al. 2020, "Up or Down? Adaptive
Rounding for Post-Training Quantization", ICML, https://arxiv.org/abs/2004.10568), for the QDQ models
onnxruntime's quantizer writes (exporters.quantize).

    weights, report = adaptive_rounding(pre, qdq, calibration, work)
    apply_rounding(pre, pre_rounded, weights)   # then quantize pre_rounded as before

onnxruntime rounds every weight to its nearest level. Nearest is not best: a depthwise 3x3 channel
holds 9 weights, so their rounding errors do not average out, and the errors of 49 layers compound.
On the digits demo's EfficientNet-Lite0 that left 5 % of the decisions changed even with bias
correction (bench/RESULTS.md, eleventh session). AdaRound chooses, for each weight, rounding down or up
so that the node's output on calibration images stays closest to the float model's:

- per node, a soft choice h(V) in [0, 1] per weight (a rectified sigmoid), the weight w ~ s * (floor(w/s)
  + h(V)), trained with Adam on || f(W x_float) - f(W~ x_quant) ||^2 plus a term that pushes every h to
  0 or 1 (its exponent annealed from 20 to 2, after 20 % of the iterations without it), then h rounded;
- f includes the Relu/Clip after the node, as the QDQ model fuses it;
- x_quant is the node's input in the QDQ model whose earlier nodes already hold their chosen weights, with
  the activations quantized as onnxruntime quantizes them (the paper's "asymmetric" reconstruction): each
  node corrects what the nodes before it and the activation rounding left, not only its own weights.
  With float inputs instead, the demo teacher's INT8 logits stayed twice as far from the FP32 model's
  (mean |dlogit| on test 0.41 with bias correction, against 0.22; nearest rounding: 1.08).

The chosen integers are written back as float weights on onnxruntime's own grid (integer x the scale its
quantizer computed, each channel's largest weight kept where it was, so the scale does not move): the
quantizer reads them and writes exactly those integers, and nothing downstream changes (the QDQ format,
the runtime, the kernels). Bias correction is not applied on top: the reconstruction loss already holds
each channel's mean, and correcting again made the demo teacher worse (0.30 vs 0.22).

Why by hand: onnxruntime's quantizer has no AdaRound, nor NNCF's ONNX backend. AIMET's aimet-onnx has one,
but it optimises inside its own quantization simulator (QuantizationSimModel) whose encodings are not the
file onnxruntime's quantizer writes, and it brings an 85 MB wheel with bokeh, hvplot and pandas. The
algorithm itself is ~100 lines of PyTorch.

Cost and memory: one pass of the float model and one of the QDQ model per node over the images (at most
`max_images`, fewer for a node whose input would not fit in `memory_budget`), and `iterations` steps on
`batch` images, on a window of at most `window` x `window` output positions, so a step costs the same at
224 px as at 96 px. Only Conv nodes with per-channel symmetric INT8 weights are rounded; others keep
nearest rounding.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from exporters.calibration import ImageSource, as_source
from exporters.sensitivity import onnx_input_name, with_outputs
from runtime.backends.ort import open_onnx

log = logging.getLogger("edgekiln")

# The rectified sigmoid's stretch (the paper's zeta and gamma): h reaches exactly 0 and 1.
_ZETA, _GAMMA = 1.1, -0.1
_REG = 0.01  # weight of the term that pushes each soft choice to 0 or 1 (the paper's lambda)
_BETA = (20.0, 2.0)  # its exponent, annealed over the iterations after the warm-up
_WARMUP = 0.2  # the share of the iterations without that term
_STEP_MACS = 128_000_000  # most multiply-adds of one step's forward pass (see _round_node)
_MIN_STEP_IMAGES = 4
ADAROUND_IMAGES = 256  # most calibration images the rounding fits on (evenly spread over a larger set)


@dataclass
class RoundingReport:
    """What adaptive rounding did: per node the output error with nearest and with chosen rounding."""

    nodes: int = 0
    skipped: int = 0
    iterations: int = 0
    images: int = 0
    changed_weights: int = 0  # weights rounded the other way than nearest
    weights: int = 0
    error_ratio: float = 1.0  # median over nodes of (error with chosen rounding) / (error with nearest)
    seconds: float = 0.0
    per_node: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("per_node")
        return d


@dataclass(frozen=True)
class _Target:
    """One Conv node to round: its float weight and bias, its attributes, the QDQ model's grid."""

    node: onnx.NodeProto
    weight: np.ndarray
    bias: np.ndarray | None
    scale: np.ndarray  # per output channel, as the quantizer computed it
    int_name: str  # the QDQ model's integer weight initializer
    qdq_input: str  # the node's input tensor in the QDQ model (after its DequantizeLinear)
    clamp: tuple[float | None, float | None] | None  # the Relu/Clip after it, fused by the QDQ model


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _clamp_after(node: onnx.NodeProto, consumers: dict, init: dict) -> tuple | None:
    nxt = consumers.get(node.output[0], [])
    if len(nxt) != 1 or nxt[0].op_type not in ("Relu", "Clip"):
        return None
    if nxt[0].op_type == "Relu":
        return (0.0, None)
    a = _attrs(nxt[0])
    bounds = [a.get("min"), a.get("max")]  # opset < 11 keeps them as attributes
    for i in (1, 2):
        if len(nxt[0].input) > i and nxt[0].input[i]:
            if nxt[0].input[i] not in init:
                return None  # computed bounds: leave the node alone
            bounds[i - 1] = float(numpy_helper.to_array(init[nxt[0].input[i]]))
    return (bounds[0], bounds[1])


def _targets(float_path: Path, qdq_path: Path, levels: int) -> tuple[list[_Target], int]:
    """The Conv nodes whose INT8 weights are per-channel, symmetric on [-levels, levels] (zero point 0)."""
    fm = onnx.load(str(float_path), load_external_data=True)
    qm = onnx.load(str(qdq_path), load_external_data=True)
    finit = {t.name: t for t in fm.graph.initializer}
    qinit = {t.name: t for t in qm.graph.initializer}
    qnodes = {n.name: n for n in qm.graph.node}
    qprod = {o: n for n in qm.graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in fm.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    out, skipped = [], 0
    for node in fm.graph.node:
        if node.op_type != "Conv" or node.input[1] not in finit:
            continue
        a = _attrs(node)
        w = numpy_helper.to_array(finit[node.input[1]]).astype(np.float32)
        qn = qnodes.get(node.name)
        dq = qprod.get(qn.input[1]) if qn is not None else None
        ok = (w.ndim == 4 and a.get("auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET") and dq is not None
              and dq.op_type == "DequantizeLinear" and dq.input[0] in qinit and _attrs(dq).get("axis", 1) == 0)
        if ok:
            q = numpy_helper.to_array(qinit[dq.input[0]])
            scale = numpy_helper.to_array(qinit[dq.input[1]]).astype(np.float32)
            zero = numpy_helper.to_array(qinit[dq.input[2]]) if len(dq.input) > 2 and dq.input[2] else np.zeros(1)
            ok = (q.dtype == np.int8 and scale.shape == (w.shape[0],) and not np.any(zero)
                  and int(np.abs(q).max(initial=0)) <= levels)
        if not ok:
            skipped += 1
            continue
        bias = None
        if len(node.input) > 2 and node.input[2]:
            if node.input[2] not in finit:
                skipped += 1
                continue
            bias = numpy_helper.to_array(finit[node.input[2]]).astype(np.float32)
        out.append(_Target(node, w, bias, scale, dq.input[0], qn.input[0], _clamp_after(node, consumers, finit)))
    return out, skipped


def _capture(path: Path, tensors: list[str], images: ImageSource, n: int, batch: int,
             work: Path) -> dict[str, np.ndarray]:
    """`tensors` of the model at `path` on the first `n` images (the input itself when one is the input)."""
    input_name = onnx_input_name(path)
    wanted = [t for t in dict.fromkeys(tensors) if t != input_name]
    sess = None
    if wanted:
        probe = work / f".capture_{path.stem}.onnx"
        with_outputs(path, wanted, probe)
        sess = open_onnx(probe)
        probe.unlink(missing_ok=True)  # the session holds the model
    parts: dict[str, list[np.ndarray]] = {t: [] for t in tensors}
    seen = 0
    for x in images.batches(batch):
        if seen >= n:
            break
        x = x[: n - seen]
        values = dict(zip(wanted, sess.run(wanted, {input_name: x}))) if sess is not None else {}
        values[input_name] = x
        for t in parts:
            parts[t].append(np.asarray(values[t], dtype=np.float32))
        seen += len(x)
    del sess
    return {t: np.concatenate(v) for t, v in parts.items()}


def _spread(images: ImageSource, k: int) -> ImageSource:
    """At most `k` of the images, evenly spaced: the calibration set is in file order, often class by class,
    so its first `k` could be a few classes only."""
    if len(images) <= k:
        return images
    pick = np.linspace(0, len(images) - 1, k).round().astype(int)
    if images.array is not None:
        return ImageSource(array=images.array[pick])
    return ImageSource(paths=[images.paths[i] for i in pick], spec=images.spec)


def _bytes_per_image(path: Path) -> dict[str, int]:
    """Tensor name -> float32 bytes of one image's value, where the shape-inferred graph says."""
    graph = onnx.load(str(path), load_external_data=False).graph
    out = {}
    for vi in [*graph.input, *graph.value_info]:
        dims = vi.type.tensor_type.shape.dim[1:]
        if dims and all(d.HasField("dim_value") for d in dims):
            out[vi.name] = int(np.prod([d.dim_value for d in dims])) * 4
    return out


def _round_node(t: _Target, x_float: np.ndarray, x_quant: np.ndarray, levels: int, iterations: int,
                batch: int, window: int, seed: int) -> tuple[np.ndarray, float, float, int]:
    """The node's weights on the quantizer's grid, rounding chosen by AdaRound; with the output error of
    nearest and of the chosen rounding on the images, and how many weights moved off nearest."""
    import torch
    import torch.nn.functional as F

    a = _attrs(t.node)
    top, left, bottom, right = a.get("pads", [0, 0, 0, 0])
    stride, dilation = a.get("strides", [1, 1]), a.get("dilations", [1, 1])
    groups = a.get("group", 1)
    kh, kw = t.weight.shape[2:]
    xf = F.pad(torch.from_numpy(x_float), (left, right, top, bottom))
    xq = F.pad(torch.from_numpy(x_quant), (left, right, top, bottom))
    out_h = (xf.shape[2] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    out_w = (xf.shape[3] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    win_h, win_w = min(window, out_h), min(window, out_w)
    bias = torch.from_numpy(t.bias) if t.bias is not None else None
    lo, hi = t.clamp if t.clamp is not None else (None, None)

    def f(x: "torch.Tensor", w: "torch.Tensor") -> "torch.Tensor":
        y = F.conv2d(x, w, bias, stride=stride, dilation=dilation, groups=groups)
        return torch.clamp(y, lo, hi) if t.clamp is not None else y

    w = torch.from_numpy(t.weight)
    s = torch.from_numpy(t.scale).view(-1, 1, 1, 1)
    scaled = w / s
    floor = torch.floor(scaled)
    nearest = torch.clamp(torch.round(scaled), -levels, levels)
    # Each channel's largest weight stays at +-levels: the quantizer derives the scale from it.
    absmax = w.abs().amax(dim=(1, 2, 3), keepdim=True)
    pinned = w.abs() >= absmax
    rest = (scaled - floor).clamp(1e-4, 1 - 1e-4)
    v = torch.log((rest - _GAMMA) / (_ZETA - rest)).requires_grad_(True)  # h(v) == rest at the start

    def soft(v: "torch.Tensor") -> "torch.Tensor":
        return torch.clamp(torch.sigmoid(v) * (_ZETA - _GAMMA) + _GAMMA, 0, 1)

    def weights(choice: "torch.Tensor") -> "torch.Tensor":
        return torch.where(pinned, nearest, torch.clamp(floor + choice, -levels, levels)) * s

    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([v], lr=1e-2)
    warm = int(_WARMUP * iterations)
    n = xf.shape[0]
    # Shuffled once, then each step takes a run of `batch` images and a window: views, nothing copied
    # (indexing random images every step took half the step's time at 224 px).
    order = torch.randperm(n, generator=gen)
    xf, xq = xf[order], xq[order]
    # Fewer images a step for a wide node, so a step costs at most _STEP_MACS multiply-adds: the 224 px
    # EfficientNet-Lite0's 1x1 convolutions over 480-1152 channels at 7-14 px made the 224 px model take
    # 5 minutes; at 96 px (the digits demo) no node reaches the cap.
    macs = win_h * win_w * int(np.prod(t.weight.shape))
    b = max(1, min(batch, n, max(_MIN_STEP_IMAGES, _STEP_MACS // max(1, macs))))
    for it in range(iterations):
        first = int(torch.randint(0, n - b + 1, (1,), generator=gen))
        idx = slice(first, first + b)
        oy = int(torch.randint(0, out_h - win_h + 1, (1,), generator=gen))
        ox = int(torch.randint(0, out_w - win_w + 1, (1,), generator=gen))
        rows = slice(oy * stride[0], (oy + win_h - 1) * stride[0] + dilation[0] * (kh - 1) + 1)
        cols = slice(ox * stride[1], (ox + win_w - 1) * stride[1] + dilation[1] * (kw - 1) + 1)
        with torch.no_grad():
            target = f(xf[idx, :, rows, cols], w)
        loss = (f(xq[idx, :, rows, cols], weights(soft(v))) - target).square().sum(1).mean()
        if it >= warm:
            beta = _BETA[0] + (_BETA[1] - _BETA[0]) * (it - warm) / max(1, iterations - warm)
            loss = loss + _REG * (1 - (2 * soft(v) - 1).abs().pow(beta)).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        hard = (v >= 0).float()
        chosen = torch.where(pinned, nearest, torch.clamp(floor + hard, -levels, levels))
        xf, xq = xf[:16], xq[:16]  # the verdict on 16 whole images: enough to compare two roundings
        target = f(xf, w)
        err_near = float((f(xq, nearest * s) - target).square().mean())
        err_chosen = float((f(xq, chosen * s) - target).square().mean())
    if err_chosen > err_near:  # the optimisation did not help this node on its own images: keep nearest
        chosen, err_chosen = nearest, err_near
    return chosen.numpy().astype(np.int8), err_near, err_chosen, int((chosen != nearest).sum())


def adaptive_rounding(float_path: Path, qdq_path: Path, images: "np.ndarray | ImageSource", work: Path,
                      reduce_range: bool = True, iterations: int = 250, max_images: int = ADAROUND_IMAGES, batch: int = 32,
                      window: int = 16, memory_budget: int = 1_000_000_000, io_batch: int = 16,
                      seed: int = 0) -> tuple[dict[str, np.ndarray], RoundingReport]:
    """Float-model weight initializer name -> its weights rounded by AdaRound, on the grid of the QDQ model
    `qdq_path` that onnxruntime's quantizer wrote from the float model `float_path` (its pre-processed
    input). `images`: the calibration images. The nodes are rounded in graph order, each on its input in
    the QDQ model with the earlier nodes' choices in place."""

    started = time.perf_counter()
    levels = 64 if reduce_range else 127  # onnxruntime's symmetric INT8 weight grid (quant_utils)
    images = _spread(as_source(images), max_images)
    targets, skipped = _targets(Path(float_path), Path(qdq_path), levels)
    report = RoundingReport(skipped=skipped, iterations=iterations)
    if not targets or len(images) == 0:
        return {}, report
    qm = onnx.load(str(qdq_path), load_external_data=True)
    qinit = {t.name: t for t in qm.graph.initializer}
    current = Path(work) / ".adaround_qdq.onnx"
    rounded: dict[str, np.ndarray] = {}
    ratios = []
    sizes = _bytes_per_image(Path(float_path))
    room = memory_budget // 4  # float and quantized inputs and their padded copies

    def images_for(tensor: str) -> int:  # fewer images for a big input
        return int(min(max_images, len(images), room // max(1, sizes.get(tensor, room))))

    float_inputs: dict[str, np.ndarray] = {}
    try:
        for k, t in enumerate(targets):
            onnx.save(qm, str(current))  # the QDQ model with every earlier node's chosen integers
            name = t.node.input[0]
            if name not in float_inputs and name not in sizes:  # shape unknown: alone, cut to the room
                x = _capture(Path(float_path), [name], images, min(max_images, len(images)), io_batch, Path(work))[name]
                float_inputs[name] = x[: room // max(1, x[0].nbytes)]
                if not len(float_inputs[name]):
                    report.skipped += 1
                    continue
            if name not in float_inputs:
                # The float model's inputs do not depend on the rounding: those of the next nodes that take
                # as many images and fit together are captured in one pass.
                n, group, total = images_for(name), [], 0
                for u in targets[k:]:
                    size = n * sizes.get(u.node.input[0], room)
                    if group and (images_for(u.node.input[0]) != n or total + size > room):
                        break
                    group.append(u.node.input[0])
                    total += size
                if n < 1:
                    report.skipped += 1
                    continue
                float_inputs.update(_capture(Path(float_path), group, images, n, io_batch, Path(work)))
            x_float = float_inputs[name]
            if not any(u.node.input[0] == name for u in targets[k + 1:]):
                del float_inputs[name]
            x_quant = _capture(current, [t.qdq_input], images, len(x_float), io_batch, Path(work))[t.qdq_input]
            n = len(x_float)
            q, err_near, err_chosen, moved = _round_node(t, x_float, x_quant, levels, iterations, batch, window,
                                                         seed + k)
            del x_float, x_quant
            qinit[t.int_name].CopyFrom(numpy_helper.from_array(q, t.int_name))
            rounded[t.node.input[1]] = (q.astype(np.float32) * t.scale.reshape(-1, 1, 1, 1)).astype(np.float32)
            ratios.append(err_chosen / err_near if err_near > 0 else 1.0)
            report.nodes += 1
            report.images = max(report.images, n)
            report.changed_weights += moved
            report.weights += int(q.size)
            report.per_node.append({"node": t.node.name, "error_nearest": err_near, "error_chosen": err_chosen,
                                    "moved": moved, "images": n})
            log.debug("adaround %d/%d %s: output error %.3g -> %.3g, %d of %d weights moved", k + 1, len(targets),
                      t.node.name, err_near, err_chosen, moved, q.size)
            if (k + 1) % max(1, len(targets) // 4) == 0 and k + 1 < len(targets):  # progress, a line a quarter
                log.info("int8: adaptive rounding: %d of %d convolutions, %.0f s", k + 1, len(targets),
                         time.perf_counter() - started)
    finally:
        current.unlink(missing_ok=True)
    report.error_ratio = float(np.median(ratios)) if ratios else 1.0
    report.seconds = round(time.perf_counter() - started, 1)
    return rounded, report


def apply_rounding(src: Path, dst: Path, weights: dict[str, np.ndarray], skip: "list[str] | tuple" = ()) -> Path:
    """A copy of the float model `src` whose weights are the rounded ones, except those of the nodes in
    `skip` (kept in float by the guard: their weights stay exact)."""
    model = onnx.load(str(src), load_external_data=True)
    keep = {n.input[1] for n in model.graph.node if n.name in skip and len(n.input) > 1}
    for t in model.graph.initializer:
        if t.name in weights and t.name not in keep:
            t.CopyFrom(numpy_helper.from_array(weights[t.name], t.name))
    onnx.save(model, str(dst))
    return dst
