"""ONNX FP16 for GPU targets: weights and activations in float16, inputs and
outputs kept float32 unless asked (`keep_io_types`), so the runtime's
preprocessing and the bundle's declared IO dtype stay the same.

Uses onnxruntime's own converter (`onnxruntime.transformers.float16`, the
maintained copy of onnxconverter-common's), which inserts the Cast nodes at the
IO boundary and keeps ops without float16 kernels in float32.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import onnx

from exporters.onnx_export import ExportError, save_onnx


def convert_fp16(src: Path, dst: Path, keep_io_types: bool = True) -> dict:
    """Write the float16 version of `src` to `dst`; return what bundle.json records about it."""
    try:
        from onnxruntime.transformers.float16 import convert_float_to_float16
    except ImportError:  # pragma: no cover - part of every onnxruntime wheel since 1.10
        raise ExportError("FP16 export needs onnxruntime's transformers tools (pip install 'onnxruntime>=1.17')") from None
    model = onnx.load(str(src))
    sink = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        warnings.simplefilter("ignore")
        half = convert_float_to_float16(model, keep_io_types=keep_io_types, disable_shape_infer=False)
    _toposort(half.graph)  # the converter appends its IO Cast nodes at the end of the node list
    save_onnx(half, dst)
    onnx.checker.check_model(str(dst))
    return {"keep_io_types": keep_io_types, "io_dtype": "float32" if keep_io_types else "float16"}


def _toposort(graph: onnx.GraphProto) -> None:
    """Reorder graph.node in place so every node comes after the producers of its inputs."""
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending = list(graph.node)
    ordered = []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:
            raise ExportError("FP16 conversion produced a graph with a cycle or a dangling input")
        ids = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in ids]
        for n in ready:
            ordered.append(n)
            available.update(n.output)
    copies = [onnx.NodeProto.FromString(n.SerializeToString()) for n in ordered]
    del graph.node[:]
    graph.node.extend(copies)
