"""Empirical bias correction of INT8 weights, and the ranking of nodes by what their INT8 weights do
to the logits: the two tools the INT8 guard (exporters.quantize) uses besides keeping nodes in float.

Bias correction (Nagel et al. 2019, "Data-Free Quantization Through Weight Equalization and Bias
Correction", sec. 4.2, https://arxiv.org/abs/1906.04721): rounding a node's weights W to W_q shifts the
mean of its output by (W_q - W) applied to the mean of its input. Depthwise 3x3 convolutions hold 9
weights a channel, so their rounding errors do not average out and the shift is a bias, which
compounds through the network. Subtracting it from the node's bias, measured on the calibration images
through the float model, removes the systematic part of the error. onnxruntime's quantizer has no such
step; NNCF has one, but for onnxruntime artifacts its ONNX output was worse on the digits demo student
(bench/RESULTS.md, eighth session), so it is written here, on the graph the quantizer reads.

Only Conv (2-D, explicit pads) and Gemm carry a bias input; MatMul nodes (transformers add their bias in
a separate Add) are left as they are.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from exporters.calibration import ImageSource, as_source
from exporters.sensitivity import onnx_input_name, with_outputs
from runtime.backends.ort import open_onnx

_BIASED_OPS = ("Conv", "Gemm")


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def quantized_weights(qdq_path: Path) -> dict[str, np.ndarray]:
    """Node name -> its weight as the QDQ model computes with it (DequantizeLinear of the stored integers),
    for every Conv / Gemm / MatMul whose weight is quantized.

    onnxruntime's qdq_loss_debug.create_weight_matching computes the same values, but keyed by weight name
    with the float model beside it, after shape inference of both models and a Python loop per channel;
    the guard needs them per node, from the QDQ model alone, once per attempt."""
    graph = onnx.load(str(qdq_path), load_external_data=True).graph
    init = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    out = {}
    for node in graph.node:
        dq = producer.get(node.input[1]) if node.op_type in ("Conv", "Gemm", "MatMul") and len(node.input) > 1 else None
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in init:
            continue
        q = numpy_helper.to_array(init[dq.input[0]]).astype(np.float32)
        scale = numpy_helper.to_array(init[dq.input[1]]).astype(np.float32)
        zero = numpy_helper.to_array(init[dq.input[2]]).astype(np.float32) if len(dq.input) > 2 and dq.input[2] else 0.0
        shape = [1] * q.ndim
        if np.ndim(scale):  # per-channel: along the DequantizeLinear's axis
            shape[_attrs(dq).get("axis", 1) % q.ndim] = -1
        out[node.name] = (q - np.reshape(zero, shape)) * np.reshape(scale, shape)
    return out


def _correctable(node: onnx.NodeProto, weights: dict[str, np.ndarray]) -> bool:
    if node.op_type not in _BIASED_OPS or node.input[1] not in weights:
        return False
    if len(node.input) > 2 and node.input[2] and node.input[2] not in weights:
        return False  # a bias computed in the graph, not stored
    if node.op_type == "Conv":
        return weights[node.input[1]].ndim == 4 and _attrs(node).get("auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET")
    a = _attrs(node)
    # alpha / beta other than 1 are left alone: onnxruntime's quantizer rewrites beta to 1 when it quantizes
    # the bias (a Gemm with beta 0.5 moved by the whole of its corrected bias), and PyTorch exports 1 and 1.
    return (weights[node.input[1]].ndim == 2 and not a.get("transA", 0)
            and a.get("alpha", 1.0) == 1.0 and a.get("beta", 1.0) == 1.0)


def bias_shifts(float_path: Path, qdq_path: Path, images: "np.ndarray | ImageSource",
                batch_size: int = 8) -> dict[str, np.ndarray]:
    """Node name -> the shift of its output's per-channel mean that its INT8 weights cause, on `images`
    through the float model: mean over positions of conv(E[x], W_q - W) (Gemm: E[x] @ (W_q - W)).
    The mean input of each node is summed a batch at a time, so memory stays at one batch of them."""
    import torch  # the conv arithmetic (pads, strides, groups) as the model means it

    model = onnx.load(str(float_path), load_external_data=True)
    wq = quantized_weights(qdq_path)
    # Only the quantized nodes' weights and biases as arrays, not the whole model a second time.
    wanted = {i for n in model.graph.node if n.name in wq for i in n.input[1:3]}
    floats = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.name in wanted}
    input_name = onnx_input_name(Path(float_path))
    produced = {o for n in model.graph.node for o in n.output} | {input_name}
    nodes = [n for n in model.graph.node if n.name in wq and _correctable(n, floats) and n.input[0] in produced]
    if not nodes:
        return {}
    probe = Path(float_path).with_name(".bias_probe.onnx")
    names = with_outputs(Path(float_path), [n.input[0] for n in nodes], probe)
    try:
        sess = open_onnx(probe)
        sums: dict[str, np.ndarray] = {}
        count = 0
        for batch in as_source(images).batches(batch_size):
            count += len(batch)
            values = dict(zip(names, sess.run(names, {input_name: batch})) if names else {})
            values[input_name] = batch  # a node that reads the model's input
            for name, value in values.items():
                sums[name] = sums.get(name, 0.0) + value.astype(np.float64).sum(0)
        del sess
    finally:
        probe.unlink(missing_ok=True)
    shifts = {}
    for node in nodes:
        mean = sums[node.input[0]] / max(count, 1)
        dw = wq[node.name] - floats[node.input[1]]
        if node.op_type == "Conv":
            a = _attrs(node)
            top, left, bottom, right = a.get("pads", [0, 0, 0, 0])
            x = torch.nn.functional.pad(torch.tensor(mean, dtype=torch.float32)[None], (left, right, top, bottom))
            y = torch.nn.functional.conv2d(x, torch.tensor(dw, dtype=torch.float32), stride=a.get("strides", 1),
                                           dilation=a.get("dilations", 1), groups=a.get("group", 1))
            shifts[node.name] = y.mean((0, 2, 3)).numpy()
        else:  # Gemm, alpha = beta = 1 (_correctable)
            dw = dw.T if _attrs(node).get("transB", 0) else dw
            shifts[node.name] = (mean.reshape(1, -1) @ dw).ravel().astype(np.float32)
    return shifts


def apply_shifts(src: Path, dst: Path, shifts: dict[str, np.ndarray], skip: "list[str] | tuple" = ()) -> Path:
    """A copy of the float model `src` whose nodes' biases have their INT8 shift subtracted (a node
    without a bias gets one), except the nodes in `skip` (those kept in float keep their weights exact)."""
    model = onnx.load(str(src), load_external_data=True)
    init = {t.name: t for t in model.graph.initializer}
    users = {}
    for node in model.graph.node:
        for name in node.input:
            users[name] = users.get(name, 0) + 1
    for node in model.graph.node:
        if node.name not in shifts or node.name in skip:
            continue
        shift = shifts[node.name].astype(np.float32)
        if len(node.input) > 2 and node.input[2] and users[node.input[2]] == 1:
            t = init[node.input[2]]
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32) - shift, t.name))
        else:  # no bias, or one shared with another node: a bias of its own
            name = f"{node.name}_bias_corrected"
            base = numpy_helper.to_array(init[node.input[2]]).astype(np.float32) if len(node.input) > 2 and node.input[2] else 0.0
            model.graph.initializer.append(numpy_helper.from_array(base - shift, name))
            if len(node.input) > 2:
                node.input[2] = name
            else:
                node.input.append(name)
    onnx.save(model, str(dst))
    return dst


def rank_by_weight_error(float_path: Path, qdq_path: Path, x: np.ndarray, work: Path,
                         max_weight_bytes: int = 256 * 2**20) -> list[tuple[str, float]]:
    """Weighted nodes ranked by how far their INT8 weights alone move the logits (mean |delta|, the float
    model with that one node's weights replaced by the QDQ model's), worst first.

    This sees what a per-node noise ratio cannot: on the digits demo's EfficientNet-Lite0 the first two
    convolutions' weights moved the logits most, while by noise added the head-end nodes ranked first and
    keeping them in float changed nothing (bench/RESULTS.md, eleventh session). It writes and opens one
    model per node (3 s for Lite0's 50 nodes here), so models with more than `max_weight_bytes` of float
    weights (ViT-B/16: 344 MB) are not ranked this way: an empty list."""
    base = onnx.load(str(float_path), load_external_data=True)
    if sum(t.ByteSize() for t in base.graph.initializer) > max_weight_bytes:
        return []
    input_name = onnx_input_name(Path(float_path))
    ref = open_onnx(float_path).run(None, {input_name: x})[0]
    wq = quantized_weights(qdq_path)
    init = {t.name: t for t in base.graph.initializer}
    ranked = []
    path = Path(work) / ".weight_probe.onnx"
    try:
        for node in base.graph.node:
            if node.name not in wq or node.input[1] not in init:
                continue
            t = init[node.input[1]]
            original = onnx.TensorProto()
            original.CopyFrom(t)
            t.CopyFrom(numpy_helper.from_array(wq[node.name].astype(numpy_helper.to_array(original).dtype), t.name))
            onnx.save(base, str(path))
            t.CopyFrom(original)  # one node's weights changed at a time
            out = open_onnx(path).run(None, {input_name: x})[0]
            ranked.append((node.name, float(np.abs(out - ref).mean())))
    finally:
        path.unlink(missing_ok=True)
    ranked.sort(key=lambda kv: -kv[1])
    return ranked
