"""Which nodes of a model lose most under INT8 quantization: the ranking the INT8 guard
(exporters.quantize) uses to choose what to keep in float."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from exporters.calibration import ImageSource, as_source
from runtime.backends.ort import open_onnx

_WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def onnx_input_name(path: Path) -> str:
    """The model's first real input (read from the graph: no session needed)."""
    graph = onnx.load(str(path), load_external_data=False).graph
    inits = {t.name for t in graph.initializer}
    return next(i.name for i in graph.input if i.name not in inits)


def with_outputs(src: Path, names: list[str], dst: Path) -> list[str]:
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


def rank_sensitive_nodes(float_path: Path, qdq_path: Path, x: np.ndarray | ImageSource,
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
        added = with_outputs(Path(path), wanted, paths[tag])
        if tag == "float":
            common = set(added)
        else:
            common &= set(added)
    names = sorted(common)
    sessions = {tag: open_onnx(p) for tag, p in paths.items()}
    input_name = onnx_input_name(float_path)
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


def with_activation_producers(model: "Path | onnx.GraphProto", names: list[str]) -> list[str]:
    """`names` plus, for each, the weighted node that feeds it through a Relu/Clip (`model`: the float
    model's path, or its graph already loaded).

    The QDQ quantizer folds a Relu/Clip into the quantization of the node before it only when the node
    after it is quantized too: keep that node in float alone and the activation is quantized before its
    clamp, over the pre-activation's whole range, so the values that survive the clamp get a fraction of
    the 256 levels. On the digits demo's EfficientNet-Lite0, its second convolution alone in float left
    76 % of the decisions, with the first as well 97 % (bench/RESULTS.md, eleventh session)."""
    graph = model if isinstance(model, onnx.GraphProto) else onnx.load(str(model), load_external_data=False).graph
    producer = {o: n for n in graph.node for o in n.output}
    by_name = {n.name: n for n in graph.node}
    out = list(dict.fromkeys(names))
    for name in names:
        node = by_name.get(name)
        act = producer.get(node.input[0]) if node is not None and node.input else None
        if act is not None and act.op_type in ("Relu", "Clip"):
            src = producer.get(act.input[0])
            if src is not None and src.op_type in _WEIGHTED_OPS and src.name not in out:
                out.append(src.name)
    return out
