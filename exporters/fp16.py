"""ONNX FP16 for GPU targets: weights and activations in float16, inputs and
outputs kept float32 unless asked (`keep_io_types`), so the runtime's
preprocessing and the bundle's declared IO dtype stay the same.

Uses onnxruntime's own converter (`onnxruntime.transformers.float16`, the
maintained copy of onnxconverter-common's), which inserts the Cast nodes at the
IO boundary and keeps ops without float16 kernels in float32.
"""

from __future__ import annotations

from pathlib import Path

import onnx

from exporters.errors import ExportError
from exporters.onnx_export import save_onnx
from exporters.quiet import quiet


def convert_fp16(src: Path, dst: Path, keep_io_types: bool = True) -> dict:
    """Write the float16 version of `src` to `dst`; return what bundle.json records about it."""
    try:
        from onnxruntime.transformers.float16 import convert_float_to_float16
        from onnxruntime.transformers.onnx_model import OnnxModel
    except ImportError:  # pragma: no cover - part of every onnxruntime wheel since 1.10
        raise ExportError("FP16 export needs onnxruntime's transformers tools (pip install 'onnxruntime>=1.17')") from None
    model = onnx.load(str(src))
    with quiet():
        half = convert_float_to_float16(model, keep_io_types=keep_io_types, disable_shape_infer=False)
        OnnxModel(half).topological_sort()  # the converter appends its IO Cast nodes at the end of the node list
    save_onnx(half, dst)
    onnx.checker.check_model(str(dst))
    return {"keep_io_types": keep_io_types, "io_dtype": "float32" if keep_io_types else "float16"}
