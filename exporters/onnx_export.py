"""PyTorch -> ONNX with a dynamic batch axis, checked with onnx.checker."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from pipeline.errors import EdgekilnError

INPUT_NAME = "input"
OUTPUT_NAME = "logits"


class ExportError(EdgekilnError):
    pass


def export_onnx(model: nn.Module, input_size: int, path: Path, opset: int = 18, dynamic_batch: bool = True) -> int:
    """Export `model` (eval mode, NCHW float32 input) to `path`; return the opset actually written.

    Uses the torch.export-based exporter (`dynamo=True`), the default since torch 2.9.
    """
    model = model.eval()
    example = torch.randn(2, 3, input_size, input_size)
    dynamic_shapes = ({0: torch.export.Dim("batch", min=1, max=4096)},) if dynamic_batch else None
    # The exporter prints progress and warnings of its own; keep the CLI output ours.
    sink = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink), _quiet_loggers():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                model,
                (example,),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                opset_version=opset,
                dynamic_shapes=dynamic_shapes,
                dynamo=True,
                verbose=False,
            )
            program.save(str(path), external_data=False)
    except Exception as e:  # the exporter raises a zoo of internal error types
        raise ExportError(f"ONNX export failed: {e.__class__.__name__}: {str(e).splitlines()[0][:300]}") from None
    proto = onnx.load(str(path))
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"onnx.checker rejected the exported model: {str(e).splitlines()[0]}") from None
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


@contextlib.contextmanager
def _quiet_loggers():
    names = ["torch.onnx", "torch.export", "torch._dynamo", "onnxscript", "torch.fx"]
    saved = [(logging.getLogger(n), logging.getLogger(n).level) for n in names]
    for lg, _ in saved:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, lvl in saved:
            lg.setLevel(lvl)
